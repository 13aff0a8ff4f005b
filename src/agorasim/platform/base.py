"""The platform agent's contract: choose the final slate's K columns of the policy's K' candidates.

Every re-ranker takes the whole batch of active users at once and passes
``agorasim.platform.conformance.check_reranker``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class RerankRequest:
    """One round's batch for the platform.

    Attributes:
        candidates: (B, K') item ids ranked by the policy, -1 padded at the end.
        relevance: (B, K') policy scores (higher is better; -inf at padding).
        item_utility: (B, K') expected item utility EIU > 0: how much the item gains from being
            shown to this user (its match with the user plus its promotion), from the item agents.
        groups: (n_items,) popularity group of every item, 0 = most popular.
        group_exposure: (G,) position-weighted exposure each group received over the ledger
            window (before this round).
        target: (G,) target exposure shares (sum 1).
        is_new: (n_items,) bool, item arrived within the new-item horizon.
        embedding: (n_items, d) item vectors (for diversity).
        k: slate length K.
        item_prior: (n_items,) the platform's predicted outcome of each new item (the evaluator,
            ``platform/evaluator.py``; higher is better), NaN where it has none; None without one.
    """

    candidates: np.ndarray
    relevance: np.ndarray
    item_utility: np.ndarray
    groups: np.ndarray
    group_exposure: np.ndarray
    target: np.ndarray
    is_new: np.ndarray
    embedding: np.ndarray
    k: int
    item_prior: np.ndarray | None = None


def take_columns(block: np.ndarray, columns: np.ndarray, fill=-1) -> np.ndarray:
    """``block[b, columns[b, j]]`` for every row, ``fill`` where the column is -1."""
    picked = np.take_along_axis(np.asarray(block), np.maximum(columns, 0), axis=1)
    return np.where(columns >= 0, picked, fill)


class Reranker(ABC):
    """Chooses K of the K' candidates per user, in slate order."""

    name: str = "reranker"
    # whether ``rerank`` reads ``request.item_utility`` (the item agents' EIU); the market skips
    # computing it for re-rankers that do not
    uses_item_utility: bool = False

    @abstractmethod
    def rerank(self, request: RerankRequest) -> np.ndarray:
        """Return (B, k) columns into ``request.candidates``: each row's chosen candidates in
        display order, distinct real ones, -1 only where a row has fewer than k real candidates."""

    def slates(self, request: RerankRequest) -> np.ndarray:
        """The (B, k) item ids of ``rerank``'s columns (-1 for empty slots)."""
        return take_columns(request.candidates, self.rerank(request))

    def end_round(self, metrics: dict[str, float]) -> None:  # noqa: B027 - optional hook
        """Observe the round's metrics (controllers adapt here). Default: nothing."""
