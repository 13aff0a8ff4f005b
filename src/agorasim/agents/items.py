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

from agorasim.agents import prompts
from agorasim.agents.engines import ChatRequest, Engine, Meter, fill_memo
from agorasim.config import ItemAgentsConfig
from agorasim.metrics.round import unsupported_share

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

    def take(self, columns: np.ndarray) -> Promotions:
        """The promotions of the chosen columns (B, K) of each row."""
        pick = lambda a: np.take_along_axis(a, np.maximum(columns, 0), 1)  # noqa: E731
        return Promotions(pick(self.claimed), pick(self.unsupported),
                          np.where(columns >= 0, pick(self.hype), 0.0), pick(self.accuracy))


class ItemAgents:
    """All providers' promotion bandits and exit bookkeeping, as arrays over providers."""

    def __init__(self, cfg: ItemAgentsConfig, n_providers: int):
        self.cfg = cfg
        self.arms = np.arange(len(STRATEGIES)) if cfg.promotion in ("free", "adversarial") else np.arange(3)
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
        unsupported, n_claims, accuracy = audit_claims(claimed, features)
        return Promotions(claimed, unsupported, intensity * n_claims / CLAIM_SCALE, accuracy)

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


def audit_claims(claimed: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Claimed feature masks against the catalogue's: (unsupported masks, number of claims, share of
    claims that are true, 1 where nothing is claimed)."""
    unsupported = claimed & ~features
    n_claims = np.bitwise_count(claimed.astype(np.uint64)).astype(np.float64)
    n_false = np.bitwise_count(unsupported.astype(np.uint64)).astype(np.float64)
    return unsupported, n_claims, np.where(n_claims > 0, 1.0 - n_false / np.maximum(n_claims, 1), 1.0)


def factuality(promotions: Promotions, shown: np.ndarray) -> float:
    """Share of claims in shown promotions that the catalogue does not support."""
    return unsupported_share(promotions.claimed[shown], promotions.unsupported[shown])


class PromotionWriter:
    """Promotion text of shown items, for language-model users to read.

    The ``template`` writer renders the claimed features (instant, no model); a language-model
    writer asks its engine for a promotion of at most 50 words per (item, strategy, audience),
    memoised across rounds. In ``grounded`` mode the model is given only catalogue facts; in
    ``free`` mode it is given the strategy's claims (invented ones included) and told it may
    exaggerate, and the audit re-reads the claims from the text it wrote. ``adversarial`` mode
    appends an instruction aimed at the user agent (``prompts.ATTACKS``) to every promotion.

    Args:
        mode: ``agents.items.promotion``; engine: None for the template writer.
    """

    MEMO_LIMIT = 200_000

    def __init__(self, mode: str, engine: Engine | None = None, llm_cfg=None, seed: int = 0):
        self.mode, self.engine, self.cfg, self.seed = mode, engine, llm_cfg, seed
        self.meter = Meter("items", llm_cfg.price_in if llm_cfg else 0.0, llm_cfg.price_out if llm_cfg else 0.0)
        self.memo: dict[tuple, str] = {}

    @property
    def audits_text(self) -> bool:
        """Claims are read back from the text (a model wrote it) rather than from the bit mask."""
        return self.engine is not None

    def write(self, titles: list[str], items: np.ndarray, strategy: np.ndarray, claimed: np.ndarray,
              features: np.ndarray, price_band: np.ndarray, audience: list[str]) -> list[str]:
        """One text per item (all arrays (n,)); "" for quiet strategies or ``off``."""
        if self.mode == "off":
            return [""] * len(items)
        intensity = np.array([s[1] for s in STRATEGIES])[strategy]
        if self.engine is None:
            texts = [prompts.template_promotion(int(c), float(a), titles[i])
                     for i, c, a in zip(items, claimed, intensity)]
        else:
            texts = self._generate(titles, items, strategy, claimed, features, price_band, audience, intensity)
        if self.mode == "adversarial":
            texts = [f"{t} {prompts.ATTACKS[int(i) % len(prompts.ATTACKS)]}".strip() if a > 0 else t
                     for t, i, a in zip(texts, items, intensity)]
        return texts

    def _generate(self, titles, items, strategy, claimed, features, price_band, audience, intensity) -> list[str]:
        keys = [(int(i), int(s), a) for i, s, a in zip(items, strategy, audience)]
        todo = {}
        for n, key in enumerate(keys):
            if intensity[n] > 0 and key not in self.memo and key not in todo:
                facts = int(features[n]) if self.mode == "grounded" else int(claimed[n])
                messages = prompts.promotion_messages(titles[items[n]], int(price_band[n]), facts,
                                                      "grounded" if self.mode == "grounded" else "free", key[2])
                todo[key] = ChatRequest(messages=messages, max_tokens=80, temperature=self.cfg.temperature,
                                        top_p=self.cfg.top_p, seed=(self.seed * 7919 + key[0] * 31 + key[1]) % 2**31)
        # a failed call falls back to the template text, so the round goes on
        fill_memo(self.engine, self.meter, self.memo, todo, self.MEMO_LIMIT, prompts.clip_words)
        out = []
        for n, key in enumerate(keys):
            text = self.memo.get(key) if intensity[n] > 0 else ""
            if text is None:
                text = prompts.template_promotion(int(claimed[n]), float(intensity[n]), titles[items[n]])
            out.append(text)
        return out

    def flush(self) -> tuple[dict[str, float], dict[str, float]]:
        if self.engine is None:
            return {}, {}
        return self.meter.flush()
