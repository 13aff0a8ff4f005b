"""Rollouts and serving shared by the methods: items, ordered lists, and greedy list serving.

A list of K items is generated autoregressively after the prompt, item by item, each item under
the catalogue trie and excluding the list's earlier items (``CatalogueTrie.sample_list``); its
completion tokens are the K items' semantic-id paths one after another.
"""

from __future__ import annotations

import numpy as np
import torch

from agorasim.policy.threads import chunk_bounds, map_chunks
from agorasim.rl.trainer import Prompts, Rollout


def item_rollout(trainer, prompts: Prompts, generator: torch.Generator, group_size: int, rollout: str,
                 temperature: float = 1.0, suffix: np.ndarray | None = None) -> Rollout:
    """G items per prompt under the catalogue trie: the top-G beams or G constrained samples.

    The prompts are decoded in the policy's chunks, at once on its chunk threads
    (``GenerativePolicy.chunking``); with more than one chunk, chunk c samples with its own
    generator, seeded by the c-th draw from ``generator`` (``chunk_generators``), so the samples
    do not depend on which thread runs which chunk.

    Args:
        trainer: The trainer (its ``policy`` decodes).
        prompts: The batch.
        generator: Draws the samples (unused by beams).
        group_size: G.
        rollout: ``"beam"``, ``"sample"`` or ``"mixed"`` (the top G/2 beams, then G - G/2
            samples from the items outside them: the group reaches past what the policy serves).
        temperature: Sampling temperature.
        suffix: Optional ``(B, S)`` tokens appended to the prompts (an instruction).
    """
    policy = trainer.policy
    ids, mask = (t.to(policy.device) for t in policy.prompts(prompts.history, suffix))
    allowed = policy.item_mask(prompts.history)
    split = policy.chunking()
    bounds = chunk_bounds(len(ids), split["chunks"])
    generators = chunk_generators(generator, len(bounds))

    def decode(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk_ids, chunk_mask = ids[start:stop], mask[start:stop]
        chunk_allowed = None if allowed is None else allowed[start:stop]
        draw = generators[bounds.index((start, stop))]
        if rollout == "beam":
            return policy.trie.beam_search(policy.model, chunk_ids, chunk_mask, num_beams=group_size,
                                           item_mask=chunk_allowed)
        if rollout == "sample":
            items, scores, _ = policy.trie.sample(policy.model, chunk_ids, chunk_mask, num_samples=group_size,
                                                  temperature=temperature, generator=draw, item_mask=chunk_allowed)
            return items, scores
        # mixed: the top half of the group by beam search, the rest sampled from outside it
        n_beams = group_size // 2
        top, top_scores = policy.trie.beam_search(policy.model, chunk_ids, chunk_mask, num_beams=n_beams,
                                                  item_mask=chunk_allowed)
        outside = torch.ones((len(top), len(policy.tokens)), dtype=torch.bool, device=policy.device)
        rows = torch.arange(len(top), device=policy.device)[:, None].expand_as(top)
        outside[rows[top >= 0], top[top >= 0]] = False
        outside = outside if chunk_allowed is None else outside & chunk_allowed
        drawn, drawn_scores, _ = policy.trie.sample(policy.model, chunk_ids, chunk_mask,
                                                    num_samples=group_size - n_beams, temperature=temperature,
                                                    generator=draw, item_mask=outside)
        return torch.cat([top, drawn], 1), torch.cat([top_scores, drawn_scores], 1)

    parts = map_chunks(decode, bounds, split["workers"])
    items = torch.cat([p[0] for p in parts]).cpu().numpy().astype(np.int64)
    scores = torch.cat([p[1] for p in parts])
    depth = policy.levels + 1
    valid = items >= 0
    completions = torch.from_numpy(policy.tokens[np.maximum(items, 0)].reshape(-1, depth)).to(policy.device)
    token_mask = torch.from_numpy(np.repeat(valid.reshape(-1, 1), depth, 1)).to(policy.device)
    return Rollout(items, scores.float().cpu().numpy().astype(np.float64), ids, mask, completions, token_mask)


def chunk_generators(generator: torch.Generator | None, n: int) -> list[torch.Generator | None]:
    """One generator per chunk: ``generator`` itself for one chunk; otherwise ``n`` new CPU
    generators seeded by ``n`` draws from it (the same draws, the same streams)."""
    if n <= 1 or generator is None:
        return [generator] * max(n, 1)
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    out = []
    for seed in seeds:
        chunk = torch.Generator(device=generator.device)
        chunk.manual_seed(seed)
        out.append(chunk)
    return out


def list_rollout(trainer, prompts: Prompts, generator: torch.Generator, group_size: int, length: int,
                 temperature: float = 1.0, suffix: np.ndarray | None = None,
                 item_mask: torch.Tensor | None = None) -> Rollout:
    """G sampled ordered lists of ``length`` distinct items per prompt (``sample_list``).

    Returns a ``Rollout`` whose ``items`` are ``(B, G, K)``, ``scores`` the lists' summed
    log-probs and ``extra["item_logprobs"]`` the ``(B, G, K)`` per-item log-probs.
    """
    policy = trainer.policy
    ids, mask = (t.to(policy.device) for t in policy.prompts(prompts.history, suffix))
    items, logprobs, tokens = policy.trie.sample_list(policy.model, ids, mask, length, num_samples=group_size,
                                                      temperature=temperature, generator=generator,
                                                      item_mask=policy.item_mask(prompts.history, item_mask))
    items = items.cpu().numpy().astype(np.int64)
    depth = policy.levels + 1
    tokens = tokens.reshape(-1, length * depth)
    token_mask = tokens >= 0
    completions = tokens.clamp(min=0)  # masked tokens only need to be valid ids
    item_logp = logprobs.float().cpu().numpy().astype(np.float64)
    scores = np.where(items >= 0, item_logp, 0.0).sum(-1)
    return Rollout(items, scores, ids, mask, completions, token_mask, {"item_logprobs": item_logp})


def serve_list(policy, history: np.ndarray, k: int, length: int, suffix: np.ndarray | None = None,
               chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Serving for list methods: the greedy list of ``length`` items, then the plain prompt's
    remaining top beams, ``k`` in all. Scores are ``-rank`` (the list's order is the policy's
    ranking; its items have no common scale with beam scores)."""
    rows = []
    for start in range(0, len(history), chunk):
        part = history[start:start + chunk]
        suffix_part = None if suffix is None else suffix[start:start + chunk]
        ids, mask = (t.to(policy.device) for t in policy.prompts(part, suffix_part))
        with torch.inference_mode():
            head, _, _ = policy.trie.sample_list(policy.model, ids, mask, min(length, k), greedy=True,
                                                 item_mask=policy.item_mask(part))
        head = head[:, 0].cpu().numpy().astype(np.int64)
        beams, _ = policy.beam_search(part, k, suffix_part)
        rows.append(merge_ranked(head, beams, k))
    items = np.concatenate(rows) if rows else np.zeros((0, k), np.int64)
    scores = np.where(items >= 0, -np.arange(k, dtype=np.float64)[None, :], -np.inf)
    return items, scores


def merge_ranked(head: np.ndarray, tail: np.ndarray, k: int) -> np.ndarray:
    """``(B, k)`` rows of ``head``'s items (in order, ``-1`` skipped) followed by ``tail``'s items
    not already in the row, ``-1`` padded at the end. Vectorised: a stable sort of slot keys."""
    both = np.concatenate([head, tail], 1)
    b, width = both.shape
    # an entry is dropped if it is padding or repeats an earlier entry of its row
    order = np.argsort(both, axis=1, kind="stable")
    sorted_items = np.take_along_axis(both, order, 1)
    repeat = np.zeros_like(both, bool)
    repeat_sorted = np.zeros_like(both, bool)
    repeat_sorted[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    np.put_along_axis(repeat, order, repeat_sorted, 1)
    drop = repeat | (both < 0)
    slot = np.where(drop, width, np.arange(width)[None, :])
    keep = np.argsort(slot, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(both, keep, 1)
    out[np.take_along_axis(slot, keep, 1) == width] = -1
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out
