"""Grounded feedback: what a user agent says about the slate it was shown.

The schema is shared by every backend. The utility backend fills ``FeedbackBatch`` arrays for the
whole batch at once; language-model backends (and events.jsonl) speak ``SlateFeedback`` records,
whose validator rejects any judgement about an item that was not in the slate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from agorasim.data.synthetic import FEATURES

REASONS = ("liked", "disappointed", "not_interested", "preferred_other")
Reason = Literal["liked", "disappointed", "not_interested", "preferred_other"]


class PromotionShown(BaseModel):
    """The promotion an item carried when it was shown (``agents/items.py``)."""

    claimed: list[str] = Field(description="catalogue features the promotion claimed")
    unsupported: list[str] = Field(description="claimed features the item does not have (the factuality audit)")
    hype: float = Field(description="the promotion's pull on the user's perceived utility")


def feature_list(mask: int) -> list[str]:
    """Names of the catalogue features set in a feature bit mask."""
    return [name for f, name in enumerate(FEATURES) if int(mask) >> f & 1]


class Judgement(BaseModel):
    """One user's verdict on one shown item."""

    item_id: int = Field(description="an item id from the slate the user was shown")
    click: bool = Field(description="the user opened the item")
    rating: float | None = Field(None, ge=0, le=10, description="0-10 rating, only after a click")
    reason: Reason = Field(description="reason code")
    why: str | None = Field(None, description="the language-model user's own words, if any")
    promotion: PromotionShown | None = Field(None, description="the promotion shown with the item, when recorded")
    explanation: list[str] | None = Field(None, description="aspects the platform's explanation named, when recorded")


class LLMJudgement(BaseModel):
    """One judgement as a language-model user writes it (validated, then grounded in the slate)."""

    item_id: int
    click: bool
    rating: float | None = Field(None, ge=0, le=10)
    reason: str = Field("", max_length=300)


class SlateFeedback(BaseModel):
    """All judgements of one user about one slate; every judgement must be grounded in it."""

    user_id: int
    round: int
    slate: list[int]
    judgements: list[Judgement]

    @model_validator(mode="after")
    def _grounded(self) -> SlateFeedback:
        shown = set(self.slate)
        seen: set[int] = set()
        for judgement in self.judgements:
            if judgement.item_id not in shown:
                raise ValueError(f"item {judgement.item_id} was not in the slate {self.slate}")
            if judgement.item_id in seen:
                raise ValueError(f"item {judgement.item_id} judged twice")
            seen.add(judgement.item_id)
        if sum(j.click for j in self.judgements) > 1:
            raise ValueError("at most one click per slate (single-choice model)")
        return self


def stars_to_rating(stars):
    """The 0-10 view of a 1-5 star rating (1 star -> 0, 5 stars -> 10)."""
    return 2.5 * (stars - 1.0)


def rating_to_stars(rating):
    """The 1-5 star view of a 0-10 rating (the inverse of ``stars_to_rating``)."""
    return 1.0 + rating / 2.5


@dataclass
class FeedbackBatch:
    """Feedback of B users on their (B, K) slates, as arrays.

    Attributes:
        choice: (B,) slot index of the clicked item, -1 for the outside option.
        stars: (B,) 1-5 rating of the clicked item, NaN when nothing was clicked.
        reason: (B, K) index into REASONS for every shown slot (-1 for padding).
        why: row -> {item id: reason text} for rows answered by a language model.
    """

    choice: np.ndarray
    stars: np.ndarray
    reason: np.ndarray
    why: dict | None = None

    def validate(self, slates: np.ndarray) -> None:
        """Grounding check on arrays: a click names a real slot of the row's slate."""
        rows = np.flatnonzero(self.choice >= 0)
        assert np.all(self.choice < slates.shape[1]), "choice outside the slate"
        assert np.all(slates[rows, self.choice[rows]] >= 0), "click on an empty slot"
        assert np.all(np.isfinite(self.stars[rows])), "click without a rating"

    def records(self, users: np.ndarray, slates: np.ndarray, round: int, rows: np.ndarray,
                shown=None, explained: np.ndarray | None = None, aspect_names=()) -> list[SlateFeedback]:
        """Pydantic records for the given batch rows (e.g. a sample written to events.jsonl);
        with ``shown`` (the slates' ``Promotions``), each judgement names its item's promotion, and
        with ``explained`` ((B, K, E) aspect ids, -1 padded) the aspects its explanation named."""
        out = []
        for b in rows:
            judgements = []
            for slot, item in enumerate(slates[b]):
                if item < 0:
                    continue
                clicked = bool(self.choice[b] == slot)
                promotion = None if shown is None else PromotionShown(
                    claimed=feature_list(shown.claimed[b, slot]), unsupported=feature_list(shown.unsupported[b, slot]),
                    hype=float(shown.hype[b, slot]))
                judgements.append(Judgement(
                    item_id=int(item), click=clicked,
                    rating=float(stars_to_rating(self.stars[b])) if clicked else None,
                    reason=REASONS[int(self.reason[b, slot])],
                    why=(self.why or {}).get(int(b), {}).get(int(item)), promotion=promotion,
                    explanation=None if explained is None else [aspect_names[a] for a in explained[b, slot] if a >= 0]))
            out.append(SlateFeedback(user_id=int(users[b]), round=round,
                                     slate=[int(i) for i in slates[b] if i >= 0], judgements=judgements))
        return out
