"""Utility backend: multinomial logit over the slate plus an outside option (DESIGN section 4)."""

from __future__ import annotations

import numpy as np

from agorasim.agents.backends.base import SlateRequest, UserBackend
from agorasim.agents.feedback import REASONS, FeedbackBatch
from agorasim.config import UserAgentsConfig

LIKED, DISAPPOINTED, NOT_INTERESTED, PREFERRED_OTHER = range(len(REASONS))


def perceived_utility(request: SlateRequest, position_bias: float) -> np.ndarray:
    """``U + trust_u * (hype_ui + explain_ui) - b * log2(pos + 1)``; -inf on padding slots."""
    k = request.slates.shape[1]
    bias = position_bias * np.log2(np.arange(k) + 1.0)
    pull = request.hype if request.explain_pull is None else request.hype + request.explain_pull
    value = request.true_utility + request.trust[:, None] * pull - bias
    return np.where(request.slates >= 0, value, -np.inf)


def choice_probabilities(perceived: np.ndarray, outside: float, temperature: float) -> np.ndarray:
    """(B, K+1) logit probabilities; the last column is the outside option."""
    logits = np.concatenate([perceived, np.full((len(perceived), 1), outside)], 1) / temperature
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def stars_from_utility(utility: np.ndarray, center: float, noise, rounded: bool = True) -> np.ndarray:
    """1-5 stars from *true* utility: ``3 + 2 (U - center + noise)``, rounded and clipped
    (``rounded=False``: the expected stars, clipped only).

    Ratings read the delivered utility, not the perceived one, so an item clicked on an
    inflated promise earns fewer stars than its click suggested.
    """
    stars = 3.0 + 2.0 * (utility - center + noise)
    return np.clip(np.rint(stars) if rounded else stars, 1, 5)


class UtilityBackend(UserBackend):
    """Vectorised choice model: Gumbel-max sampling of the logit choice, ratings from true utility."""

    name = "utility"

    def __init__(self, cfg: UserAgentsConfig):
        self.cfg = cfg

    def decide(self, request, rng):
        cfg = self.cfg
        perceived = perceived_utility(request, cfg.position_bias)
        b, k = perceived.shape
        logits = np.concatenate([perceived, np.full((b, 1), cfg.outside_utility)], 1) / cfg.temperature
        # Gumbel-max draws exactly from the logit probabilities without normalising
        pick = np.argmax(logits + rng.gumbel(size=logits.shape), 1)
        choice = np.where(pick == k, -1, pick)
        rows = np.arange(b)
        clicked = choice >= 0
        delivered = request.true_utility[rows, np.maximum(choice, 0)]
        stars = np.where(clicked, stars_from_utility(delivered, cfg.rating_center,
                                                     rng.normal(0, cfg.rating_noise, b)), np.nan)
        reason = np.where(perceived < cfg.outside_utility, NOT_INTERESTED, PREFERRED_OTHER)
        reason[rows[clicked], choice[clicked]] = np.where(stars[clicked] >= 3, LIKED, DISAPPOINTED)
        reason = np.where(request.slates >= 0, reason, -1)
        return FeedbackBatch(choice=choice, stars=stars, reason=reason)
