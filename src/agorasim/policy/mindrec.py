"""MindRec: a category tree before the semantic id, masked-diffusion training, diffusion beam search.

After MindRec (arXiv 2511.12597; authors' code ``Mr-Peach0301/MindRec``, see ALGORITHMS.md section 7):

* **Item encoding.** Every item is ``c_1 .. c_D s_1 .. s_{L+1}``: ``D`` category tokens (its path in
  a category tree, each token the child index under its parent, one vocabulary block per level)
  then its semantic id (``policy/semantic_ids.py``). The tree is the synthetic world's category
  paths in the market and a 2-level k-means tree (8 x 4) on the item embeddings offline.
* **Model.** ``MaskedItemEncoder``, a small torch encoder of our own (not a transformers model):
  token plus learned position embeddings, pre-norm blocks of *bidirectional* multi-head attention
  over the whole row (padding excluded), a tied output head. A row is ``[BOS] item_1 .. item_P
  [SEP] x_1 .. x_S``: the history is a prefix that is never masked, ``x`` the item span, where
  ``[MASK]`` marks a position still to fill.
* **Training (LLaDA-style, lora_finetune.py:forward_process).** Only item tokens are masked: per
  row ``t ~ U(0,1)``, ``p = (1 - eps) t + eps``, each item position masked i.i.d. with probability
  ``p``; loss = mean over rows of ``sum_masked CE / p / S`` (``masked_diffusion_loss``).
* **Decoding (test_ddp.py:generate).** ``diffusion_beam_search``: the category positions left to
  right (per beam the top-B allowed tokens, score times p, exact duplicates dropped, B kept), then
  the id block: per beam the top-B tokens of every still-masked id position, the global top-B
  (position, token) pairs of the beam each fill one token (score times p), and B of all children
  are kept by ``score * (1 - log(1 + se))``, ``se`` = the largest overlap of a child's filled id
  tokens with a child already kept, over the filled count (the paper's ``/(step - 2)`` with three
  category tokens). We keep greedily: the child of highest penalised score first, overlaps
  recomputed against the kept ones (the authors' heap admits the first B distinct children by raw
  score and then replaces; its replacement branch calls ``list.add`` and cannot have run).
  ``mode="faithful"`` allows at each position the union of that position's tokens over the listed
  items, as the paper does, so a decoded sequence need not be an item (counted as invalid);
  ``mode="trie"`` (``trie_consistent``, a flagged deviation) allows only tokens some listed item
  has there *and* that agree with every filled position, so it never produces a non-item.
* **In the market** only items reach a slate: an invalid sequence is replaced by the listed item
  sharing most of its tokens (ties: the lower id) not already in the row.
* **In-loop training: GRPO over the denoising trajectory** (``DiffusionGRPO``, a ``rl.Trainer``
  method). A completion is one of the G final beams; its log-probability is that of its
  trajectory, the sum over the S decoding steps of ``log p(token | the partially filled span)`` at
  the position filled at that step; advantages are GRPO's group-relative ones over ``rl.rewards``
  (non-items score 0), the loss ``rl.loss`` on the S per-step log-probs, KL to the reference when
  ``rl.beta > 0``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from agorasim.errors import UserInputError
from agorasim.policy.base import FeedbackOracle, Policy, RecommendRequest
from agorasim.policy.baselines import PopularityPolicy
from agorasim.policy.observation import CatalogueView, LogView, Observation
from agorasim.policy.params import PolicyParams
from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens, nearest_centroid
from agorasim.policy.threads import chunk_bounds, map_chunks, resolve_workers, torch_threads
from agorasim.rl.critic import ServedCritic
from agorasim.rl.trainer import Method, Rollout, Scored

PAD, BOS, SEP, MASK = 0, 1, 2, 3
FIRST_ITEM_TOKEN = 4
MODES = ("faithful", "trie")


# -- the category tree ----------------------------------------------------------------------------------
def child_index_codes(paths: np.ndarray, capacity: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Category paths (n, D) of arbitrary ints as child indices under their parent (MindRec's
    ``<a:k><b:k>``): level ``l`` code = rank of the level-``l`` prefix among its parent's children,
    in order of first appearance.

    Args:
        paths: ``(n, D)`` category ids per level, coarse to fine.
        capacity: codes per level to fit into (a prefix whose rank exceeds it wraps modulo it);
            None: as many as the widest parent has.

    Returns:
        ``codes (n, D)`` and the codes per level.
    """
    paths = np.asarray(paths, np.int64)
    n, depth = paths.shape
    codes = np.zeros((n, depth), np.int64)
    for level in range(depth):
        children: dict[tuple, dict[int, int]] = {}
        for row, path in enumerate(map(tuple, paths[:, : level + 1].tolist())):
            siblings = children.setdefault(path[:-1], {})
            codes[row, level] = siblings.setdefault(path[-1], len(siblings))
    sizes = [int(codes[:, level].max()) + 1 if n else 1 for level in range(depth)]
    if capacity is not None:
        codes = codes % np.asarray(capacity, np.int64)
        sizes = list(capacity)
    return codes, sizes


def kmeans_tree(embeddings: np.ndarray, branching: tuple[int, ...], seed: int, iterations: int = 20) -> np.ndarray:
    """A category tree by hierarchical k-means: ``branching[0]`` clusters of all items, then
    ``branching[1]`` clusters within each, ...; returns ``(n, len(branching))`` child indices."""
    import faiss

    x = np.ascontiguousarray(embeddings, np.float32)
    n = len(x)
    codes = np.zeros((n, len(branching)), np.int64)
    groups = [np.arange(n)]
    seeds = np.random.SeedSequence(seed).generate_state(64)
    for level, k in enumerate(branching):
        next_groups = []
        for g, members in enumerate(groups):
            k_eff = min(k, len(members))
            if k_eff <= 1:
                next_groups.append(members)
                continue
            km = faiss.Kmeans(x.shape[1], k_eff, niter=iterations, seed=int(seeds[(level * 7 + g) % 64] % 2**31),
                              verbose=False, min_points_per_centroid=1, max_points_per_centroid=256)
            km.train(x[members])
            assign = nearest_centroid(x[members], np.ascontiguousarray(km.centroids, np.float32))
            codes[members, level] = assign
            next_groups += [members[assign == c] for c in range(k_eff) if (assign == c).any()]
        groups = next_groups
    return codes


