"""Constrained decoding over the catalogue trie: batched beam search, sampling and teacher forcing.

A generative recommender emits an item as its path of L+1 semantic-id codes (see
``semantic_ids``). Only paths of items currently on the market are valid, so decoding is
constrained to the *catalogue trie*: after a prefix of l codes the next code must extend some
alive item's path.

**Tables.** Prefix ids are assigned per level: level 0 has the single empty prefix 0; level l has
one id per distinct l-code prefix of an alive item, numbered in lexicographic order. For each
level l the trie stores, for every level-l prefix and every code c of that level, the *child*: the
id of the (l+1)-prefix it leads to, the item id at the last level, or -1 when no alive item has
that path (so "allowed" is ``child >= 0``). A level is stored densely, ``(n_prefixes, level_size)``
int32, when that has at most ``dense_limit`` entries (default 2^20, 4 MB); otherwise as CSR rows
(``ptr``, ``code``, ``target``: O(alive items) memory) and the few rows a decoding step needs are
scattered into a dense block on the fly. For 20k items and 3x256 codes that makes levels 0, 1 and
the de-duplication level dense (256, 65k and ~20k x dedup entries, about 1 MB) and level 2 CSR
(~18k prefixes x 256 = 4.7M entries, 19 MB dense; 0.5 MB as CSR).

**Scores.** A token's score is its log-probability under the model's *full-vocabulary*
``log_softmax``; disallowed tokens are then set to -inf (no renormalisation over the allowed set).
This is what transformers' ``PrefixConstrainedLogitsProcessor`` does in beam search, so our beams
and scores equal ``model.generate(..., prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(T),
length_penalty=0.0)``, and ``token_logprobs`` of a returned item sums to its beam score.

**Batching.** One Python iteration per code level (L+1 of them); beams, samples and prompts are
tensor rows, and each step is one model call with the KV cache. Two cache layouts give the same
results (tests check both against the reference):

- expanded (``_ExpandedRows``): the prompts run once (B rows), then the cache is expanded to B*G
  rows and reordered with ``Cache.reorder_cache`` after each step, as transformers' beam search
  does (but without running the prompt G times). Works with any attention implementation.
- shared prompt (``_SharedPromptRows``, the default where it fits): each prompt stays one cache
  row and its G continuations are appended to it, a 4D attention mask letting each token see only
  the prompt and its own ancestors. No cache copies; about 2x faster for 16 beams.

Prompts must be left-padded; positions are ``cumsum(attention_mask) - 1``, as transformers'
``generate`` makes them. Tie-breaking in beam search: equal scores go to the lower flat index
``beam * level_size + code`` (transformers' ``topk`` leaves ties unspecified; with real-valued
scores ties do not occur in practice).

**Per-prompt item masks.** ``beam_search`` and ``sample`` take an optional ``(B, n_items)`` bool
``item_mask``: prompt b may only produce items allowed by row b (on top of the alive set), e.g. to
exclude what a user already has or to decode lists without repeats (``sample_list``). The trie
keeps each alive item's prefix id at every level (``item_prefix``); a call turns the mask into,
per level, a ``(B, n_prefixes)`` table "this prefix has an allowed alive item below it" (one
``index_add_`` per level), and a step drops the children whose entry is False for the row's
prompt, exactly like children the trie does not have. So beams and samples never enter a dead
end, and the result for prompt b equals decoding on a trie whose alive set is
``alive & item_mask[b]``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from agorasim.policy import fastlm
from agorasim.policy.semantic_ids import token_offsets
from agorasim.policy.threads import chunk_bounds, map_chunks

_DENSE_LIMIT = 1 << 20  # entries of a dense child table (int32: 4 MB) before a level switches to CSR


@dataclass
class _Level:
    """Child table of one level: dense ``(n_prefixes, size)`` or CSR (``ptr``, ``code``, ``target``)."""

    size: int
    dense: torch.Tensor | None
    ptr: torch.Tensor | None = None  # (n_prefixes + 1,) start of each prefix's children in code/target
    code: torch.Tensor | None = None  # (n_edges,) code of each child, sorted within a prefix
    target: torch.Tensor | None = None  # (n_edges,) child prefix id (item id at the last level)

    def to(self, device: torch.device) -> _Level:
        move = (lambda t: None if t is None else t.to(device))
        return _Level(self.size, move(self.dense), move(self.ptr), move(self.code), move(self.target))

    def children(self, prefix: torch.Tensor) -> torch.Tensor:
        """Child ids (R, size) int32 of prefixes ``prefix`` (R,); -1 where not allowed or prefix < 0."""
        valid = prefix >= 0
        p = prefix.clamp(min=0).long()
        if self.dense is not None:
            return self.dense[p].masked_fill_(~valid[:, None], -1)
        start = self.ptr[p]
        count = (self.ptr[p + 1] - start) * valid
        # row r's children are edges start[r] .. start[r] + count[r] - 1, laid out one after another
        rows = torch.repeat_interleave(torch.arange(len(p), device=p.device), count)
        first = torch.cumsum(count, 0) - count
        edge = torch.repeat_interleave(start - first, count) + torch.arange(len(rows), device=p.device)
        out = torch.full((len(p), self.size), -1, dtype=torch.int32, device=p.device)
        out[rows, self.code[edge]] = self.target[edge]
        return out


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_tokens: torch.Tensor,
                   return_entropy: bool = False, return_log_softmax: bool = False, shared_prompt: bool = True,
                   chunks: int = 1, workers: int = 1):
    """Teacher-forced log-probabilities of item token paths after their prompts (differentiable).

    Args:
        model: a transformers causal LM.
        input_ids: (B, T) left-padded prompts; B == N, or N a multiple of B (each prompt then
            serves N // B consecutive paths, as a GRPO group).
        attention_mask: (B, T).
        item_tokens: (N, L+1) token paths (non-negative).
        return_entropy: also return the entropy of the full-vocabulary distribution at each position
            (a statistic, without gradient).
        return_log_softmax: also return the (N, L+1, V) full-vocabulary log-softmax at each
            position (to renormalise over allowed codes, or read other tokens' log-probs).
        shared_prompt: with N a multiple of B, run each prompt once and continue its paths from
            its KV cache (``_group_logits``); False runs N full copies (the reference layout, for
            tests and ``benchmarks/grpo_step.py``).
        chunks: cut the prompts into this many contiguous chunks (``threads.chunk_bounds``), each
            with its paths, and run them on up to ``workers`` Python threads
            (``threads.map_chunks``). The values are those of one pass (each row is computed
            alone); with gradients, each chunk's backward runs on its own too (``_ChunkedPass``)
            and the parameter gradients are summed in chunk order, which rounds differently from
            one backward over the whole batch. 1: one pass, as before.
        workers: worker threads for the chunks (the results do not depend on it).

    Returns:
        (N, L+1) full-vocabulary log-probs of every path token (their row sum is the beam score),
        then the (N, L+1) entropies with ``return_entropy`` and the log-softmax with
        ``return_log_softmax``, in that order.
    """
    item_tokens = torch.as_tensor(item_tokens, dtype=torch.long, device=input_ids.device)
    n, depth = item_tokens.shape
    batch = input_ids.shape[0]
    if n != batch and (batch == 0 or n % batch):
        raise ValueError(f"token_logprobs: {n} paths cannot be split evenly over {batch} prompts")
    if chunks > 1 and batch > 1:
        return _chunked_token_logprobs(model, input_ids, attention_mask, item_tokens, return_entropy,
                                       return_log_softmax, shared_prompt, chunks, workers)
    if (item_tokens < 0).any():
        raise ValueError("token_logprobs: item_tokens must be non-negative token ids (no -1 padding)")
    attention_mask = _check_left_padded(attention_mask)
    if n != batch and shared_prompt:  # a group of paths per prompt: the prompt runs once, its cache shared
        logits = _group_logits(model, input_ids, attention_mask, item_tokens, n // batch)
    else:
        if n != batch:
            input_ids = input_ids.repeat_interleave(n // batch, 0)
            attention_mask = attention_mask.repeat_interleave(n // batch, 0)
        ids = torch.cat([input_ids, item_tokens], 1)
        mask = torch.nn.functional.pad(attention_mask, (0, depth), value=1)
        # logits at positions T-1 .. T+L-2 predict the path tokens (the one after the path is unused)
        logits, _ = _forward(model, ids, mask, _positions(mask), keep=depth + 1, use_cache=False)
        logits = logits[:, -(depth + 1):-1]
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, item_tokens[..., None]).squeeze(-1)
    out = [logp]
    if return_entropy:
        with torch.no_grad():  # a statistic: building its graph cost a (N, L+1, V) exp and product
            out.append(-(logp_all.exp() * logp_all).sum(-1))
    if return_log_softmax:
        out.append(logp_all)
    return out[0] if len(out) == 1 else tuple(out)


def _chunked_token_logprobs(model, input_ids, attention_mask, item_tokens, return_entropy: bool,
                            return_log_softmax: bool, shared_prompt: bool, chunks: int, workers: int):
    """``token_logprobs`` over contiguous chunks of the prompts (and their paths), one pass each;
    ``item_tokens`` is a tensor of ``len(input_ids) * per`` paths (checked by the caller)."""
    batch = len(input_ids)
    per = len(item_tokens) // batch
    bounds = chunk_bounds(batch, chunks)

    def run(start: int, stop: int):
        out = token_logprobs(model, input_ids[start:stop], attention_mask[start:stop],
                             item_tokens[start * per:stop * per], return_entropy, return_log_softmax, shared_prompt)
        return out if isinstance(out, tuple) else (out,)

    if not torch.is_grad_enabled():
        parts = map_chunks(run, bounds, workers)
        out = tuple(torch.cat(values) for values in zip(*parts))
    else:
        params = tuple(p for p in model.parameters() if p.requires_grad)
        out = _ChunkedPass.apply(run, bounds, workers, return_entropy, *params)
    return out[0] if len(out) == 1 else out


class _ChunkedPass(torch.autograd.Function):
    """A differentiable pass computed chunk by chunk, each chunk's backward on its own thread.

    ``forward`` runs ``run(start, stop)`` for every chunk with gradients enabled (on the pool:
    each chunk builds its own graph to the parameters) and returns the chunks' outputs
    concatenated; ``backward`` sends each chunk its slice of the incoming gradients through
    ``torch.autograd.grad`` (on the pool again) and returns the parameter gradients summed in
    chunk order, so the whole loss upstream keeps its usual form (a mean over all tokens, a group
    normalisation across chunks) and ``loss.backward()`` is unchanged. Output 1 is the entropy
    when ``return_entropy`` (a statistic: not differentiable).
    """

    @staticmethod
    def forward(ctx, run, bounds, workers, entropy_output, *params):
        with torch.enable_grad():
            parts = map_chunks(run, bounds, workers)
        ctx.parts, ctx.workers, ctx.params = parts, workers, params
        out = tuple(torch.cat([p.detach() for p in values]) for values in zip(*parts))
        if entropy_output:
            ctx.mark_non_differentiable(out[1])
        ctx.entropy_output = entropy_output
        return out

    @staticmethod
    def backward(ctx, *grads):
        parts, params = ctx.parts, ctx.params
        used = [k for k, g in enumerate(grads) if g is not None and not (ctx.entropy_output and k == 1)]
        sizes = [len(values[0]) for values in parts]
        starts = np.r_[0, np.cumsum(sizes)]

        def chunk_grad(c: int, _stop: int):
            outputs = [parts[c][k] for k in used]
            slices = [grads[k][starts[c]:starts[c + 1]] for k in used]
            return torch.autograd.grad(outputs, params, slices, allow_unused=True)

        per_chunk = map_chunks(chunk_grad, [(c, c + 1) for c in range(len(parts))], ctx.workers) if used else []
        summed = []
        for i in range(len(params)):
            total = None
            for chunk in per_chunk:  # chunk order: the same sum whichever thread finished first
                g = chunk[i]
                if g is not None:
                    total = g if total is None else total + g
            summed.append(total)
        ctx.parts = None
        return (None, None, None, None, *summed)


_TREE_LIMIT = 1024  # path tokens per prompt up to which the loss pass runs as one tree sequence


def _group_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_tokens: torch.Tensor,
                  group: int) -> torch.Tensor:
    """(N, L+1, V) logits that predict each path token, for ``group`` paths per prompt.

    The B prompts go through the model once (with gradients, into a KV cache); the cache is
    repeated ``group`` times and the N = B*group paths, minus their last token, continue from it.
    The same numbers as running N copies of prompt+path (up to float rounding), at B*T + N*L
    tokens of work instead of N*(T+L+1): with GRPO's 16 paths of 4 tokens per 30-token prompt,
    about 6x less. The gradient reaches the prompt positions through the cache.

    For a model that ``fastlm.trains``, each prompt and its paths are instead one tree sequence
    of ``T + group*(L)`` tokens in one differentiable call (``_tree_logits``): the same logits
    without copying the prompt's keys for every path. Its attention grows with the square of
    ``group * L``, so groups beyond ``_TREE_LIMIT`` path tokens per prompt keep the cache layout.
    """
    if 1 < item_tokens.shape[1] and group * (item_tokens.shape[1] - 1) <= _TREE_LIMIT and fastlm.trains(model):
        return _tree_logits(model, input_ids, attention_mask, item_tokens, group)
    positions = _positions(attention_mask)
    first, cache = _forward(model, input_ids, attention_mask, positions, keep=1)
    first = first[:, -1:].repeat_interleave(group, 0)  # position T-1 predicts the first path token
    depth = item_tokens.shape[1]
    if depth == 1:
        return first
    cache.batch_repeat_interleave(group)
    mask = torch.nn.functional.pad(attention_mask.repeat_interleave(group, 0), (0, depth - 1), value=1)
    steps = torch.arange(1, depth, device=positions.device)
    path_positions = positions[:, -1:].repeat_interleave(group, 0) + steps
    rest, _ = _forward(model, item_tokens[:, :-1], mask, path_positions, cache=cache, keep=depth - 1)
    return torch.cat([first, rest[:, -(depth - 1):]], 1)


def _tree_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_tokens: torch.Tensor,
                 group: int) -> torch.Tensor:
    """``_group_logits`` as one ``fastlm.forward`` call per prompt row: the sequence is the prompt's
    T tokens, then the first L tokens of each of its ``group`` paths; a path token sees the
    prompt's real tokens and its own path's tokens up to itself, at the positions it would have
    after the prompt. Logits are kept for the prompt's last token (it predicts every path's first
    token) and every path token."""
    batch, width = input_ids.shape
    depth = item_tokens.shape[1]
    steps = depth - 1
    paths = item_tokens[:, :-1].reshape(batch, group * steps)
    ids = torch.cat([input_ids, paths], 1)
    positions = _positions(attention_mask)
    path_positions = positions[:, -1:] + 1 + torch.arange(steps, device=positions.device).repeat(group)
    size = width + group * steps
    mask = torch.zeros(batch, size, size, dtype=torch.bool, device=input_ids.device)
    mask[:, :width, :width] = fastlm.prompt_mask(attention_mask)[:, 0]
    mask[:, width:, :width] = attention_mask.bool()[:, None, :]
    path = torch.arange(group * steps, device=input_ids.device).div(steps, rounding_mode="floor")
    step = torch.arange(group * steps, device=input_ids.device) % steps
    mask[:, width:, width:] = (path[:, None] == path[None, :]) & (step[None, :] <= step[:, None])
    logits, _ = _forward(model, ids, mask[:, None], torch.cat([positions, path_positions], 1),
                         keep=group * steps + 1, use_cache=False)
    first = logits[:, :1].repeat_interleave(group, 0)  # (N, 1, V)
    rest = logits[:, 1:].reshape(batch * group, steps, -1)
    return torch.cat([first, rest], 1)


class CatalogueTrie:
    """The alive items' semantic-id paths as per-level child tables, and decoding constrained to them.

    Attributes:
        codes: (n_items, L+1) int64 code paths of all items (alive or not).
        level_sizes: codes per level; level l code c is token ``offsets[l] + c``.
        first_token: vocabulary id of level 0 code 0.
        offsets: (L+1,) int64 token id of code 0 of every level.
        alive: (n_items,) bool, the items decoding may produce.
        n_prefixes: number of distinct alive prefixes per level (level 0: 1).
        item_prefix: (n_items, L+1) int64, the id of each alive item's level-l prefix in column l
            (column 0 is the empty prefix 0); -1 rows for dead items. Maps item masks to prefixes.
    """

    def __init__(self, codes: np.ndarray, level_sizes, first_token: int, alive: np.ndarray | None = None,
                 dense_limit: int = _DENSE_LIMIT):
        """
        Args:
            codes: (n, L+1) code paths, unique among alive items.
            level_sizes: L+1 ints, codes per level.
            first_token: vocabulary id of level 0 code 0.
            alive: (n,) bool; None means all items.
            dense_limit: largest dense table (entries) before a level is stored as CSR.
        """
        codes = np.asarray(codes, np.int64)
        sizes = np.asarray(level_sizes, np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(sizes):
            raise ValueError(f"trie: codes must be (n, {len(sizes)}) for level_sizes={list(level_sizes)}, "
                             f"got shape {codes.shape}")
        if ((codes < 0) | (codes >= sizes)).any():
            raise ValueError("trie: every code must lie in [0, level_sizes[level])")
        self.codes = codes
        self.level_sizes = [int(s) for s in sizes]
        self.first_token = int(first_token)
        self.offsets = token_offsets(self.level_sizes, self.first_token)
        self.dense_limit = int(dense_limit)
        self.update_alive(np.ones(len(codes), bool) if alive is None else alive)

    @property
    def depth(self) -> int:
        """Codes per item path (L + 1)."""
        return len(self.level_sizes)

    @property
    def n_alive(self) -> int:
        return int(self.alive.sum())

    # -- tables -------------------------------------------------------------------------------------
    def update_alive(self, alive: np.ndarray) -> None:
        """Rebuild the tables for a new set of alive items (one lexsort, O(n log n))."""
        alive = np.asarray(alive, bool)
        if alive.shape != (len(self.codes),):
            raise ValueError(f"trie: alive must be ({len(self.codes)},) bool, got shape {alive.shape}")
        self.alive = alive.copy()
        ids = np.flatnonzero(alive)
        paths = self.codes[ids]
        order = np.lexsort(paths.T[::-1])  # lexsort's primary key is the last one given
        paths, ids = paths[order], ids[order]
        m, depth = paths.shape
        # starts[r, l]: row r begins a new l-code prefix (column 0: the empty prefix, begun by row 0)
        starts = np.ones((m, depth + 1), bool)
        if m > 1:
            starts[1:, 0] = False
            starts[1:, 1:] = np.logical_or.accumulate(paths[1:] != paths[:-1], axis=1)
        if not starts[:, depth].all():
            raise ValueError("trie: two alive items share one code path; semantic ids must be unique")
        prefix = np.cumsum(starts, axis=0) - 1  # (m, depth+1): id of each row's l-prefix at level l
        self.n_prefixes = [int(prefix[-1, l] + 1) if m else int(l == 0) for l in range(depth)]
        self.item_prefix = np.full((len(self.codes), depth), -1, np.int64)
        self.item_prefix[ids] = prefix[:, :depth]
        self._levels = []
        for level in range(depth):
            edges = starts[:, level + 1]  # rows that begin a new (l+1)-prefix: one edge each
            parent, code = prefix[edges, level], paths[edges, level]
            target = prefix[edges, level + 1] if level + 1 < depth else ids[edges]
            n_parent, size = self.n_prefixes[level], self.level_sizes[level]
            if n_parent * size <= self.dense_limit:
                # int32: half the memory traffic of int64 when a step gathers (beams, size) rows
                dense = torch.full((n_parent, size), -1, dtype=torch.int32)
                dense[torch.from_numpy(parent), torch.from_numpy(code)] = torch.from_numpy(target).int()
                self._levels.append(_Level(size, dense))
            else:
                ptr = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n_parent))])
                self._levels.append(_Level(size, None, torch.from_numpy(ptr), torch.from_numpy(code.copy()),
                                           torch.from_numpy(target.astype(np.int32))))
        self._on_device: dict[str, list[_Level]] = {}
        self._prefix_on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._token_table: dict[tuple[int, ...], list[int]] | None = None

    def _levels_on(self, device: torch.device) -> list[_Level]:
        if device.type == "cpu":
            return self._levels
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = [level.to(device) for level in self._levels]
        return self._on_device[key]

    def _item_prefix_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``item_prefix`` (n_items, L+1) int64 and ``alive`` (n_items,) bool as tensors on ``device``."""
        key = str(device)
        if key not in self._prefix_on:
            self._prefix_on[key] = (torch.from_numpy(self.item_prefix).to(device),
                                    torch.from_numpy(self.alive).to(device))
        return self._prefix_on[key]

    def allowed_children(self, item_mask: torch.Tensor | None, batch: int, device: torch.device,
                         with_counts: bool = False):
        """Per-prompt tables of the children an item mask leaves, one per level; None without a mask.

        Args:
            item_mask: (B, n_items) bool, row b the items prompt b may produce (alive or not: dead
                items are never produced anyway), or None.
            batch: B, to check the mask's shape.
            device: where the tables go (the decoding device).
            with_counts: also return the int32 counts behind the tables (for ``remove_allowed``).

        Returns:
            None when ``item_mask`` is None; else L+1 bool tensors, entry l of shape
            (B, n_prefixes[l+1]) (at the last level (B, n_items)): whether the level-l child id
            (an (l+1)-prefix, or an item at the last level) has an allowed alive item below it.
            With ``with_counts``: (tables, counts), counts the L int32 tensors of allowed alive
            items below each prefix of levels 1..L.
        """
        if item_mask is None:
            return None
        item_mask = torch.as_tensor(item_mask, device=device)
        if item_mask.dtype != torch.bool or item_mask.shape != (batch, len(self.codes)):
            raise ValueError(f"decoding: item_mask must be a ({batch}, {len(self.codes)}) bool tensor, got "
                             f"{item_mask.dtype} of shape {tuple(item_mask.shape)}")
        item_prefix, alive = self._item_prefix_on(device)
        allowed = item_mask & alive
        # integer counts of allowed items per prefix: exact and deterministic on any device,
        # unlike a float scatter; dead items (prefix -1, clamped to 0) add zeros
        ones = allowed.int()
        tables, counts = [], []
        for level in range(1, self.depth):
            count = torch.zeros(batch, self.n_prefixes[level], dtype=torch.int32, device=device)
            counts.append(count.index_add_(1, item_prefix[:, level].clamp(min=0), ones))
            tables.append(count > 0)
        tables.append(allowed)
        return (tables, counts) if with_counts else tables

    def remove_allowed(self, tables: list[torch.Tensor], counts: list[torch.Tensor], rows: torch.Tensor,
                       items: torch.Tensor) -> None:
        """Take item ``items[j]`` out of row ``rows[j]`` of ``allowed_children``'s tables, in place.

        Touches L+1 entries per row instead of rebuilding the tables (``sample_list`` removes each
        drawn item from its list this way). Each item must be allowed and alive in its row, and
        a row may appear once per call.
        """
        item_prefix, _ = self._item_prefix_on(rows.device)
        for level in range(1, self.depth):
            prefix = item_prefix[items, level]
            count = counts[level - 1]
            left = count[rows, prefix] - 1
            count[rows, prefix] = left
            tables[level - 1][rows, prefix] = left > 0
        tables[-1][rows, items] = False

    def children(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """Child ids (R, level_sizes[level]) int32 of level-``level`` prefix ids (R,); -1 = not allowed."""
        return self._levels_on(prefix.device)[level].children(prefix)

    def is_dense(self, level: int) -> bool:
        """Whether level ``level`` is stored as a dense table (else CSR)."""
        return self._levels[level].dense is not None

    def item_tokens(self, items) -> np.ndarray:
        """Token paths (..., L+1) of item ids ``items`` (alive or not); -1 rows where items < 0."""
        items = np.asarray(items, np.int64)
        tokens = self.codes[np.maximum(items, 0)] + self.offsets
        return np.where(items[..., None] >= 0, tokens, -1)

    # -- decoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def beam_search(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int,
                    shared_prompt: bool | None = None,
                    item_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``num_beams`` alive items per prompt by beam search over the trie.

        Standard beam search without length penalty (all paths have L+1 tokens): at each step keep
        the G (beam, code) pairs with the highest cumulative score per prompt, ties to the lower
        flat index ``beam * level_size + code``.

        Args:
            model: a transformers causal LM, in eval mode.
            input_ids: (B, T) left-padded prompts.
            attention_mask: (B, T), 0 on padding.
            num_beams: G.
            shared_prompt: cache each prompt once and decode its beams with a tree attention mask
                (``_SharedPromptRows``); False: one cache row per beam, reordered every step
                (``_ExpandedRows``, works with any attention). None: shared when the model's
                attention takes custom 4D masks (eager, sdpa) and G x L <= 2 T (see ``_rows``).
            item_mask: (B, n_items) bool, the items each prompt may produce (on top of ``alive``);
                None: all alive items. Prompt b's result equals beam search on a trie whose alive
                set is ``alive & item_mask[b]``.

        Returns:
            items (B, G) int64 and scores (B, G) float32 (sums of full-vocabulary log-probs),
            best first; distinct allowed alive items; -1 and -inf where fewer than G items exist.
        """
        if num_beams < 1:
            raise ValueError(f"beam search: num_beams must be >= 1, got {num_beams}")
        batch, beams, device = input_ids.shape[0], num_beams, input_ids.device
        allowed = self.allowed_children(item_mask, batch, device)
        if batch == 0 or self.n_alive == 0:
            return (torch.full((batch, beams), -1, dtype=torch.long, device=device),
                    torch.full((batch, beams), -torch.inf, device=device))
        rows = _rows(model, input_ids, attention_mask, shared_prompt, beams, self.depth - 1)
        logits = rows.logits
        scores = torch.zeros(batch, 1, device=device)  # (B, width): width is 1 before the first step
        prefix = torch.zeros(batch, 1, dtype=torch.long, device=device)
        for level, table in enumerate(self._levels_on(device)):
            size, width = table.size, scores.shape[1]
            start = int(self.offsets[level])
            logp = torch.log_softmax(logits.float(), dim=-1)[:, start:start + size]
            child = table.children(prefix.reshape(-1))  # (B*width, size)
            if allowed is not None:
                child = _restrict(child, allowed[level], batch)
            candidates = (scores.reshape(-1, 1) + logp).masked_fill(child < 0, -torch.inf)
            candidates = candidates.reshape(batch, width * size)
            keep = min(beams, width * size)
            scores, flat = _stable_top_k(candidates, keep)
            prefix = child.reshape(batch, width * size).gather(1, flat).long()
            if keep < beams:  # fewer candidates than beams (tiny catalogues): pad with dead beams
                scores = torch.nn.functional.pad(scores, (0, beams - keep), value=-torch.inf)
                prefix = torch.nn.functional.pad(prefix, (0, beams - keep), value=-1)
                flat = torch.nn.functional.pad(flat, (0, beams - keep), value=0)
            prefix = prefix.masked_fill(torch.isneginf(scores), -1)
            if level + 1 == self.depth:
                break
            logits = rows.advance(flat // size, start + flat % size)
        return prefix, scores

    @torch.no_grad()
    def sample(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_samples: int,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               shared_prompt: bool | None = None, item_mask: torch.Tensor | None = None,
               greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``num_samples`` constrained ancestral samples per prompt (repeats possible).

        Each code is drawn from ``softmax(logits / temperature)`` renormalised over the allowed
        codes, by Gumbel-max with noise from ``generator`` (same generator state, same samples).

        Args:
            model, input_ids, attention_mask, shared_prompt: as in ``beam_search``.
            num_samples: n, samples per prompt.
            temperature: > 0; ignored when ``greedy``.
            generator: source of the Gumbel noise (None: torch's default generator).
            item_mask: (B, n_items) bool, the items each prompt may produce (on top of ``alive``);
                None: all alive items.
            greedy: take the most probable allowed code at every level instead of drawing one
                (lower code on ties; no noise is drawn, so ``generator`` is left untouched).

        Returns:
            items (B, n) int64; logprobs (B, n) float32, the sum of the tokens' full-vocabulary
            log-probabilities at temperature 1 (the same quantity as beam scores and
            ``token_logprobs``, whatever the sampling temperature); tokens (B, n, L+1) int64.
            Samples are in draw order. A prompt whose mask allows no alive item gets -1 items and
            tokens and -inf logprobs.
        """
        if num_samples < 1:
            raise ValueError(f"sample: num_samples must be >= 1, got {num_samples}")
        if not temperature > 0:
            raise ValueError(f"sample: temperature must be > 0, got {temperature}")
        batch, n, device = input_ids.shape[0], num_samples, input_ids.device
        allowed = self.allowed_children(item_mask, batch, device)
        items = torch.full((batch * n,), -1, dtype=torch.long, device=device)
        total = torch.zeros(batch * n, device=device)
        tokens = torch.full((batch * n, self.depth), -1, dtype=torch.long, device=device)
        if batch == 0 or self.n_alive == 0:
            return items.view(batch, n), total.fill_(-torch.inf).view(batch, n), tokens.view(batch, n, -1)
        rows = _rows(model, input_ids, attention_mask, shared_prompt, n, self.depth - 1)
        logits = rows.logits.repeat_interleave(n, 0)
        parent = torch.zeros(batch, n, dtype=torch.long, device=device)  # all samples start at the prompt
        prefix = torch.zeros(batch * n, dtype=torch.long, device=device)
        for level, table in enumerate(self._levels_on(device)):
            prefix, token, logp = self._draw(logits, level, table, prefix, allowed, batch, greedy, temperature,
                                             generator)
            total += logp
            tokens[:, level] = token
            if level + 1 == self.depth:
                break
            logits = rows.advance(parent, tokens[:, level].view(batch, n))
            parent = torch.arange(n, device=device).expand(batch, n)  # each sample continues itself
        items = prefix
        total = total.masked_fill(items < 0, -torch.inf)
        tokens = tokens.masked_fill(items[:, None] < 0, -1)
        return items.view(batch, n), total.view(batch, n), tokens.view(batch, n, -1)

    def _draw(self, logits: torch.Tensor, level: int, table: _Level, prefix: torch.Tensor,
              allowed: list[torch.Tensor] | None, batch: int, greedy: bool, temperature: float,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level of constrained ancestral sampling for every row: (child prefix, token, its
        full-vocabulary log-prob). Rows are prompt-major over ``batch`` prompts."""
        start = int(self.offsets[level])
        logp = torch.log_softmax(logits.float(), dim=-1)[:, start:start + table.size]
        child = table.children(prefix)
        if allowed is not None:
            child = _restrict(child, allowed[level], batch)
        if greedy:
            key = logp.masked_fill(child < 0, -torch.inf)
        else:
            key = (logp / temperature + gumbel(logp.shape, generator, logp.device)).masked_fill(child < 0, -torch.inf)
        # a row with no allowed code (its mask allows nothing) takes code 0, whose child is -1:
        # it stays dead from here on and comes out as item -1
        code = key.argmax(dim=1, keepdim=True)
        return child.gather(1, code).squeeze(1).long(), start + code.squeeze(1), logp.gather(1, code).squeeze(1)

    @torch.no_grad()
    def sample_list(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
                    num_samples: int = 1, temperature: float = 1.0, generator: torch.Generator | None = None,
                    item_mask: torch.Tensor | None = None, greedy: bool = False,
                    shared_prompt: bool | None = None, cached: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``num_samples`` ordered lists of ``length`` distinct items per prompt, item by item.

        Item k of a list is drawn as by ``sample`` after the prompt followed by the token paths of
        the list's items 1..k-1 (appended as they are, no separator), excluding those items. So a
        list's probability is the product of its items' constrained probabilities, and with
        ``greedy`` a list is greedy decoding repeated with exclusion.

        With ``cached`` (the default) the B prompts run once and each of the B x num_samples lists
        then continues its own KV cache one token at a time, so the work is B*T + B*S*K*(L+1)
        tokens. ``cached=False`` is the reference: one ``sample`` call per position, each running
        the grown prompts afresh, sum_k B*S*(T + k*(L+1)) tokens. Both draw the same noise in the
        same order, so they give the same lists up to float rounding.

        Args:
            model, input_ids, attention_mask, shared_prompt: as in ``beam_search``
                (``shared_prompt`` applies to ``cached=False`` only).
            length: K, items per list.
            num_samples: S, lists per prompt.
            temperature, generator, greedy: as in ``sample``.
            item_mask: (B, n_items) bool, the items each prompt's lists may contain; None: all alive.

        Returns:
            items (B, S, K) int64, -1 once a list has run out of allowed items; logprobs (B, S, K)
            float32, each item's full-vocabulary token log-probs at temperature 1 summed, given the
            prompt and the list's earlier items (-inf for -1 items); tokens (B, S, K*(L+1)) int64,
            the items' token paths one after another (-1 for -1 items).
        """
        if length < 1:
            raise ValueError(f"sample_list: length must be >= 1, got {length}")
        if num_samples < 1:
            raise ValueError(f"sample_list: num_samples must be >= 1, got {num_samples}")
        batch, n, depth, device = input_ids.shape[0], num_samples, self.depth, input_ids.device
        rows = batch * n
        self.allowed_children(item_mask, batch, device)  # checks the mask's shape and type
        if item_mask is None:
            allowed = torch.ones(rows, len(self.codes), dtype=torch.bool, device=device)
        else:
            allowed = torch.as_tensor(item_mask, device=device).repeat_interleave(n, 0)  # a copy
        items = torch.full((rows, length), -1, dtype=torch.long, device=device)
        logprobs = torch.full((rows, length), -torch.inf, device=device)
        tokens = torch.full((rows, length, depth), -1, dtype=torch.long, device=device)
        if cached:
            if batch and self.n_alive:
                self._sample_list_cached(model, input_ids, attention_mask, n, allowed, items, logprobs, tokens,
                                         temperature, generator, greedy)
            return (items.view(batch, n, length), logprobs.view(batch, n, length),
                    tokens.view(batch, n, length * depth))
        ids, mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        every_row = torch.arange(rows, device=device)
        for k in range(length):
            item, logp, path = self.sample(model, ids, mask, 1, temperature, generator, shared_prompt,
                                           item_mask=allowed, greedy=greedy)
            items[:, k], logprobs[:, k], tokens[:, k] = item[:, 0], logp[:, 0], path[:, 0]
            if k + 1 == length:
                break
            found = items[:, k] >= 0
            allowed[every_row[found], items[found, k]] = False  # no repeats within a list
            # a list that ran out has no allowed alive item left and stays out, so the tokens
            # appended for it are never scored: any in-vocabulary ids do (and keep it left-padded)
            ids = torch.cat([ids, path[:, 0].masked_fill(~found[:, None], self.first_token)], 1)
            mask = torch.nn.functional.pad(mask, (0, depth), value=1)
        return (items.view(batch, n, length), logprobs.view(batch, n, length),
                tokens.view(batch, n, length * depth))

    def _sample_list_cached(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                            allowed: torch.Tensor, items: torch.Tensor, logprobs: torch.Tensor,
                            tokens: torch.Tensor, temperature: float, generator: torch.Generator | None,
                            greedy: bool) -> None:
        """``sample_list``'s lists, filled in place: the prompts once, then one token per step
        for every list row from its own KV cache (``allowed``: (rows, n_items) bool)."""
        rows, length, depth, device = items.shape[0], items.shape[1], self.depth, input_ids.device
        positions = _positions(attention_mask)
        logits, cache = _forward(model, input_ids, attention_mask, positions, keep=1,
                                 capacity=input_ids.shape[1] + length * depth)
        logits = logits[:, -1].repeat_interleave(n, 0)
        cache.batch_repeat_interleave(n)
        mask = attention_mask.repeat_interleave(n, 0)
        position = positions[:, -1:].repeat_interleave(n, 0)
        every_row = torch.arange(rows, device=device)
        levels = self._levels_on(device)
        tables, counts = self.allowed_children(allowed, rows, device, with_counts=True)
        for k in range(length):
            prefix = torch.zeros(rows, dtype=torch.long, device=device)
            total = torch.zeros(rows, device=device)
            for level, table in enumerate(levels):
                prefix, token, logp = self._draw(logits, level, table, prefix, tables, rows, greedy, temperature,
                                                 generator)
                total += logp
                tokens[:, k, level] = token
                if k + 1 == length and level + 1 == depth:
                    break  # the last token of the last item: nothing reads what follows it
                # feed the token (a list that ran out feeds the in-vocabulary ids it drew; never scored)
                mask = torch.nn.functional.pad(mask, (0, 1), value=1)
                position = position + 1
                out, cache = _forward(model, token[:, None], mask, position, cache=cache)
                logits = out[:, -1]
            found = prefix >= 0
            items[:, k] = prefix
            logprobs[:, k] = total.masked_fill(~found, -torch.inf)
            tokens[:, k] = tokens[:, k].masked_fill(~found[:, None], -1)
            if k + 1 < length:  # no repeats within a list
                self.remove_allowed(tables, counts, every_row[found], prefix[found])

    def prefix_allowed_tokens_fn(self, prompt_length: int):
        """The trie as a ``prefix_allowed_tokens_fn`` for transformers' ``generate`` (a baseline).

        ``prompt_length`` is the (padded) prompt width T: tokens after it are the generated path.
        A path that left the trie (only beams whose score is already -inf or -1e9) may continue
        with any token of the next level, since transformers rejects an empty allowed list.
        """
        if self._token_table is None:
            table: dict[tuple[int, ...], set[int]] = {}
            for path in (self.codes[self.alive] + self.offsets).tolist():
                for level in range(self.depth):
                    table.setdefault(tuple(path[:level]), set()).add(path[level])
            self._token_table = {key: sorted(value) for key, value in table.items()}
        table = self._token_table
        anything = [list(range(int(o), int(o) + s)) for o, s in zip(self.offsets, self.level_sizes)]

        def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
            generated = tuple(sent[prompt_length:].tolist())
            found = table.get(generated)
            return found if found is not None else anything[min(len(generated), self.depth - 1)]

        return allowed

    token_logprobs = staticmethod(token_logprobs)


class _ExpandedRows:
    """Standard beam layout: one KV-cache row per continuation (B*W rows), reordered every step
    with ``Cache.reorder_cache`` (as transformers' beam search). Works with any attention."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int):
        self.model = model
        positions = _positions(attention_mask)
        logits, self.cache = _forward(model, input_ids, attention_mask, positions, keep=1,
                                      capacity=input_ids.shape[1] + steps)
        self.logits = logits[:, -1]  # (B, V): next-token logits of the prompts
        self.mask, self.positions, self.width = attention_mask, positions[:, -1:], 1

    def advance(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Continue row ``parent[b, w]`` of prompt b with ``tokens[b, w]``; next-token logits (B*W, V)."""
        batch, width = parent.shape
        source = (torch.arange(batch, device=parent.device)[:, None] * self.width + parent).reshape(-1)
        self.cache.reorder_cache(source)
        self.mask = torch.nn.functional.pad(self.mask[source], (0, 1), value=1)
        self.positions = self.positions[source] + 1
        logits, self.cache = _forward(self.model, tokens.reshape(-1, 1), self.mask, self.positions, cache=self.cache)
        self.width = width
        return logits[:, -1]


class _SharedPromptRows:
    """Each prompt is cached once (B rows). The continuations of a prompt are extra entries of
    its cache row: every step appends W tokens to the row, and a 4D mask lets each new token see
    the prompt, its own ancestors and itself only (tree attention, as in the token-tree
    verification of SpecInfer, Miao et al. 2024). Nothing is copied or reordered:
    a beam's ancestry is a list of cache columns. Costs B*T prompt work instead of B*G*T and
    keeps the cache G times smaller; needs an attention that takes additive 4D masks (eager, sdpa).
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, steps: int):
        self.model = model
        positions = _positions(attention_mask)
        logits, self.cache = _forward(model, input_ids, attention_mask, positions, keep=1,
                                      capacity=input_ids.shape[1] + width * steps)
        self.logits = logits[:, -1]
        self.prompt_mask = attention_mask.bool()
        self.next_position = positions[:, -1:] + 1  # (B, 1) position of the first generated token
        batch, self.length = input_ids.shape  # cache columns so far
        self.ancestors = torch.zeros(batch, 1, 0, dtype=torch.long, device=input_ids.device)
        # sdpa takes a boolean mask (True = attend), ~30% faster than an additive one on CPU;
        # eager attention adds the mask to the scores, so it needs the additive form
        self.boolean = (isinstance(self.cache, fastlm.KVCache)
                        or getattr(model.config, "_attn_implementation", None) == "sdpa")
        self.dtype = getattr(model, "dtype", torch.float32)

    def advance(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, width = parent.shape
        steps = self.ancestors.shape[2]
        own = self.length + torch.arange(width, device=parent.device).expand(batch, width)
        inherited = self.ancestors.gather(1, parent[..., None].expand(batch, width, steps))
        self.ancestors = torch.cat([inherited, own[..., None]], 2)  # (B, W, steps + 1) cache columns
        self.length += width
        visible = torch.zeros(batch, width, self.length, dtype=torch.bool, device=parent.device)
        visible[:, :, :self.prompt_mask.shape[1]] = self.prompt_mask[:, None, :]
        visible.scatter_(2, self.ancestors, True)
        if self.boolean:
            mask = visible[:, None]  # (B, 1, W, K)
        else:
            mask = torch.zeros(visible.shape, dtype=self.dtype, device=parent.device)
            mask = mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[:, None]
        positions = (self.next_position + steps).expand(batch, width)
        logits, self.cache = _forward(self.model, tokens, mask, positions, cache=self.cache)
        return logits.reshape(batch * width, -1)


def _rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared_prompt: bool | None,
          width: int, steps: int):
    """The decoding layout for ``width`` continuations per prompt and ``steps`` generated inputs.

    Auto (None): the shared-prompt layout when the attention takes 4D masks and the generated
    tokens of a prompt (width x steps) are at most twice the prompt width; its attention grows as
    width x (T + width x steps) per prompt, so many samples (e.g. 4,000 per prompt) are cheaper as
    expanded rows, while beam search (16 beams x 3 steps, T ~ 40) runs about 2x faster shared.
    """
    attention_mask = _check_left_padded(attention_mask)
    if shared_prompt is None:
        shared_prompt = (getattr(model.config, "_attn_implementation", None) in ("eager", "sdpa")
                         and width * steps <= 2 * input_ids.shape[1])
    if shared_prompt:
        return _SharedPromptRows(model, input_ids, attention_mask, width, steps)
    return _ExpandedRows(model, input_ids, attention_mask, steps)


@torch.no_grad()
def reference_beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: CatalogueTrie,
                          num_beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain beam search for tests: one prompt and one beam at a time, padding stripped, no KV
    cache (the whole sequence is re-run for every beam), allowed codes from a dict built
    directly from ``trie.codes`` and ``trie.alive`` (not from the trie's tables).

    Same contract as ``CatalogueTrie.beam_search``; scores are summed in float64.
    """
    depth, sizes = trie.depth, trie.level_sizes
    children: dict[tuple[int, ...], set[int]] = {}
    item_of: dict[tuple[int, ...], int] = {}
    for item in np.flatnonzero(trie.alive):
        path = tuple(int(c) for c in trie.codes[item])
        item_of[path] = int(item)
        for level in range(depth):
            children.setdefault(path[:level], set()).add(path[level])
    items = torch.full((len(input_ids), num_beams), -1, dtype=torch.long)
    scores = torch.full((len(input_ids), num_beams), -torch.inf)
    for b in range(len(input_ids)):
        prompt = input_ids[b][attention_mask[b].bool()].cpu()
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        for level in range(depth):
            candidates = []
            for index, (path, score) in enumerate(beams):
                tokens = torch.tensor([int(trie.offsets[lv]) + c for lv, c in enumerate(path)], dtype=torch.long)
                sequence = torch.cat([prompt, tokens])[None].to(input_ids.device)
                logits = model(input_ids=sequence, use_cache=False).logits[0, -1].float()
                logp = torch.log_softmax(logits, dim=-1).cpu()
                for code in sorted(children.get(path, ())):
                    token_logp = float(logp[int(trie.offsets[level]) + code])
                    candidates.append((score + token_logp, index * sizes[level] + code, path + (code,)))
            candidates.sort(key=lambda c: (-c[0], c[1]))
            beams = [(path, score) for score, _, path in candidates[:num_beams] if score != -np.inf]
        for g, (path, score) in enumerate(beams):
            items[b, g] = item_of[path]
            scores[b, g] = score
    return items, scores


def gumbel(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)``, U ~ Uniform[0, 1) from ``generator``: Gumbel-max,
    ``argmax(z + noise)`` over the allowed codes, draws from ``softmax(z)`` renormalised over them.

    One uniform and two in-place logs; on a CPU this is 4x faster than ``exponential_`` (whose
    ``z - log E`` is the same distribution). U = 0 gives -inf (that code is not drawn: probability
    2^-24 per entry in float32), and U < 1 caps the noise at about 16.6 (P(G > 16.6) = 6e-8).
    """
    return torch.rand(shape, generator=generator, device=device).log_().neg_().log_().neg_()


def _restrict(child: torch.Tensor, allowed: torch.Tensor, batch: int) -> torch.Tensor:
    """Child ids (B*W, size) with -1 where the child has no allowed item for its row's prompt.

    Rows are prompt-major (row r belongs to prompt r // W); ``allowed`` is (B, n_children), one
    level's table from ``CatalogueTrie.allowed_children``.
    """
    flat = child.view(batch, -1)
    ok = allowed.gather(1, flat.long().clamp(min=0))  # entries of -1 children are read at 0, then stay -1
    return flat.masked_fill(~ok, -1).view_as(child)


def _stable_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top ``k`` values of ``x`` and their indices, best first, equal values by lower index.

    ``torch.topk`` is ~30x faster than a full stable sort here but leaves the order of equal
    values unspecified. So take the top k+1 (sorted): when no two finite values among them are
    equal (real-valued scores: practically always) their order is the answer. Otherwise order
    them by (value desc, index asc), and redo a row with a full stable sort only when a finite
    value straddles the cut (then an equal value with a lower index may lie outside). Ties at
    -inf are dead beams, whose order does not matter.
    """
    if k >= x.shape[1]:
        return torch.sort(x, dim=1, descending=True, stable=True)
    top, index = torch.topk(x, k + 1, dim=1)
    if not bool(((top[:, 1:] == top[:, :-1]) & torch.isfinite(top[:, 1:])).any()):
        return top[:, :k], index[:, :k]
    order = index.argsort(dim=1)
    top, index = top.gather(1, order), index.gather(1, order)
    order = torch.sort(top, dim=1, descending=True, stable=True).indices
    top, index = top.gather(1, order), index.gather(1, order)
    straddle = (top[:, k - 1] == top[:, k]) & torch.isfinite(top[:, k])
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        exact_top, exact_index = torch.sort(x[rows], dim=1, descending=True, stable=True)
        top[rows], index[rows] = exact_top[:, :k + 1], exact_index[:, :k + 1]
    return top[:, :k], index[:, :k]


def _check_left_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    attention_mask = attention_mask.long()
    if attention_mask.shape[1] == 0 or not bool(attention_mask[:, -1].all()):
        raise ValueError("decoding: prompts must be non-empty and left-padded (last attention_mask column all 1)")
    return attention_mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at the first real token (padding gets 0, it is masked)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


_FORWARD_ARGS: dict[type, set[str]] = {}


def _forward(model, input_ids, attention_mask, position_ids, cache=None, keep: int | None = None,
             use_cache: bool = True, capacity: int | None = None):
    """One model call; returns (logits, cache).

    ``keep``: compute logits only for the last ``keep`` positions when the model takes
    ``logits_to_keep`` (saves the vocabulary projection over the prompt). The KV cache argument is
    ``cache`` in transformers >= 5.x and ``past_key_values`` before; we pass whichever the model takes.

    ``capacity`` (decoding, no gradient): the cache columns the rows will reach. With it, a first
    call on a model that ``fastlm.supports`` runs ``fastlm.forward`` into a preallocated
    ``fastlm.KVCache``, and later calls with that cache continue there; a 2D ``attention_mask``
    (one new token per row) then means "see every unmasked column".

    ``use_cache=False`` (no cache wanted, gradients allowed) on a model that ``fastlm.trains``
    runs ``fastlm.forward`` without a cache: a 2D ``attention_mask`` is taken as left-padded
    sequences (``fastlm.prompt_mask``), a 4D boolean one as given (the loss pass's tree masks).
    """
    if cache is None and not use_cache and fastlm.trains(model):
        mask = attention_mask if attention_mask.dim() == 4 else fastlm.prompt_mask(attention_mask)
        return fastlm.forward(model, None, input_ids, position_ids, mask, keep), None
    if isinstance(cache, fastlm.KVCache):
        mask = attention_mask if attention_mask.dim() == 4 else attention_mask.bool()[:, None, None, :]
        return fastlm.forward(model, cache, input_ids, position_ids, mask, keep), cache
    if cache is None and capacity is not None and fastlm.supports(model):
        cache = fastlm.KVCache(model, len(input_ids), capacity, input_ids.device)
        return fastlm.forward(model, cache, input_ids, position_ids, fastlm.prompt_mask(attention_mask), keep), cache
    kind = type(model)
    if kind not in _FORWARD_ARGS:
        _FORWARD_ARGS[kind] = set(inspect.signature(model.forward).parameters)
    accepted = _FORWARD_ARGS[kind]
    kwargs = {}
    if keep is not None and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    if cache is not None:
        kwargs["cache" if "cache" in accepted else "past_key_values"] = cache
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=use_cache, **kwargs)
    new_cache = getattr(out, "cache", None) if "cache" in accepted else getattr(out, "past_key_values", None)
    return out.logits, new_cache
