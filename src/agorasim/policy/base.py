"""The recommender policy contract.

A policy turns a batch of active users (with their recent histories and a retrieved candidate
pool) into a ranked list of K' items with scores. It learns from the interaction log: baselines
refit every ``refit_every`` rounds, the generative policy takes GRPO steps. Every policy passes
``agorasim.env.conformance.check_policy``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agorasim.policy.observation import Observation


@dataclass
class RecommendRequest:
    """One round's batch for the policy.

    Attributes:
        users: (B,) user ids.
        history: (B, H) last clicked items, most recent last, -1 padded on the left.
        candidates: (B, C) retrieved item ids, -1 padded; all alive. Scoring policies rank
            these; a generative policy may ignore them and generate from the catalogue.
        alive: (n_items,) bool, items currently listed (never recommend a dead item).
        k: number of items to return per user (K').
        round: current round.
    """

    users: np.ndarray
    history: np.ndarray
    candidates: np.ndarray
    alive: np.ndarray
    k: int
    round: int


@dataclass
class ExposureState:
    """What the platform knows of exposure when a policy learns (all over the current catalogue).

    Attributes:
        groups: ``(n_items,)`` popularity group of every item (``-1``: none).
        share: ``(n_groups,)`` exposure share of each group in the ledger window (sums to 1).
        target_share: ``(n_groups,)`` the platform's target share of each group (sums to 1).
        item_exposure: ``(n_items,)`` position-weighted exposure of every item in the window.
        interactions: ``(n_items,)`` interactions (clicks) of every item so far.
        alive: ``(n_items,)`` bool, items on the market.
    """

    groups: np.ndarray
    share: np.ndarray
    target_share: np.ndarray
    item_exposure: np.ndarray
    interactions: np.ndarray
    alive: np.ndarray


class FeedbackOracle(Protocol):
    """What the simulator lets a policy ask while it learns (counterfactual user queries)."""

    def judge(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Verified judgements of ``items`` (B, G) by ``users`` (B,): ``rating`` (0-10, expected
        from true utility) and ``click`` (probability of a click if shown alone)."""

    def exposure_state(self) -> ExposureState:
        """Popularity groups, group and item exposure in the ledger window, targets, counts."""


class Policy(ABC):
    """Ranks items for a batch of users and learns from the interaction log."""

    name: str = "policy"

    def bind(self, oracle: FeedbackOracle) -> None:  # noqa: B027 - optional hook
        """Receive the simulator's feedback oracle (policies that learn from verified rewards
        keep it; others ignore it)."""

    @abstractmethod
    def recommend(self, request: RecommendRequest, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return (items, scores), both (B, k): distinct alive items per row, best first,
        -1 (score -inf) where fewer than k items are available."""

    def update(self, obs: Observation, rng: np.random.Generator) -> dict[str, float]:
        """Learn from what the platform observed after ``obs.round`` (``Observation``: the
        observable catalogue and the log); return training metrics (may be empty).

        Keys ``train/*`` are deterministic and go to metrics.csv and train.csv; keys ``time/*``
        (wall-clock) go to train.csv only, so metrics.csv stays byte-identical across runs.
        """
        return {}


class ScoringPolicy(Policy):
    """A policy that scores the retrieved candidates and keeps the top k."""

    @abstractmethod
    def score(self, users: np.ndarray, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Scores (B, C) for ``candidates`` (entries where candidates == -1 are ignored)."""

    def recommend(self, request, rng):
        scores = self.score(request.users, request.history, request.candidates).astype(np.float64)
        return top_k(request.candidates, scores, request.k)


def top_k(candidates: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k of ``candidates`` by ``scores``, padding (-1) last; ties by column order."""
    scores = np.where(candidates >= 0, scores, -np.inf)
    k_eff = min(k, candidates.shape[1])
    # stable sort on -score keeps the retrieval order among ties, so results are deterministic
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    items = np.take_along_axis(candidates, order, 1)
    top = np.take_along_axis(scores, order, 1)
    items = np.where(np.isfinite(top), items, -1)
    if k_eff < k:
        pad = k - k_eff
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, top
