"""FLAME: step-wise GRPO with potential-based step rewards (arXiv 2505.20218, NeurIPS'25).

A completion is a list of edit steps (one item per step, ALGORITHMS.md section 3); each reward
is a potential ``Phi`` of the edited list and the step reward is its change, so the step rewards
of a completion sum to ``Phi_E - Phi_0`` exactly (potential-based shaping, Ng et al. 1999).
Arrays are ``(B, G, E)``: prompt ``b``, rollout ``g``, step ``t``.

Exact from the authors' code (``cxfann/Flame`` @ 5ec1fe8,
``src/finetune_rethink_step_grpo.py``): the Jaccard accuracy potential and its differences
(``jaccard_reward``), and the refusal step reward ``-(refusals in 1..t)/t``
(``refuse_rate_reward``). The trainer that consumes the step rewards is not in the repository, so
``step_advantages`` (``A_{i,t} = A_i + w r_{i,t}``, raw step rewards by default, group-normalised
ones as an option) is an **[inf]** reconstruction after UGR's analogous code, and ``gini_after``
(the ledger-Gini safety potential of the agorasim adaptation) is ours.
"""

from __future__ import annotations

import numpy as np
import torch

from agorasim.metrics.accuracy import dcg_weights
from agorasim.rl.advantages import DEFAULT_EPS, group_advantages
from agorasim.rl.rollouts import list_rollout, merge_ranked
from agorasim.rl.trainer import Method, Scored


def step_rewards(potentials) -> np.ndarray:
    """Step rewards as differences of potentials: ``r_t = Phi_t - Phi_{t-1}``.

    Args:
        potentials: ``(..., E+1)`` potentials ``Phi_0..Phi_E`` of the list before any step and
            after each step.

    Returns:
        ``(..., E)`` float64 step rewards; they sum to ``Phi_E - Phi_0``.
    """
    potentials = np.asarray(potentials, dtype=np.float64)
    assert potentials.shape[-1] >= 1, "potentials need at least Phi_0"
    return np.diff(potentials, axis=-1)


def refusal_rewards(refused) -> np.ndarray:
    """FLAME's refusal-rate step reward: ``r_t = -(refusals in steps 1..t) / t``.

    ``refuse_rate_reward`` in cxfann/Flame. This one is not a potential difference: the
    completion's total is the last step's value, ``-refusals / T``, not the sum of the steps.

    Args:
        refused: ``(..., E)`` bool, step ``t`` was a refusal (an unmatched or invalid item).

    Returns:
        ``(..., E)`` float64 step rewards in ``[-1, 0]``.
    """
    refused = np.asarray(refused, dtype=bool)
    steps = np.arange(1, refused.shape[-1] + 1, dtype=np.float64)
    return -np.cumsum(refused, axis=-1, dtype=np.float64) / steps


def jaccard(a, b) -> np.ndarray:
    """Jaccard similarity ``|a & b| / |a | b|`` of sets given as bool masks over a universe.

    Args:
        a: ``(..., n)`` bool mask of the first set.
        b: ``(..., n)`` bool mask of the second set (broadcast against ``a``).

    Returns:
        ``(...,)`` float64; 0 where both sets are empty.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    inter = np.count_nonzero(a & b, axis=-1)
    union = np.count_nonzero(a | b, axis=-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def step_advantages(total_advantage, step_reward, weight: float = 0.5,
                    normalise: bool = False, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Per-step advantages: the completion's group advantage plus its weighted step reward [inf].

    ``A_{i,t} = A_i + weight * r_{i,t}`` with ``A_i`` the group-normalised total reward of
    completion ``i`` and ``r_{i,t}`` the (already weight-combined) step reward of its step ``t``;
    every token of step ``t`` gets ``A_{i,t}``. FLAME's function default is ``weight = 0.5`` (its
    README runs 0.2). ``normalise=True`` first normalises the step rewards over the ``G*E``
    entries of each prompt (``(r - mean) / (std + eps)``, sample std), an option the spec keeps
    because the trainer's form is unknown; the default adds raw step rewards, as UGR's analogous
    token rewards are added.

    Args:
        total_advantage: ``(B, G)`` group advantages of the completions' total rewards.
        step_reward: ``(B, G, E)`` step rewards.
        weight: Weight of the step reward.
        normalise: Group-normalise the step rewards first.
        eps: Added to the std when ``normalise``.

    Returns:
        ``(B, G, E)`` float64 advantages.
    """
    total = np.asarray(total_advantage, dtype=np.float64)
    step = np.asarray(step_reward, dtype=np.float64)
    assert step.ndim == 3 and total.shape == step.shape[:2], (
        f"total_advantage must be (B, G) and step_reward (B, G, E), got {total.shape}, "
        f"{step.shape}")
    if normalise:
        step = group_advantages(step.reshape(step.shape[0], -1), scale="group",
                                eps=eps).reshape(step.shape)
    return total[..., None] + weight * step