# -- the model ------------------------------------------------------------------------------------------
class EncoderBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention (padding keys excluded)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))

    def heads_of(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, T, H)`` normed states -> queries, keys, values ``(N, heads, T, H / heads)`` by the
        attention module's own projections (queries pre-scaled by ``1 / sqrt(H / heads)``)."""
        n, t, hidden = h.shape
        heads = self.attention.num_heads
        q, k, v = nn.functional.linear(h, self.attention.in_proj_weight, self.attention.in_proj_bias).chunk(3, -1)
        q, k, v = (z.view(n, t, heads, hidden // heads).transpose(1, 2) for z in (q, k, v))
        return q * (hidden // heads) ** -0.5, k, v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual, output projection and feed-forward after attention ``(..., H)``."""
        x = x + self.attention.out_proj(attended)
        return x + self.ffn(self.norm2(x))


@dataclass
class PrefixCache:
    """Keys and values of the history prefixes under prefix attention (``MaskedItemEncoder.encode_prefix``).

    Attributes:
        layers: per block ``(keys, values)``, each ``(R, heads, T_p, H / heads)``.
        bias: ``(R, 1, 1, T_p)`` 0 for a real prefix token, ``-inf`` for padding.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.bias.shape[-1])


class MaskedItemEncoder(nn.Module):
    """The masked-diffusion denoiser: ``(N, T)`` token ids -> ``(N, T, vocab)`` logits.

    Rows have the same length ``T`` (history left-padded), so a position embedding is a column.

    ``prefix_attention=False`` (MindRec's LLaDA): every position attends to every real position.
    ``prefix_attention=True`` (a deviation, ``history_attention=prefix``): the history prefix
    attends only to itself, the item span to everything, so the prefix's keys and values do not
    depend on the span and are computed once per prompt (``encode_prefix``), however many beams
    and denoising steps read them (``span_logits``).
    """

    prefix_attention = False  # class default: encoders pickled before the option read as full attention

    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int,
                 prefix_attention: bool = False):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, hidden)
        self.positions = nn.Embedding(max_positions, hidden)
        self.blocks = nn.ModuleList(EncoderBlock(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.prefix_attention = bool(prefix_attention)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, ids: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """Logits of every position, or of the last ``span`` ones only (``(N, span, vocab)``, the
        output head applied to those alone); prefix attention needs ``span``."""
        if self.prefix_attention:
            if span is None:
                raise ValueError("prefix attention: forward needs the span length")
            return self.span_logits(self.encode_prefix(ids[:, :-span]), ids[:, None, -span:])[:, 0]
        padding = ids == PAD
        x = self.tokens(ids) + self.positions.weight[: ids.shape[1]][None]
        for block in self.blocks:
            x = block(x, padding)
        if span is not None:
            x = x[:, -span:]
        return self.norm(x) @ self.tokens.weight.T  # tied head

    def encode_prefix(self, prompt: torch.Tensor) -> PrefixCache:
        """Per block keys and values of ``prompt`` (R, T_p), which attends only to its own real tokens."""
        x = self.tokens(prompt) + self.positions.weight[: prompt.shape[1]][None]
        bias = torch.zeros(prompt.shape, dtype=x.dtype, device=x.device).masked_fill(prompt == PAD, -math.inf)
        bias = bias[:, None, None, :]
        layers = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.heads_of(block.norm1(x))
            layers.append((k, v))
            if i + 1 < len(self.blocks):  # the last block's prefix output is never read
                attended = torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v
                x = block.finish(x, attended.transpose(1, 2).flatten(2))
        return PrefixCache(layers, bias)

    def span_logits(self, cache: PrefixCache, span: torch.Tensor) -> torch.Tensor:
        """``(R, K, S, vocab)`` logits of ``K`` spans per prompt (R, K, S) after the cached prefixes.

        Each span attends to its prompt's real prefix tokens and to its own S positions; the
        prefix's keys are shared by the K spans, not copied."""
        r, k, s = span.shape
        t = cache.length
        x = self.tokens(span) + self.positions.weight[t:t + s]
        hidden = x.shape[-1]
        for block, (key_p, value_p) in zip(self.blocks, cache.layers, strict=True):
            q, key_s, value_s = block.heads_of(block.norm1(x).reshape(r * k, s, hidden))
            heads, width = q.shape[1], q.shape[-1]
            q = q.view(r, k, heads, s, width).transpose(1, 2)  # (R, heads, K, S, hd)
            key_s = key_s.view(r, k, heads, s, width).transpose(1, 2)
            value_s = value_s.view(r, k, heads, s, width).transpose(1, 2)
            to_prefix = (q.reshape(r, heads, k * s, width) @ key_p.transpose(-1, -2) + cache.bias).view(r, heads, k, s, t)
            weights = torch.softmax(torch.cat([to_prefix, q @ key_s.transpose(-1, -2)], -1), -1)
            attended = (weights[..., :t].reshape(r, heads, k * s, t) @ value_p).view(r, heads, k, s, width)
            attended = attended + weights[..., t:] @ value_s
            x = block.finish(x, attended.permute(0, 2, 3, 1, 4).reshape(r, k, s, hidden))
        return self.norm(x) @ self.tokens.weight.T


def build_encoder(vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int, seed: int,
                  prefix_attention: bool = False) -> MaskedItemEncoder:
    """The denoiser, initialised from ``seed`` without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskedItemEncoder(vocab_size, hidden, layers, heads, max_positions, prefix_attention)


def masked_diffusion_loss(model: nn.Module, prompt: torch.Tensor, item_tokens: torch.Tensor, eps: float,
                          generator: torch.Generator) -> torch.Tensor:
    """LLaDA's masked objective on the item span (ALGORITHMS.md section 7).

    Args:
        model: ``ids (N, T) -> logits (N, T, V)``.
        prompt: ``(N, T_p)`` the history prefix rows (``[PAD..] [BOS] .. [SEP]``).
        item_tokens: ``(N, S)`` the target items' tokens.
        eps: the smallest mask rate; ``p = (1 - eps) t + eps`` with ``t ~ U(0, 1)`` per row.
        generator: draws ``t`` and the masks (on the tokens' device).

    Returns:
        ``mean_rows( sum_masked CE / p / S )``.
    """
    n, s = item_tokens.shape
    t = torch.rand(n, 1, generator=generator, device=item_tokens.device)
    p = (1 - eps) * t + eps
    masked = torch.rand(n, s, generator=generator, device=item_tokens.device) < p
    span = torch.where(masked, torch.full_like(item_tokens, MASK), item_tokens)
    logits = model(torch.cat([prompt, span], 1), span=s)
    ce = nn.functional.cross_entropy(logits.reshape(n * s, -1), item_tokens.reshape(-1), reduction="none").view(n, s)
    return ((ce * masked) / p).sum(1).div(s).mean()


# -- the item space: tokens, allowed sets, lookup ----------------------------------------------------------
class ItemSpace:
    """Every known item's token sequence (categories then semantic id) and what decoding may use.

    Args:
        item_tokens: ``(n_items, S)`` vocabulary ids, the first ``n_categories`` the category path.
        n_categories: D.
        vocab_size: the model's vocabulary.
        alive: ``(n_items,)`` listed items (the only valid outputs).
    """

    def __init__(self, item_tokens: np.ndarray, n_categories: int, vocab_size: int, alive: np.ndarray | None = None):
        self.item_tokens = np.asarray(item_tokens, np.int64)
        self.n_categories = int(n_categories)
        self.vocab_size = int(vocab_size)
        n, self.span = self.item_tokens.shape
        self.alive = np.ones(n, bool) if alive is None else np.asarray(alive, bool).copy()
        # a sequence's key: mixed radix over the vocabulary (S <= 8 tokens of < 2^7 ... fits int64 for V^S < 2^63)
        assert self.span * math.log2(max(2, vocab_size)) < 63, "item sequences too long for an int64 key"
        self.radix = vocab_size ** np.arange(self.span - 1, -1, -1, dtype=np.int64)
        keys = self.item_tokens @ self.radix
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        assert len(np.unique(keys)) == n, "two items share a token sequence"
        self._tensors: dict[str, tuple] = {}

    def update_alive(self, alive: np.ndarray) -> None:
        self.alive = np.asarray(alive, bool).copy()
        self._tensors = {}

    def union_mask(self, device) -> torch.Tensor:
        """``(S, V)`` bool: the tokens some listed item has at each position (the paper's sets)."""
        key = f"union:{device}"
        if key not in self._tensors:
            mask = np.zeros((self.span, self.vocab_size), bool)
            live = self.item_tokens[self.alive]
            for j in range(self.span):
                mask[j, live[:, j]] = True
            self._tensors[key] = (torch.as_tensor(mask, device=device),)
        return self._tensors[key][0]

    def consistent_mask(self, partial: torch.Tensor) -> torch.Tensor:
        """``(N, S, V)`` bool: tokens a listed item agreeing with every filled position of
        ``partial`` (``(N, S)``, ``-1`` unfilled) has at each position (``trie_consistent``)."""
        device = partial.device
        key = f"items:{device}"
        if key not in self._tensors:
            live = np.flatnonzero(self.alive)
            tokens = torch.as_tensor(self.item_tokens[live], device=device)
            self._tensors[key] = (tokens,)
        tokens = self._tensors[key][0]  # (n_live, S)
        agree = torch.ones(partial.shape[0], tokens.shape[0], dtype=torch.bool, device=device)
        for j in range(self.span):
            agree &= (partial[:, j, None] < 0) | (partial[:, j, None] == tokens[None, :, j])
        weights = agree.float()
        mask = torch.zeros(partial.shape[0], self.span, self.vocab_size, dtype=torch.bool, device=device)
        for j in range(self.span):
            counts = torch.zeros(partial.shape[0], self.vocab_size, device=device)
            counts.index_add_(1, tokens[:, j], weights)
            mask[:, j] = counts > 0
        return mask

    def lookup(self, sequences: np.ndarray) -> np.ndarray:
        """Item id of each ``(..., S)`` token sequence; ``-1`` for a non-item or an unlisted one."""
        keys = np.asarray(sequences, np.int64) @ self.radix
        where = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        found = self.sorted_keys[where] == keys
        items = np.where(found, self.order[where], -1)
        return np.where((items >= 0) & self.alive[np.maximum(items, 0)], items, -1)

    def nearest_items(self, sequences: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        """For each ``(N, S)`` sequence, the listed item sharing most tokens with it (ties: the lower
        id) that is not in its row of ``exclude`` (``(N, E)``, ``-1`` padded); ``-1`` if none."""
        live = np.flatnonzero(self.alive)
        if len(sequences) == 0 or len(live) == 0:
            return np.full(len(sequences), -1, np.int64)
        shared = (np.asarray(sequences)[:, None, :] == self.item_tokens[live][None]).sum(-1).astype(np.float64)
        taken = (live[None, :, None] == np.asarray(exclude)[:, None, :]).any(-1)
        shared[taken] = -1.0
        best = np.argmax(shared, 1)  # first maximum: the lowest id among ties
        return np.where(shared[np.arange(len(best)), best] >= 0, live[best], -1)


# -- diffusion beam search ---------------------------------------------------------------------------------
@dataclass
class Decoded:
    """Beams of ``diffusion_beam_search``, best first (by their product of probabilities).

    Attributes:
        sequences: ``(R, B)`` ... ``(R, B, S)`` decoded token sequences (``-1`` for a missing beam).
        scores: ``(R, B)`` summed log-probabilities (``-inf`` for a missing beam).
        items: ``(R, B)`` item of each sequence, ``-1`` for a non-item (or a missing beam).
        fill_order: ``(R, B, S)`` the decoding step at which each position was filled.
        first_position: ``(R, B)`` the id position (0-based, within the id block) filled first.
    """

    sequences: np.ndarray
    scores: np.ndarray
    items: np.ndarray
    fill_order: np.ndarray
    first_position: np.ndarray

    @property
    def invalid(self) -> np.ndarray:
        """``(R, B)`` real beams that are not listed items."""
        return np.isfinite(self.scores) & (self.items < 0)


def _penalised_keep(seq: torch.Tensor, score: torch.Tensor, order: torch.Tensor, beams: int, n_categories: int,
                    n_filled: int, penalty: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``beams`` of the ``(R, C, S)`` children: exact duplicates dropped, greedily by
    ``score * (1 - log(1 + se))`` (``se`` = the largest count of equal filled id tokens shared with a
    kept child, over ``n_filled``; log-space here). Returns the kept sequences, raw scores, orders."""
    r, c, s = seq.shape
    sid = seq[..., n_categories:]
    available = torch.isfinite(score)
    overlap = torch.zeros(r, c, device=seq.device)
    picks = []
    rows = torch.arange(r, device=seq.device)
    for _ in range(min(beams, c)):
        factor = 1 - torch.log1p(overlap / max(n_filled, 1)) if penalty else torch.ones_like(overlap)
        adjusted = torch.where(available, score + torch.log(factor), torch.full_like(score, -math.inf))
        pick = torch.argmax(adjusted, 1)  # the first maximum: ties keep the candidate order
        ok = torch.isfinite(adjusted[rows, pick])
        picks.append(torch.where(ok, pick, torch.full_like(pick, -1)))
        chosen = sid[rows, pick]  # (R, S_id)
        same = (sid == chosen[:, None]) & (chosen[:, None] >= 0)
        duplicate = (seq == seq[rows, pick][:, None]).all(-1)
        available &= ~(duplicate & ok[:, None])
        overlap = torch.where(ok[:, None], torch.maximum(overlap, same.sum(-1).float()), overlap)
    index = torch.stack(picks, 1)  # (R, K) with -1 for no pick
    safe = index.clamp(min=0)
    kept_seq = torch.gather(seq, 1, safe[..., None].expand(-1, -1, s))
    kept_order = torch.gather(order, 1, safe[..., None].expand(-1, -1, s))
    kept_score = torch.where(index >= 0, torch.gather(score, 1, safe), torch.full_like(safe, -math.inf, dtype=score.dtype))
    return kept_seq, kept_score, kept_order


def diffusion_beam_search(step_logprobs, rows: int, space: ItemSpace, beams: int, mode: str = "faithful",
                          penalty: bool = True, id_order: str = "any", device="cpu") -> Decoded:
    """MindRec's diffusion beam search (module docstring) over ``rows`` prompts.

    Args:
        step_logprobs: ``f(partial (R, K, S) long, -1 unfilled) -> (R, K, S, V)`` log-probs of every
            token at every item position given the partial spans (the model; a table in tests).
        rows: R.
        space: the items, their allowed tokens and lookup.
        beams: B.
        mode: ``faithful`` (per-position token sets, may produce non-items) or ``trie``
            (children of the partial assignment only).
        penalty: apply the overlap penalty when keeping id-block beams.
        id_order: ``any`` (global top-B (position, token) pairs) or ``left_to_right`` (the id
            positions in order, i.e. plain beam search on the same model: the AR control).

    Returns:
        ``Decoded``, beams sorted by score.
    """
    if mode not in MODES:
        raise UserInputError(f"mindrec: mode must be one of {', '.join(MODES)}, got {mode!r}")
    s, d = space.span, space.n_categories
    seq = torch.full((rows, 1, s), -1, dtype=torch.long, device=device)
    order = torch.full((rows, 1, s), -1, dtype=torch.long, device=device)
    score = torch.zeros(rows, 1, device=device)
    union = space.union_mask(device)
    for step in range(s):
        k = seq.shape[1]
        logp = step_logprobs(seq).float()  # (R, K, S, V)
        if mode == "faithful":
            allowed = union[None, None].expand(rows, k, -1, -1)
        else:
            allowed = space.consistent_mask(seq.reshape(rows * k, s)).view(rows, k, s, -1)
        allowed = allowed & (seq[..., None] < 0)  # filled positions take no token
        logp = torch.where(allowed, logp, torch.full_like(logp, -math.inf))
        if step < d or id_order == "left_to_right":  # one fixed position: top-B tokens per beam
            position = torch.full((rows, k, 1), step, dtype=torch.long, device=device)
            top, token = torch.topk(logp[:, :, step], min(beams, logp.shape[-1]), -1)  # (R, K, B)
            position = position.expand_as(token)
        else:  # global top-B (position, token) pairs over the still-masked id positions
            per_pos, per_tok = torch.topk(logp[:, :, d:], min(beams, logp.shape[-1]), -1)  # (R, K, S_id, B)
            flat = per_pos.reshape(rows, k, -1)
            top, where = torch.topk(flat, min(beams, flat.shape[-1]), -1)
            position = d + where // per_pos.shape[-1]
            token = torch.gather(per_tok.reshape(rows, k, -1), 2, where)
        b = token.shape[-1]
        child = seq[:, :, None].expand(-1, -1, b, -1).clone()
        child_order = order[:, :, None].expand(-1, -1, b, -1).clone()
        child.scatter_(3, position[..., None], token[..., None])
        child_order.scatter_(3, position[..., None], torch.full_like(token[..., None], step))
        child_score = score[:, :, None] + top
        child_score = torch.where(torch.isfinite(top), child_score, torch.full_like(child_score, -math.inf))
        # a missing parent beam has no children
        child_score = torch.where(torch.isfinite(score)[:, :, None], child_score, torch.full_like(child_score, -math.inf))
        flat_seq, flat_order = child.reshape(rows, k * b, s), child_order.reshape(rows, k * b, s)
        flat_score = child_score.reshape(rows, k * b)
        # candidates in order of raw score first (stable: ties keep the beam, then token order)
        ranked = torch.sort(flat_score, dim=1, descending=True, stable=True).indices
        flat_seq = torch.gather(flat_seq, 1, ranked[..., None].expand(-1, -1, s))
        flat_order = torch.gather(flat_order, 1, ranked[..., None].expand(-1, -1, s))
        flat_score = torch.gather(flat_score, 1, ranked)
        use_penalty = penalty and step >= d and id_order == "any"
        seq, score, order = _penalised_keep(flat_seq, flat_score, flat_order, beams, d, step - d + 1, use_penalty)
    final = torch.sort(score, dim=1, descending=True, stable=True).indices
    seq = torch.gather(seq, 1, final[..., None].expand(-1, -1, s)).cpu().numpy()
    order = torch.gather(order, 1, final[..., None].expand(-1, -1, s)).cpu().numpy()
    score = torch.gather(score, 1, final).cpu().numpy().astype(np.float64)
    if seq.shape[1] < beams:  # fewer distinct beams than asked: pad
        pad = beams - seq.shape[1]
        seq = np.pad(seq, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
        order = np.pad(order, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
        score = np.pad(score, ((0, 0), (0, pad)), constant_values=-np.inf)
    real = np.isfinite(score)
    items = np.where(real, space.lookup(np.maximum(seq, 0)), -1)
    id_fill = order[..., d:]
    first = np.where(real, np.argmin(np.where(id_fill >= 0, id_fill, s), -1), -1)
    return Decoded(seq, score, items, order, first)


# -- parameters ------------------------------------------------------------------------------------------
class MindRecParams(PolicyParams):
    """MindRec: category tree + semantic id, masked-diffusion training, diffusion beam search."""

    warmup_rounds: int = Field(10, ge=1, description="rounds served by the popularity behaviour policy before SFT")
    levels: int = Field(3, ge=1, description="residual k-means levels of the semantic ids (plus a dedup code)")
    codebook_size: int = Field(64, ge=2, description="codes per level (capped at a quarter of the catalogue)")
    hidden: int = Field(64, ge=1, description="encoder width (a multiple of heads)")
    layers: int = Field(2, ge=1, description="encoder blocks")
    heads: int = Field(4, ge=1, description="attention heads")
    prompt_items: int = Field(10, ge=1, description="most recent history items in the prefix")
    beams: int = Field(10, ge=1, description="B of the diffusion beam search (the paper's 10); items served per user")
    mode: Literal["faithful", "trie"] = Field("faithful", description="decoder: faithful (the paper's per-position token sets; non-items "
                   "are counted and replaced before a slate) or trie (trie_consistent deviation: only children "
                   "of the partial assignment, never a non-item)")
    overlap_penalty: bool = Field(True, description="keep id-block beams by score*(1-log(1+se)) (False: by score)")
    id_order: Literal["any", "left_to_right"] = Field("any", description="id positions: any (global top-B (position, token)) or left_to_right "
                       "(plain beam search on the same model)")
    history_attention: Literal["full", "prefix"] = Field(
        "full", description="full (the paper's LLaDA: the history also attends to the item span) or prefix (a "
        "deviation: the history attends only to itself, so its keys and values are computed once per prompt and "
        "shared by every beam and denoising step)")
    mask_eps: float = Field(0.5, gt=0, le=1, description="epsilon of the mask rate p=(1-eps)t+eps (the paper's .4-.7)")
    sft_epochs: int = Field(10, ge=1, description="masked-diffusion epochs of the warm start")
    sft_lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the masked-diffusion training")
    sft_batch: int = Field(256, ge=1, description="pairs per training step")
    rl: dict | None = Field(None, description="the rl section (filled from the config's rl section); "
                         "rl.method none (training only at the warm start) or grpo (GRPO over the trajectory)")
    max_len: int = Field(20, ge=1, description="history window (market.history_length fills it)")
    grpo_every: int = Field(1, ge=1, description="rounds between in-loop training steps")
    threads: int | None = Field(1, ge=1, description="torch threads (None: torch's default)")
    chunks: int = Field(2, ge=1, description="contiguous chunks of prompts that the diffusion beam search (serving "
                        "and the GRPO rollouts) decodes at once on chunk_workers threads (policy/threads.py); "
                        "each prompt's beams are its own, so the beams do not depend on it (1: one pass)")
    chunk_workers: int | None = Field(None, ge=1, description="Python threads that run the chunks at once "
                                      "(None: the CPUs this process may use); results do not depend on it")
    device: str = Field("cpu", description="torch device of the model (cpu, cuda)")


# -- the policy --------------------------------------------------------------------------------------------
class MindRecPolicy(Policy):
    """MindRec as a market policy (see the module docstring; arguments as ``MindRecParams``)."""

    name = "mindrec"
    Params = MindRecParams
    chunks, chunk_workers = 1, None  # what a checkpoint from before these settings decoded with

    def __init__(self, warmup_rounds: int = 10, levels: int = 3, codebook_size: int = 64, hidden: int = 64,
                 layers: int = 2, heads: int = 4, prompt_items: int = 10, beams: int = 10, mode: str = "faithful",
                 overlap_penalty: bool = True, id_order: str = "any", history_attention: str = "full",
                 mask_eps: float = 0.5, sft_epochs: int = 10,
                 sft_lr: float = 3e-3, sft_batch: int = 256, rl: dict | None = None, max_len: int = 20,
                 grpo_every: int = 1, threads: int | None = 1, chunks: int = 2, chunk_workers: int | None = None,
                 device: str = "cpu"):
        for name, value in dict(warmup_rounds=warmup_rounds, levels=levels, hidden=hidden, layers=layers,
                                heads=heads, prompt_items=prompt_items, beams=beams, sft_epochs=sft_epochs,
                                sft_batch=sft_batch, grpo_every=grpo_every, max_len=max_len, chunks=chunks,
                                chunk_workers=1 if chunk_workers is None else chunk_workers).items():
            if value < 1:
                raise UserInputError(f"mindrec: {name} must be >= 1, got {value}")
        if codebook_size < 2:
            raise UserInputError(f"mindrec: codebook_size must be >= 2, got {codebook_size}")
        if hidden % heads:
            raise UserInputError(f"mindrec: hidden ({hidden}) must be a multiple of heads ({heads})")
        if mode not in MODES:
            raise UserInputError(f"mindrec: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if id_order not in ("any", "left_to_right"):
            raise UserInputError(f"mindrec: id_order must be any or left_to_right, got {id_order!r}")
        if history_attention not in ("full", "prefix"):
            raise UserInputError(f"mindrec: history_attention must be full or prefix, got {history_attention!r}")
        if not 0 < mask_eps <= 1:
            raise UserInputError(f"mindrec: mask_eps must be in (0, 1], got {mask_eps}")
        from agorasim.config import RLConfig

        self.rl = RLConfig.model_validate(rl or {})
        if self.rl.method not in ("none", "grpo"):
            raise UserInputError(f"mindrec: rl.method must be none or grpo (GRPO over the denoising trajectory), "
                                 f"got {self.rl.method!r}")
        self.method = DiffusionGRPO(self.rl) if self.rl.method == "grpo" else None
        self.warmup_rounds, self.levels, self.codebook_size = warmup_rounds, levels, codebook_size
        self.hidden, self.layers, self.heads = hidden, layers, heads
        self.prompt_items, self.beams = min(prompt_items, max_len), beams
        self.mode, self.overlap_penalty, self.id_order = mode, bool(overlap_penalty), id_order
        self.mask_eps = float(mask_eps)
        self.history_attention = history_attention
        self.sft_epochs, self.sft_lr, self.sft_batch = sft_epochs, sft_lr, sft_batch
        self.grpo_every, self.threads, self.device = grpo_every, threads, str(device)
        self.chunks, self.chunk_workers = int(chunks), chunk_workers
        self.behaviour = PopularityPolicy(refit_every=1)
        self.oracle: FeedbackOracle | None = None
        self.ids: SemanticIds | None = None
        self.category_sizes: list[int] = []
        self.space: ItemSpace | None = None
        self.model: MaskedItemEncoder | None = None
        self.trainer = None
        self.ready = False
        self.served: tuple[np.ndarray, np.ndarray] | None = None
        self.counts = self._fresh_counts()
        self.critic = ServedCritic()

    @staticmethod
    def _fresh_counts() -> dict[str, np.ndarray | float]:
        return {"beams": 0.0, "invalid": 0.0, "first_position": np.zeros(8)}

    def bind(self, oracle: FeedbackOracle) -> None:
        self.oracle = oracle

    def __getstate__(self):
        state = self.__dict__.copy()
        state["oracle"] = None  # the market re-binds itself after loading
        return state

    # -- vocabulary --------------------------------------------------------------------------------------
    @property
    def n_categories(self) -> int:
        return len(self.category_sizes)

    def vocab_layout(self) -> tuple[int, int, int]:
        """(first category token, first semantic-id token, vocabulary size)."""
        first_sid = FIRST_ITEM_TOKEN + int(sum(self.category_sizes))
        return FIRST_ITEM_TOKEN, first_sid, first_sid + int(sum(self.ids.level_sizes))

    def item_tokens(self, category_codes: np.ndarray, sid_codes: np.ndarray) -> np.ndarray:
        """``(n, D + L + 1)`` tokens of items from their category child indices and id codes."""
        first_cat, first_sid, _ = self.vocab_layout()
        return np.concatenate([codes_to_tokens(category_codes, self.category_sizes, first_cat),
                               codes_to_tokens(sid_codes, self.ids.level_sizes, first_sid)], 1)

    def setup(self, category_codes: np.ndarray, category_sizes: list[int], ids: SemanticIds, sid_codes: np.ndarray,
              alive: np.ndarray | None, seed: int) -> None:
        """Vocabulary, item space and an untrained model for a catalogue (market or offline)."""
        self.ids, self.category_sizes = ids, list(category_sizes)
        _, _, vocab = self.vocab_layout()
        self.space = ItemSpace(self.item_tokens(category_codes, sid_codes), self.n_categories, vocab, alive)
        positions = 2 + (self.prompt_items + 1) * self.space.span
        self.model = build_encoder(vocab, self.hidden, self.layers, self.heads, positions, seed,
                                   prefix_attention=self.history_attention == "prefix").to(self.device)
        if self.method is not None:
            from agorasim.rl.trainer import Trainer

            self.trainer = Trainer(self, self.rl, self.method)

    def _grow(self, catalogue: CatalogueView, rng: np.random.Generator) -> None:
        n = catalogue.n
        content = catalogue.content[:n].astype(np.float32)
        if self.ids is None:
            ids = SemanticIds(levels=self.levels, codebook_size=min(self.codebook_size, max(2, n // 4)))
            codes = ids.fit(content, seed=int(rng.integers(2**31)))
            cat_codes, sizes = child_index_codes(catalogue.category[:n])
            self.category_paths = np.asarray(catalogue.category[:n], np.int64)
            self.setup(cat_codes, sizes, ids, codes, catalogue.alive[:n], seed=int(rng.integers(2**31)))
        elif len(self.space.item_tokens) < n:
            known = len(self.space.item_tokens)
            sid = self.ids.encode_new(content[known:])
            self.category_paths = np.concatenate([self.category_paths, np.asarray(catalogue.category[known:n], np.int64)])
            cat_codes, _ = child_index_codes(self.category_paths, self.category_sizes)
            tokens = np.concatenate([self.space.item_tokens, self.item_tokens(cat_codes[known:], sid)])
            self.space = ItemSpace(tokens, self.n_categories, self.space.vocab_size, catalogue.alive[:n])
        self._sync(catalogue.alive[:n])

    def _sync(self, alive: np.ndarray) -> None:
        alive = np.asarray(alive[: len(self.space.item_tokens)], bool)
        if not np.array_equal(alive, self.space.alive):
            self.space.update_alive(alive)

    # -- model input -------------------------------------------------------------------------------------
    def prompts(self, history: np.ndarray) -> torch.Tensor:
        """``(B, 2 + P*S)`` rows ``[PAD..] [BOS] item tokens of the last P history items [SEP]``."""
        history = np.asarray(history)[:, -self.prompt_items:]
        if history.shape[1] < self.prompt_items:
            history = np.pad(history, ((0, 0), (self.prompt_items - history.shape[1], 0)), constant_values=-1)
        valid = history >= 0
        per_item = np.where(valid[..., None], self.space.item_tokens[np.maximum(history, 0)], PAD)
        body = per_item.reshape(len(history), -1)
        keep = np.repeat(valid, self.space.span, 1)
        order = np.argsort(keep, axis=1, kind="stable")  # padding to the left
        body, keep = np.take_along_axis(body, order, 1), np.take_along_axis(keep, order, 1)
        ids = np.full((len(history), body.shape[1] + 2), PAD, np.int64)
        ids[:, 1:-1] = body
        ids[:, -1] = SEP
        ids[np.arange(len(history)), body.shape[1] - keep.sum(1)] = BOS
        return torch.from_numpy(ids).to(self.device)

    def span_logprobs(self, prompt: torch.Tensor, partial: torch.Tensor, cache: PrefixCache | None = None,
                      model: nn.Module | None = None) -> torch.Tensor:
        """``(R, K, S, V)`` log-probs at the item positions of ``prompt`` (R, T_p) with the partial
        spans ``partial`` (R, K, S) (``-1``: masked); under prefix attention from ``cache`` (the
        prompts' ``encode_prefix``, computed here when None)."""
        model = self.model if model is None else model
        r, k, s = partial.shape
        span = torch.where(partial >= 0, partial, torch.full_like(partial, MASK))
        if model.prefix_attention:
            cache = model.encode_prefix(prompt) if cache is None else cache
            return torch.log_softmax(model.span_logits(cache, span).float(), -1)
        ids = torch.cat([prompt.repeat_interleave(k, 0), span.reshape(r * k, s)], 1)
        return torch.log_softmax(model(ids, span=s).float(), -1).view(r, k, s, -1)

    def chunking(self) -> dict[str, int]:
        """``chunks`` and ``workers`` of ``threads.map_chunks``: how this policy splits a decoding batch."""
        return {"chunks": self.chunks, "workers": resolve_workers(self.chunk_workers, self.chunks)}

    @torch.no_grad()
    def decode(self, history: np.ndarray, beams: int, mode: str | None = None, id_order: str | None = None,
               chunk: int = 128) -> Decoded:
        """Diffusion beam search for every row of ``history``.

        The rows are cut into ``chunks`` contiguous pieces (more where a piece would exceed
        ``chunk`` prompts), decoded at once on the chunk threads; every prompt's beams are its own,
        so the result is that of one pass."""
        self.model.eval()
        mode, id_order = mode or self.mode, id_order or self.id_order

        def search(start: int, stop: int) -> Decoded:
            prompt = self.prompts(history[start:stop])
            cache = self.model.encode_prefix(prompt) if self.model.prefix_attention else None
            return diffusion_beam_search(lambda partial: self.span_logprobs(prompt, partial, cache), len(prompt),
                                         self.space, beams, mode, self.overlap_penalty, id_order, self.device)

        split = self.chunking()
        parts = map_chunks(search, chunk_bounds(len(history), split["chunks"], chunk), split["workers"])
        if not parts:
            s = self.space.span
            empty = np.zeros((0, beams), np.int64)
            return Decoded(np.zeros((0, beams, s), np.int64), np.zeros((0, beams)), empty,
                           np.zeros((0, beams, s), np.int64), empty)
        return Decoded(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("sequences", "scores", "items", "fill_order", "first_position")))

    def valid_slate(self, decoded: Decoded) -> tuple[np.ndarray, np.ndarray]:
        """Items and scores with every non-item replaced by the nearest listed item not in its row."""
        items, scores = decoded.items.copy(), decoded.scores.copy()
        for col in range(items.shape[1]):  # left to right so a replacement avoids the items before it
            bad = np.flatnonzero((items[:, col] < 0) & np.isfinite(scores[:, col]))
            if len(bad):
                items[bad, col] = self.space.nearest_items(decoded.sequences[bad, col], items[bad])
        scores = np.where(items >= 0, scores, -np.inf)
        return items, scores

    # -- contract ------------------------------------------------------------------------------------------
    def recommend(self, request: RecommendRequest, rng: np.random.Generator):
        self.served = (request.users.copy(), request.history.copy())
        if not self.ready:
            return self.behaviour.recommend(request, rng)
        self._sync(request.alive)
        k = min(self.beams, request.k)
        with torch_threads(self.threads):
            decoded = self.decode(request.history, k)
        real = np.isfinite(decoded.scores)
        self.counts["beams"] += float(real.sum())
        self.counts["invalid"] += float(decoded.invalid.sum())
        top = decoded.first_position[:, 0]
        self.counts["first_position"] += np.bincount(top[top >= 0], minlength=8)[:8]
        items, scores = self.valid_slate(decoded)
        pad = request.k - items.shape[1]
        if pad > 0:
            items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return items, scores

    def update(self, obs: Observation, rng: np.random.Generator) -> dict[str, float]:
        with torch_threads(self.threads):
            metrics = self._update(obs, rng)
        if self.ready and self.counts["beams"]:
            first = self.counts["first_position"]
            metrics["train/mindrec/invalid"] = float(self.counts["invalid"])
            metrics["train/mindrec/invalid_share"] = float(self.counts["invalid"] / self.counts["beams"])
            for position in range(self.levels + 1):
                metrics[f"train/mindrec/first_filled_{position + 1}"] = float(first[position] / max(first.sum(), 1))
        self.counts = self._fresh_counts()
        return metrics

    def _update(self, obs: Observation, rng: np.random.Generator) -> dict[str, float]:
        started = time.perf_counter()
        self._grow(obs.catalogue, rng)
        if not self.ready:
            self.behaviour.update(obs, rng)
            if obs.round + 1 < self.warmup_rounds:
                return {}
            metrics = self.sft(obs.log, rng, self.sft_epochs)
            self.ready = True
            if self.trainer is not None:
                self.trainer.begin()
            metrics["time/seconds"] = time.perf_counter() - started
            return metrics
        if self.trainer is None or (obs.round + 1) % self.grpo_every or self.served is None or self.oracle is None:
            return {}
        return self._train_step(obs, rng)

    # -- training ------------------------------------------------------------------------------------------
    def sft(self, log: LogView, rng: np.random.Generator, epochs: int) -> dict[str, float]:
        """Masked-diffusion training on the logged clicks (each predicted from the earlier ones)."""
        from agorasim.rl.sft import click_pairs

        users, items, _ = log.clicks()
        history, targets = click_pairs(users, items, self.prompt_items)
        if len(targets) == 0:
            return {"train/sft_loss": float("nan"), "train/sft_examples": 0.0}
        generator = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**31)))
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.sft_lr)
        losses = []
        for _ in range(epochs):
            losses += self.train_epoch(optimizer, history, targets, generator)
        return {"train/sft_loss": float(np.mean(losses[-max(1, len(losses) // epochs):])),
                "train/sft_examples": float(len(targets))}

    def train_epoch(self, optimizer, history: np.ndarray, targets: np.ndarray, generator: torch.Generator,
                    grad_clip: float = 1.0, scheduler=None) -> list[float]:
        """One shuffled pass of ``masked_diffusion_loss``; returns the batch losses."""
        self.model.train()
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(
            int(torch.randint(2**31, (1,), generator=generator, device=generator.device))))
        losses = []
        for start in range(0, len(order), self.sft_batch):
            rows = order[start:start + self.sft_batch].numpy()
            target = torch.as_tensor(self.space.item_tokens[targets[rows]], device=self.device)
            loss = masked_diffusion_loss(self.model, self.prompts(history[rows]), target, self.mask_eps, generator)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
        return losses

    def _train_step(self, obs: Observation, rng: np.random.Generator) -> dict[str, float]:
        from agorasim.rl.judges import CriticJudge, OracleJudge
        from agorasim.rl.trainer import Prompts

        users, history = self.served
        if len(users) == 0:
            return {}
        pick = np.sort(rng.choice(len(users), min(self.rl.users_per_step, len(users)), replace=False))
        users, history = users[pick], history[pick]
        target = obs.log.clicked_item(obs.round, users)
        generator = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**31)))
        if self.rl.mode == "counterfactual":
            judge = OracleJudge(self.oracle)
        else:
            judge = CriticJudge(self.oracle, self.critic, obs.log, obs.catalogue, obs.round)
        return self.trainer.step(Prompts(users, history, target, obs.round), judge, generator)

    def trajectory_logprobs(self, model: nn.Module, prompt: torch.Tensor, sequences: torch.Tensor,
                            fill_order: torch.Tensor) -> torch.Tensor:
        """``(N, S)`` log-prob of the token filled at each decoding step given the span before it.

        Args:
            model: the denoiser (the policy's or the reference).
            prompt: ``(N / G, T_p)`` the prompts; completions ``G`` consecutive rows per prompt.
            sequences: ``(N, S)`` the final spans.
            fill_order: ``(N, S)`` the step at which each position was filled.
        """
        n, s = sequences.shape
        steps = torch.arange(s, device=sequences.device)
        # state before step t: the positions filled at earlier steps (-1: still masked)
        states = torch.where(fill_order[:, None, :] < steps[None, :, None], sequences[:, None, :],
                             torch.full_like(sequences[:, None, :], -1))  # (N, S_steps, S)
        logp = self.span_logprobs(prompt, states.reshape(len(prompt), -1, s), model=model).view(n, s, s, -1)
        position = torch.argsort(fill_order, 1)  # (N, S): position filled at step t
        token = torch.gather(sequences, 1, position)
        rows = torch.arange(n, device=sequences.device)[:, None]
        return logp[rows, steps[None, :], position, token]


# -- in-loop training: GRPO over the denoising trajectory ------------------------------------------------------
class DiffusionGRPO(Method):
    """GRPO whose completions are MindRec's G diffusion beams (module docstring).

    The log-probability of a completion is that of its denoising trajectory (``trajectory_logprobs``),
    so the trainer's causal-LM log-prob passes are not used (``policy_gradient = False``: this method
    computes its own loss, the same ``rl.losses.policy_loss``).
    """

    name = "mindrec-grpo"
    policy_gradient = False

    def rollout(self, trainer, prompts, generator):
        policy = trainer.policy
        decoded = policy.decode(prompts.history, self.config.group_size)
        n, g, s = decoded.sequences.shape
        real = np.isfinite(decoded.scores)
        prompt = policy.prompts(prompts.history)
        sequences = torch.as_tensor(np.maximum(decoded.sequences, 0).reshape(n * g, s), device=policy.device)
        order = np.where(real[..., None], decoded.fill_order, np.arange(s)).reshape(n * g, s)
        return Rollout(decoded.items, np.where(real, decoded.scores, 0.0), prompt, torch.ones_like(prompt),
                       sequences, torch.as_tensor(np.repeat(real.reshape(-1, 1), s, 1), device=policy.device),
                       extra={"fill_order": torch.as_tensor(order, device=policy.device),
                              "invalid": float(decoded.invalid.sum()), "beams": float(real.sum())})

    def score(self, trainer, prompts, rollout, judge):
        from agorasim.rl.advantages import combine
        from agorasim.rl.grpo import reward_context
        from agorasim.rl.rewards import compute_rewards

        rl = self.config
        ctx = reward_context(prompts, rollout, judge, need_judgement=bool({"rating", "click"} & set(rl.rewards)))
        rewards = compute_rewards(ctx, rl.rewards)
        invalid = rollout.items < 0  # a non-item (or a missing beam) earns nothing
        rewards = {name: np.where(invalid, 0.0, value) for name, value in rewards.items()}
        advantages = combine(rewards, rl.rewards, rl.reward_mode, rl.advantage_scale)
        total = sum(rl.rewards[name] * rewards[name] for name in rewards)
        beams = max(rollout.extra["beams"], 1.0)
        return Scored(rewards, total, advantages, {"mindrec/rollout_invalid_share": rollout.extra["invalid"] / beams})

    def loss(self, trainer, rollout, scored, old_logp, ref_logp):
        from agorasim.rl.losses import policy_loss

        rl, policy = self.config, trainer.policy
        g = rollout.group_size
        prompt = rollout.prompt_ids
        order = rollout.extra["fill_order"]
        logp = policy.trajectory_logprobs(policy.model, prompt, rollout.completions, order)
        ref = None
        if rl.beta > 0 and trainer.reference is not None:
            with torch.no_grad():
                ref = policy.trajectory_logprobs(trainer.reference, prompt, rollout.completions, order)
        advantage = torch.as_tensor(np.asarray(scored.advantages, np.float32).reshape(-1), device=logp.device)
        loss, stats = policy_loss(logp, logp.detach(), advantage, rollout.token_mask, rl.loss, ref_logp=ref,
                                  beta=rl.beta, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high,
                                  group_size=g, kl_estimator=rl.kl_estimator)
        return loss, stats
