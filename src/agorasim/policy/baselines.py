"""Baseline recommenders: uniform random and popularity, and the refit schedule all baselines share.

Baselines learn from the interaction log only every ``refit_every`` rounds and stay frozen in
between, so what they recommend shapes the log they are refit on: the feedback loop is real.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from agorasim.policy.base import Policy, RecommendRequest, ScoringPolicy, top_k
from agorasim.policy.observation import CatalogueView, LogView, Observation
from agorasim.policy.params import PopularityParams, RandomParams


def valid_candidates(candidates: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """``candidates`` with -1 wherever an id is not a listed item or repeats earlier in its row.

    Retrieval promises alive, distinct candidates; this guard keeps a broken promise from ever
    putting a dead item or the same item twice into a slate.

    Args:
        candidates: (B, C) item ids, -1 padded.
        alive: (n_items,) bool, items currently listed.

    Returns:
        (B, C) int64 ids, same positions, invalid entries set to -1.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    alive = np.asarray(alive, dtype=bool)
    ok = (candidates >= 0) & (candidates < len(alive))
    ok[ok] = alive[candidates[ok]]
    cleaned = np.where(ok, candidates, -1)
    ranked = np.sort(cleaned, axis=1)  # the kept promise (no repeats) costs one plain sort
    if not ((ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)).any():
        return cleaned
    # a stable sort puts the first occurrence of an id before its repeats; flag the repeats
    order = np.argsort(cleaned, axis=1, kind="stable")
    ranked = np.take_along_axis(cleaned, order, 1)
    repeat = np.zeros(cleaned.shape, bool)
    repeat[:, 1:] = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
    is_repeat = np.zeros(cleaned.shape, bool)
    np.put_along_axis(is_repeat, order, repeat, 1)
    return np.where(is_repeat, -1, cleaned)


class RandomPolicy(Policy):
    """Ranks the candidates by uniform random scores drawn from the round's ``rng``; never learns."""

    name = "random"
    Params = RandomParams

    def recommend(self, request: RecommendRequest, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        candidates = valid_candidates(request.candidates, request.alive)
        scores = rng.random(candidates.shape)
        return top_k(candidates, scores, request.k)


class RefittingPolicy(ScoringPolicy):
    """A scoring policy refit from the whole log every ``refit_every`` rounds, frozen in between.

    Subclasses implement ``fit`` (learn from the log) and ``score``. Rounds are numbered from 0,
    and the refit happens after rounds ``refit_every - 1``, ``2 * refit_every - 1``, ...

    Args:
        refit_every: rounds between refits (>= 1).
    """

    def __init__(self, refit_every: int = 5):
        if int(refit_every) < 1:
            raise ValueError(f"refit_every must be an integer >= 1, got {refit_every!r}")
        self.refit_every = int(refit_every)

    def refit_due(self, round: int) -> bool:
        return (round + 1) % self.refit_every == 0

    def update(self, obs: Observation, rng: np.random.Generator) -> dict[str, float]:
        if not self.refit_due(obs.round):
            return {}
        return self.fit(obs.log, obs.catalogue, rng)

    @abstractmethod
    def fit(self, log: LogView, catalogue: CatalogueView, rng: np.random.Generator) -> dict[str, float]:
        """Learn from the whole log; return training metrics (``train/...``), no wall-clock values."""

    def recommend(self, request: RecommendRequest, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        candidates = valid_candidates(request.candidates, request.alive)
        scores = self.score(request.users, request.history, candidates).astype(np.float64)
        return top_k(candidates, scores, request.k)


class PopularityPolicy(RefittingPolicy):
    """Scores an item by its click count (``catalogue.interactions``) as of the last refit.

    Items listed after the last refit score 0 until the next one, like any item nobody clicked.

    Args:
        refit_every: rounds between refits (>= 1).
    """

    name = "popularity"
    Params = PopularityParams

    def __init__(self, refit_every: int = 5):
        super().__init__(refit_every)
        self.counts = np.zeros(0, np.float64)  # (n_items at last refit,) clicks

    def fit(self, log: LogView, catalogue: CatalogueView, rng: np.random.Generator) -> dict[str, float]:
        # a copy: the catalogue keeps counting, the policy must not see it until the next refit
        self.counts = np.array(catalogue.view("interactions"), dtype=np.float64)
        return {}

    def score(self, users: np.ndarray, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        known = (candidates >= 0) & (candidates < len(self.counts))
        scores = np.zeros(candidates.shape, np.float64)
        scores[known] = self.counts[candidates[known]]
        return scores