def gini_after(exposure, items, weights=None) -> np.ndarray:
    """Gini of the ledger's exposure vector after adding one list's exposure, for many lists.

    For each list, ``weights[k]`` is added at ``exposure[items[k]]`` and the Gini coefficient of
    the resulting ``(n,)`` vector is returned; the definition is that of
    ``agorasim.metrics.exposure.gini`` (``sum_i sum_j |x_i - x_j| / (2 n sum x)``, zeros
    included). No ``(..., n)`` matrix is built: the pairwise-difference sum ``D`` of the ledger
    is computed once from the sorted vector, and a list changes only its ``K`` entries ``T``,
    so ``D' = D + 2 sum_{t in T} [f(x'_t) - f(x_t)] - 2 sum_{t,s in T} |x'_t - x_s|
    + sum_{t,s in T} (|x_t - x_s| + |x'_t - x'_s|)`` with ``f(y) = sum_j |y - x_j|`` from prefix
    sums over the sorted ledger. Cost: ``O(n log n)`` once, then ``O(K^2 + K log n)`` per list.
    A repeated item counts once with its weights summed; ``items < 0`` (empty slots) add nothing.

    Args:
        exposure: ``(n,)`` non-negative ledger exposure per item.
        items: ``(..., K)`` int item ids of each list.
        weights: ``(K,)`` (or broadcastable to ``items``) exposure each position adds, e.g.
            ``position_weights(K)``; ``None``: 1 per position.

    Returns:
        ``(...,)`` float64 Gini after each list; 0 where the total exposure is 0.
    """
    x = np.asarray(exposure, dtype=np.float64).ravel()
    assert not np.any(x < 0), "exposure values must be non-negative"
    items = np.asarray(items, dtype=np.int64)
    n, k = x.size, items.shape[-1]
    assert np.all(items < n), "item ids must be < len(exposure)"
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    valid = items >= 0
    w = np.where(valid, np.broadcast_to(w, items.shape), 0.0)

    xs = np.sort(x)
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    total = prefix[-1]
    ranks = np.arange(1, n + 1, dtype=np.float64)
    d_ledger = 2.0 * np.dot(2.0 * ranks - n - 1.0, xs)

    def f(y):  # sum_j |y - x_j| over the whole ledger
        c = np.searchsorted(xs, y, side="right")
        below = prefix[c]
        return y * c - below + (total - below) - y * (n - c)

    # a repeated item is represented by its first position, carrying the summed weight
    same = (items[..., :, None] == items[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    added = (same * w[..., None, :]).sum(axis=-1)
    repeated = (same & np.tril(np.ones((k, k), dtype=bool), -1)).any(axis=-1)
    rep = valid & ~repeated
    old = x[np.where(valid, items, 0)]
    new = old + added
    pair = rep[..., :, None] & rep[..., None, :]

    def pairs(a, b):  # sum over represented pairs of |a_t - b_s|
        return np.where(pair, np.abs(a[..., :, None] - b[..., None, :]), 0.0).sum(axis=(-2, -1))

    d_new = (d_ledger + 2.0 * np.where(rep, f(new) - f(old), 0.0).sum(axis=-1)
             - 2.0 * pairs(new, old) + pairs(old, old) + pairs(new, new))
    s_new = total + w.sum(axis=-1)
    positive = (s_new > 0) & (n > 0)
    return np.where(positive, d_new / (2.0 * max(n, 1) * np.where(positive, s_new, 1.0)), 0.0)


# -- the method on the trainer ---------------------------------------------------------------------
SLATE = 10  # FLAME edits a top-10 list (its accuracy potential is NDCG@10)


def slate_count(exposure: np.ndarray) -> float:
    """How many top-10 slates the ledger's exposure amounts to (position weights 1/log2(pos+2))."""
    return max(float(exposure.sum()) / float(dcg_weights(SLATE).sum()), 1.0)


def exposure_potential(exposure: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """``-(Gini(ledger + list) - Gini(ledger)) * n_slates`` for each list (..., 10) of alive-item
    positions: the change in exposure Gini if every slate of the window were this one, to first
    order (one list alone moves the ledger's Gini by about 1/n_slates of that). Ours: FLAME's
    safety potential has no exposure analogue; this keeps it on the accuracy potential's scale."""
    base = gini_after(exposure, np.full((1, 1), -1))[0]
    weights = dcg_weights(lists.shape[-1])
    return -(gini_after(exposure, lists, weights) - base) * slate_count(exposure)


def accuracy_potential(gains: np.ndarray) -> np.ndarray:
    """DCG@10 of the list's gains over the DCG of ten gains of 1 (so adding a good item always
    raises it; a fixed ideal, since the best possible 10 items are unknown)."""
    weights = dcg_weights(gains.shape[-1])
    return (gains * weights).sum(-1) / weights.sum()


class Flame(Method):
    """FLAME on ``rl.Trainer`` (``rl.method=flame``, settings ``rl.flame``): list editing.

    ``add``: the initial list M_0 is the policy's top (10 - E) beams; the prompt is
    ``[history, <add>, codes(M_0)]`` and a rollout appends E distinct items from the catalogue
    minus M_0, one edit step per item. ``remove``: M_0 is the top (10 + E) beams, the prompt
    ``[history, <remove>, codes(M_0)]``, and a rollout removes E of M_0's items; the list scored is
    the top 10 of what remains. After every step the potentials are re-evaluated:
    ``Phi = accuracy * accuracy_potential(click gains) + exposure * exposure_potential(ledger)``,
    the step reward is ``Phi_t - Phi_{t-1}`` (``step_rewards``), the completion's total is their
    sum ``Phi_E - Phi_0``, and the tokens of step t get ``A_hat + step_weight * r_t``
    (``step_advantages``). Constrained decoding cannot produce an invalid or repeated item, so the
    refusal reward of the paper never fires here (``refusal_rewards`` is kept for the hand check).
    Serving: M_0 edited greedily, then the remaining beams.
    """

    name = "flame"
    special_tokens = ("<add>", "<remove>")

    def extra_positions(self, depth: int) -> int:
        e = self.config.flame.edits
        return 1 + (SLATE + e) * depth + e * depth

    def base_size(self) -> int:
        e = self.config.flame.edits
        return SLATE - e if self.config.flame.task == "add" else SLATE + e

    def setup(self, policy, history: np.ndarray):
        """M_0 (B, base) and the edit prompt's suffix and item mask."""
        base, _ = policy.beam_search(history, self.base_size())
        token = policy.special_token(f"<{self.config.flame.task}>")
        codes = np.where((base >= 0)[..., None], policy.tokens[np.maximum(base, 0)], -1).reshape(len(base), -1)
        # a missing M_0 item (tiny catalogues) leaves its token slots as -1: drop them row by row is
        # not vectorisable, so they are repeated <task> tokens instead (a no-op instruction)
        suffix = np.concatenate([np.full((len(base), 1), token), np.where(codes >= 0, codes, token)], 1)
        n_items = len(policy.tokens)
        mask = np.zeros((len(base), n_items), bool)
        rows = np.repeat(np.arange(len(base)), base.shape[1])
        valid = base.reshape(-1) >= 0
        mask[rows[valid], base.reshape(-1)[valid]] = True
        if self.config.flame.task == "add":
            mask = ~mask & policy.trie.alive[None, :n_items]
        return base, suffix, torch.as_tensor(mask, device=policy.device)

    def lists(self, base: np.ndarray, edits: np.ndarray) -> np.ndarray:
        """``(B, G, E+1, 10)`` the list after 0..E edit steps."""
        b, g, e = edits.shape
        steps = np.arange(e + 1)
        if self.config.flame.task == "add":
            added = np.where(np.arange(e)[None, :] < steps[:, None], 1, 0)  # (E+1, E): edit j done by step t
            head = np.broadcast_to(base[:, None, None, :], (b, g, e + 1, base.shape[1]))
            tail = np.where(added[None, None] > 0, edits[:, :, None, :], -1)
            return np.concatenate([head, tail], -1)[..., :SLATE]
        removed = np.zeros((b, g, e + 1, base.shape[1]), bool)
        for t in range(1, e + 1):  # E <= 9 steps: a short loop over steps, vectorised over the batch
            removed[:, :, t] = removed[:, :, t - 1] | (base[:, None, :] == edits[:, :, t - 1, None])
        kept = np.where(removed, -1, base[:, None, None, :])
        order = np.argsort(kept < 0, axis=-1, kind="stable")  # survivors first, in M_0's order
        return np.take_along_axis(kept, order, -1)[..., :SLATE]

    def rollout(self, trainer, prompts, generator):
        policy = trainer.policy
        base, suffix, mask = self.setup(policy, prompts.history)
        rollout = list_rollout(trainer, prompts, generator, self.config.flame.group_size, self.config.flame.edits,
                               self.config.temperature, suffix, mask)
        rollout.extra["base"] = base
        return rollout

    def score(self, trainer, prompts, rollout, judge):
        cfg, policy = self.config.flame, trainer.policy
        lists = self.lists(rollout.extra["base"], rollout.items)  # (B, G, E+1, 10)
        click = judge.judge(prompts, lists)["click"]
        potential = cfg.accuracy * accuracy_potential(click)
        exposure = judge.exposure_state()
        if cfg.exposure > 0 and exposure is not None:
            alive = np.flatnonzero(exposure.alive)
            position = np.full(len(exposure.alive), -1)
            position[alive] = np.arange(len(alive))
            mapped = np.where(lists >= 0, position[np.maximum(lists, 0)], -1)
            potential = potential + cfg.exposure * exposure_potential(exposure.item_exposure[alive], mapped)
        steps = step_rewards(potential)  # (B, G, E)
        steps = np.where(rollout.items >= 0, steps, 0.0)
        total = steps.sum(-1)
        advantages = step_advantages(group_advantages(total, self.config.advantage_scale), steps,
                                     cfg.step_weight, cfg.normalise_steps)
        depth = policy.levels + 1
        stats = {"flame/potential_start": float(potential[..., 0].mean()),
                 "flame/potential_end": float(potential[..., -1].mean())}
        return Scored({"step": steps}, total, np.repeat(advantages, depth, axis=-1), stats)

    def serve(self, policy, history, k, round):
        base, suffix, mask = self.setup(policy, history)
        ids, attention = (t.to(policy.device) for t in policy.prompts(history, suffix))
        with torch.inference_mode():
            edits, _, _ = policy.trie.sample_list(policy.model, ids, attention, self.config.flame.edits,
                                                  greedy=True, item_mask=policy.item_mask(history, mask))
        edits = edits.cpu().numpy().astype(np.int64)  # (B, 1, E)
        head = self.lists(base, edits)[:, 0, -1]
        beams, _ = policy.beam_search(history, k)
        items = merge_ranked(head, beams, k)
        return items, np.where(items >= 0, -np.arange(k, dtype=np.float64)[None, :], -np.inf)
