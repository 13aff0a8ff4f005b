"""Rewards for GRPO in the loop: plain named callables that the simulated users verify.

A reward is a function ``(ctx: RewardContext) -> (B, G) float64`` array: one number per candidate
``g`` of prompt ``b``. Rewards are looked up by name in ``REWARDS`` (the keys of ``rl.rewards`` in
the config) and composed with weights by ``agorasim.rl.advantages.combine``; a new reward joins
with ``register_reward``. Everything here is vectorised numpy over the whole batch (DESIGN.md
section 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agorasim.errors import UserInputError

# Floor on a group's target exposure share in the exposure penalty, so that a group whose target
# share is 0 (it "should" get no exposure) gives the full penalty instead of a division by zero.
_SHARE_EPS = 1e-6


@dataclass
class RewardContext:
    """Everything a reward may read for a batch of ``B`` prompts x ``G`` candidates.

    The candidates of a prompt are in rank order: column ``g`` is the beam (or sample) of rank
    ``g``, 0 = best (``ranks``). Fields a reward does not need may be ``None``; a reward that needs
    a missing field raises ``ValueError`` naming it.

    Args:
        items: ``(B, G)`` int item ids, candidate ``g`` of prompt ``b``.
        rating: ``(B, G)`` float, the simulated user's verified rating of each candidate on the
            0-10 scale (asked counterfactually, whether or not it was shown).
        click: ``(B, G)`` float click probability of each candidate, in ``[0, 1]``.
        target: ``(B,)`` int held-out (or chosen) target item of each prompt, ``-1`` if none.
        beam_scores: ``(B, G)`` float sequence log-probabilities of the candidates (nats).
        item_group: ``(B, G)`` int popularity group of each candidate (``-1``: no group).
        group_share: ``(n_groups,)`` current exposure share of each popularity group (sums to 1).
        target_share: ``(n_groups,)`` target exposure share of each group (sums to 1).
    """

    items: np.ndarray
    rating: np.ndarray | None = None
    click: np.ndarray | None = None
    target: np.ndarray | None = None
    beam_scores: np.ndarray | None = None
    item_group: np.ndarray | None = None
    group_share: np.ndarray | None = None
    target_share: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.items = np.asarray(self.items)
        assert self.items.ndim == 2, f"items must be (B, G), got shape {self.items.shape}"

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, G)``: prompts x candidates."""
        return self.items.shape  # type: ignore[return-value]

    @property
    def ranks(self) -> np.ndarray:
        """``(B, G)`` int rank of each candidate: its column index, 0 = best beam."""
        return np.broadcast_to(np.arange(self.shape[1]), self.shape)

    def need(self, field: str) -> np.ndarray:
        """The field ``field`` as an array; a ``ValueError`` naming it if the context lacks it."""
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"this reward needs RewardContext.{field}, which is None")
        return np.asarray(value)


RewardFn = Callable[[RewardContext], np.ndarray]


def rating(ctx: RewardContext) -> np.ndarray:
    """The user's verified rating scaled to ``[0, 1]``: ``rating / 10``."""
    return ctx.need("rating").astype(np.float64) / 10.0


def click(ctx: RewardContext) -> np.ndarray:
    """The user's click probability of each candidate, in ``[0, 1]``."""
    return ctx.need("click").astype(np.float64)


def rere_rank_penalties(group_size: int) -> np.ndarray:
    """ReRe's rank penalty of a wrong candidate at each rank ``k = 0..G-1``.

    ``-(1/log2(k+2)) / sum_{j<G} 1/log2(j+2)``: the DCG discount of the rank, normalised so the
    penalties of all ``G`` ranks sum to -1. For ``G = 3``: ``[-0.46929, -0.29609, -0.23465]``.
    """
    discount = 1.0 / np.log2(np.arange(group_size, dtype=np.float64) + 2.0)
    return -discount / discount.sum()


