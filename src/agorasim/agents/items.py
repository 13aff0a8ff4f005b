"""Item agents: providers promote their items, learn how hard to push, and exit when unseen.

Each provider picks a promotion strategy per round with an epsilon-greedy bandit rewarded by its
own rating-weighted clicks. A promotion is a set of claimed features (a bit mask) and an intensity.
In ``grounded`` mode claims are the item's catalogue features; in ``free`` mode strategies may add
invented features, which the factuality audit counts as unsupported claims and which users learn
to distrust. Providers whose exposure stays under a threshold of their fair share for W rounds
exit, and their items leave the market.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agorasim.config import ItemAgentsConfig

# (name, intensity, invented claims). Intensity scales the promotion's pull on perceived utility.
STRATEGIES = (
    ("quiet", 0.0, 0),
    ("modest", 0.5, 0),
    ("bold", 1.0, 0),
    ("exaggerate", 1.0, 1),
    ("hard-sell", 1.5, 2),
)
N_FEATURES = 12
CLAIM_SCALE = 4.0  # claims per unit of pull: four claimed features at intensity 1 add 1 utility unit


@dataclass
class Promotions:
    """Promotions for a (B, K') block of candidates.

    Attributes:
        claimed: feature bit masks claimed.
        unsupported: claimed bits the item does not have (factuality audit).
        hype: pull on perceived utility, ``intensity * popcount(claimed) / CLAIM_SCALE``.
        accuracy: share of claims that are true (1 where nothing is claimed).
    """

    claimed: np.ndarray
    unsupported: np.ndarray
    hype: np.ndarray
    accuracy: np.ndarray

    def take(self, columns: np.ndarray) -> "Promotions":
        """The promotions of the chosen columns (B, K) of each row."""
        pick = lambda a: np.take_along_axis(a, np.maximum(columns, 0), 1)  # noqa: E731
        return Promotions(pick(self.claimed), pick(self.unsupported),
                          np.where(columns >= 0, pick(self.hype), 0.0), pick(self.accuracy))


class ItemAgents:
    """All providers' promotion bandits and exit bookkeeping, as arrays over providers."""

    def __init__(self, cfg: ItemAgentsConfig, n_providers: int):
        self.cfg = cfg
        self.arms = np.arange(len(STRATEGIES)) if cfg.promotion == "free" else np.arange(3)
        self.value = np.ones((0, len(STRATEGIES)))  # optimistic start: every arm tried early
        self.count = np.zeros((0, len(STRATEGIES)))
        self.strategy = np.zeros(0, np.int64)
        self.under = np.zeros(0, np.int64)  # consecutive rounds under the exposure threshold
        self.active = np.zeros(0, bool)
        self.add_providers(n_providers)

    @property
    def n(self) -> int:
        return len(self.strategy)

    def add_providers(self, count: int) -> None:
        self.value = np.concatenate([self.value, np.ones((count, len(STRATEGIES)))])
        self.count = np.concatenate([self.count, np.zeros((count, len(STRATEGIES)))])
        self.strategy = np.concatenate([self.strategy, np.zeros(count, np.int64)])
        self.under = np.concatenate([self.under, np.zeros(count, np.int64)])
        self.active = np.concatenate([self.active, np.ones(count, bool)])

    def choose_strategies(self, rng: np.random.Generator) -> None:
        """Epsilon-greedy over the allowed arms, for every provider at once."""
        values = self.value[:, self.arms]
        greedy = self.arms[np.argmax(values, 1)]
        explore = self.arms[rng.integers(0, len(self.arms), self.n)]
        self.strategy = np.where(rng.random(self.n) < self.cfg.epsilon, explore, greedy)

    def promote(self, providers: np.ndarray, features: np.ndarray, valid: np.ndarray,
                rng: np.random.Generator) -> Promotions:
        """Promotions for candidate items given their providers and feature masks (B, K')."""
        if self.cfg.promotion == "off":
            zeros = np.zeros(providers.shape, np.int64)
            return Promotions(zeros, zeros, np.zeros(providers.shape), np.ones(providers.shape))
        strategy = self.strategy[providers]
        intensity = np.array([s[1] for s in STRATEGIES])[strategy]
        invented = np.array([s[2] for s in STRATEGIES])[strategy]
        claimed = features.copy()
        for extra in range(int(invented.max(initial=0))):
            bit = np.left_shift(1, rng.integers(0, N_FEATURES, providers.shape))
            claimed |= np.where(invented > extra, bit, 0)
        claimed = np.where(intensity > 0, claimed, 0) * valid
        unsupported = claimed & ~features
        n_claims = np.bitwise_count(claimed.astype(np.uint64)).astype(np.float64)
        n_false = np.bitwise_count(unsupported.astype(np.uint64)).astype(np.float64)
        hype = intensity * n_claims / CLAIM_SCALE
        accuracy = np.where(n_claims > 0, 1.0 - n_false / np.maximum(n_claims, 1), 1.0)
        return Promotions(claimed, unsupported, hype, accuracy)

    def learn(self, providers: np.ndarray, reward: np.ndarray) -> None:
        """Incremental-mean update of each provider's current arm (providers with impressions)."""
        arm = self.strategy[providers]
        self.count[providers, arm] += 1
        self.value[providers, arm] += (reward - self.value[providers, arm]) / self.count[providers, arm]

    def exits(self, exposure: np.ndarray, items_per_provider: np.ndarray) -> np.ndarray:
        """Providers that exit after this round.

        Args:
            exposure: (P,) exposure each provider's items received this round.
            items_per_provider: (P,) alive items of each provider.
        """
        total = exposure.sum()
        fair = total * items_per_provider / max(items_per_provider.sum(), 1)
        below = self.active & (exposure < self.cfg.exit_threshold * fair)
        self.under = np.where(below, self.under + 1, 0)
        leaving = np.flatnonzero(self.under >= self.cfg.exit_window)
        room = int(self.active.sum()) - self.cfg.min_providers
        leaving = leaving[: max(room, 0)]
        self.active[leaving] = False
        return leaving


def factuality(promotions: Promotions, shown: np.ndarray) -> float:
    """Share of claims in shown promotions that the catalogue does not support."""
    claimed = np.bitwise_count(promotions.claimed[shown].astype(np.uint64)).sum()
    false = np.bitwise_count(promotions.unsupported[shown].astype(np.uint64)).sum()
    return float(false / claimed) if claimed else 0.0
