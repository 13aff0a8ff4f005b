"""Deterministic fake backend for tests: every user clicks the slot given by a fixed rule."""

from __future__ import annotations

import numpy as np

from agorasim.agents.backends.base import SlateRequest, UserBackend
from agorasim.agents.feedback import FeedbackBatch


class FakeBackend(UserBackend):
    """Clicks the first slot whose promotion pull is highest (ties: earliest), rates it 4 stars;
    users whose id is divisible by ``skip_every`` click nothing. No randomness."""

    name = "fake"

    def __init__(self, skip_every: int = 5):
        self.skip_every = skip_every

    def decide(self, request: SlateRequest, rng: np.random.Generator) -> FeedbackBatch:
        hype = np.where(request.slates >= 0, request.hype, -np.inf)
        choice = np.argmax(hype, 1)
        skip = (request.users % self.skip_every == 0) | ~np.isfinite(hype.max(1))
        choice = np.where(skip, -1, choice)
        stars = np.where(choice >= 0, 4.0, np.nan)
        reason = np.where(request.slates >= 0, 3, -1)  # preferred_other
        rows = np.flatnonzero(choice >= 0)
        reason[rows, choice[rows]] = 0  # liked
        return FeedbackBatch(choice=choice, stars=stars, reason=reason)
