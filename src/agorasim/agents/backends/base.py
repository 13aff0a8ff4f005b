"""The user-agent backend protocol: one batched call decides for every active user of a round.

A backend sees the slates, the promotions and what the simulator can tell it about each user, and
returns grounded feedback for the whole batch. ``utility`` is the vectorised choice model of
DESIGN section 4; ``fake`` is a deterministic stand-in for tests. Language-model backends (hf,
vllm, openai) implement the same call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from agorasim.agents.feedback import FeedbackBatch


@dataclass
class SlateRequest:
    """What the users of one round are shown.

    Attributes:
        users: (B,) user ids.
        slates: (B, K) item ids in display order, -1 padded.
        true_utility: (B, K) delivered utility of each shown item (what the user will experience).
        hype: (B, K) promotional pull of each shown item's promotion.
        trust: (B,) the users' trust in promotions.
        round: the round.
        world: the world, for backends that render prompts (titles, histories, traits).
        promotion_text: (B, K) promotion text of each shown item, for language-model backends
            ("" where the item says nothing); None when no text was written.
        explain_pull: (B, K) pull of the platform's explanation of each shown item on perceived
            utility, weighted by trust as a promotion's (None: no explanations).
        explanation_text: (B, K) the explanations language-model users read (None: none).
    """

    users: np.ndarray
    slates: np.ndarray
    true_utility: np.ndarray
    hype: np.ndarray
    trust: np.ndarray
    round: int
    world: Any = None
    promotion_text: np.ndarray | None = None
    explain_pull: np.ndarray | None = None
    explanation_text: np.ndarray | None = None


class UserBackend(ABC):
    name = "backend"

    @abstractmethod
    def decide(self, request: SlateRequest, rng: np.random.Generator) -> FeedbackBatch:
        """Grounded feedback for every row of ``request``."""

    def llm_rows(self, users: np.ndarray) -> np.ndarray:
        """Boolean mask of the users this backend answers with a language model (none here)."""
        return np.zeros(len(users), bool)

    def flush(self) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, timings) this backend accumulated over the round, then reset."""
        return {}, {}