def rere_rank(ctx: RewardContext) -> np.ndarray:
    """ReRe ranking reward (Tan et al. 2025): the hit is rewarded, hard negatives are penalised.

    A candidate equal to the target gets 1. When the target is among the ``G`` candidates, a wrong
    candidate at rank ``k`` gets ``-(1/log2(k+2)) / sum_{j<G} 1/log2(j+2)`` (``rere_rank_penalties``),
    so the more probable a wrong beam, the stronger its penalty. When the target is not among the
    candidates (or the prompt has no target, ``-1``) every candidate gets 0.

    Source and deviations: the paper writes the penalty as ``-1/log2(rho_k + 1)`` with a 1-based
    rank ``rho_k``, which equals ``-1/log2(k+2)`` for our 0-based ``k``. The normalisation by the
    sum over all ``G`` ranks (the hit's own rank included) is not in the paper; it is in the
    authors' code (``ndcg_rule_reward`` in github.com/sober-clever/ReRe, shared with MiniOneRec),
    which we follow. That code splits the reward in two functions, a 0/1 hit ``rule_reward`` and
    the rank penalty ``ndcg_rule_reward`` (0 for the hit), summed with weight 1 each before group
    normalisation; ``rere_rank`` is their sum, so it matches with ``sum_then_normalize`` but, as
    one reward, is normalised as a whole under ``normalize_then_sum``. Duplicate hits (sampling
    rather than beams) all get 1, as in that code.
    """
    items = ctx.items
    target = ctx.need("target").astype(np.int64)
    assert target.shape == (items.shape[0],), "target must be (B,)"
    hit = (items == target[:, None]) & (target[:, None] >= 0)
    target_in_group = hit.any(axis=1, keepdims=True)
    penalty = np.broadcast_to(rere_rank_penalties(items.shape[1]), items.shape)
    return np.where(hit, 1.0, np.where(target_in_group, penalty, 0.0))


def exposure(ctx: RewardContext) -> np.ndarray:
    """Fairness penalty on candidates from over-exposed popularity groups (ours, in ``[-1, 0]``).

    For a candidate of group ``g``: ``-clip(max(0, share[g] - target[g]) / max(target[g], eps),
    0, 1)``, the group's exposure in excess of its target, relative to the target (eps = 1e-6).
    A group at or under its target costs nothing; a group at twice its target (or more) costs the
    full -1, so the term is on the same 0-1 scale as ``rating`` and ``click``. Candidates with no
    group (``item_group < 0``) get 0.
    """
    group = ctx.need("item_group").astype(np.int64)
    share = ctx.need("group_share").astype(np.float64)
    target = ctx.need("target_share").astype(np.float64)
    assert share.shape == target.shape, "group_share and target_share must have the same shape"
    excess = np.maximum(0.0, share - target) / np.maximum(target, _SHARE_EPS)
    per_group = -np.clip(excess, 0.0, 1.0)
    known = group >= 0
    return np.where(known, per_group[np.where(known, group, 0)], 0.0)


REWARDS: dict[str, RewardFn] = {
    "rating": rating,
    "click": click,
    "rere_rank": rere_rank,
    "exposure": exposure,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make reward ``fn`` available to configs as ``name`` (``rl.rewards`` keys)."""
    if name in REWARDS and REWARDS[name] is not fn:
        raise ValueError(f"reward name {name!r} is already registered to {REWARDS[name].__name__}")
    REWARDS[name] = fn


def check_reward_names(names) -> None:
    """Raise a one-line ``UserInputError`` (a ``ValueError``) if a name is not a known reward."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise UserInputError(
            f"rl.rewards: unknown reward {unknown[0]!r}; allowed: {', '.join(sorted(REWARDS))}")


def compute_rewards(ctx: RewardContext, weights: dict[str, float]) -> dict[str, np.ndarray]:
    """Every reward named in ``weights``, evaluated on ``ctx``.

    Args:
        ctx: The batch of prompts and candidates.
        weights: Reward name -> weight (the weights themselves are applied by
            ``advantages.combine``; a weight of 0 still computes the reward, for logging).

    Returns:
        Name -> ``(B, G)`` float64 rewards, in the order of ``weights``.

    Raises:
        UserInputError: A name is not in ``REWARDS`` (the message lists the allowed names).
    """
    check_reward_names(weights)
    out = {}
    for name in weights:
        value = np.asarray(REWARDS[name](ctx), dtype=np.float64)
        assert value.shape == ctx.shape, f"reward {name!r} returned {value.shape}, expected {ctx.shape}"
        out[name] = value
    return out
