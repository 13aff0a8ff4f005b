"""The round's metrics row: one pure function over the round's arrays.

``round_row`` reads only what it is given (``RoundArrays``: the shown slates and their feedback,
the catalogue's exposure bookkeeping, the users' state after their update, the accuracy probe's
true top items and the providers' counts) and returns the row ``metrics.csv`` records, keys in
the order of its columns. The market gathers the arrays after its update phases
(``env/market.py``, ``Market.measure``); nothing here draws a random number or changes state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agorasim.metrics import accuracy, exposure


@dataclass
class RoundArrays:
    """Everything one round's metrics row is computed from.

    Attributes:
        round: the round number.
        slates: (B, K) shown item ids, -1 padded.
        utility: (B, K) true utility of each shown item to its user.
        good: (B, K) the user would rate the shown item 4 stars or more (noise-free), the label
            of the decision accuracy ``users/decision_auc``.
        choice: (B,) clicked slot, -1 for no click.
        stars: (B,) stars of the clicked item (NaN without a click).
        hype: (B, K) promotion pull of the shown items.
        claimed, unsupported: (B, K) claimed and unsupported feature bit masks of the shown promotions.
        item_exposure: (n,) position-weighted exposure of every item this round.
        window: (n,) exposure over the ledger window (this round included).
        cumulative: (n,) exposure since round 0.
        popularity: (n,) clicks so far.
        quality: (n,) item quality (the ``quality`` target reads it).
        is_new: (n,) item arrived within the new-item horizon.
        born: (n,) arrival round of every item.
        newly_seen: ids of items first shown this round.
        alive: ids of the items listed this round (before this round's provider exits).
        trust: (A,) trust of the active users after their update.
        churned: users who churned this round.
        eval_slates: (E, 10) the accuracy probe's slates (first 10 slots).
        eval_top: (E, 10) the probe users' true top-10 alive items.
        n_groups, target: the platform's popularity groups and exposure target kind.
        outside_utility: utility of not clicking (the users' delivered utility without a click).
        exits, providers_active: providers leaving after this round, and those still active.
        fairness_weight: the re-ranker's current fairness weight (NaN when it has none).
    """

    round: int
    slates: np.ndarray
    utility: np.ndarray
    good: np.ndarray
    choice: np.ndarray
    stars: np.ndarray
    hype: np.ndarray
    claimed: np.ndarray
    unsupported: np.ndarray
    item_exposure: np.ndarray
    window: np.ndarray
    cumulative: np.ndarray
    popularity: np.ndarray
    quality: np.ndarray
    is_new: np.ndarray
    born: np.ndarray
    newly_seen: np.ndarray
    alive: np.ndarray
    trust: np.ndarray
    churned: int
    eval_slates: np.ndarray
    eval_top: np.ndarray
    n_groups: int
    target: str
    outside_utility: float
    exits: int
    providers_active: int
    fairness_weight: float


def unsupported_share(claimed: np.ndarray, unsupported: np.ndarray) -> float:
    """Share of the claimed feature bits (masks) that the catalogue does not support; 0 without claims."""
    claims = np.bitwise_count(claimed.astype(np.uint64)).sum()
    false = np.bitwise_count(unsupported.astype(np.uint64)).sum()
    return float(false / claims) if claims else 0.0


def round_row(a: RoundArrays) -> dict[str, float]:
    """The round's metrics: exposure concentration (window, round, cumulative), new items,
    promotions' factuality and pull, users' utility, clicks, ratings and trust, accuracy of the
    slates against the probe users' true top items, and the providers' counts."""
    alive, window = a.alive, a.window
    row: dict[str, float] = {"round": a.round}
    row.update(exposure.exposure_summary(window[alive], a.popularity[alive], a.n_groups, a.target, a.quality[alive]))
    row["exposure/gini_round"] = exposure.gini(a.item_exposure[alive])
    row["exposure/gini_cumulative"] = exposure.gini(a.cumulative[alive])
    is_new = a.is_new[alive]
    total = window[alive].sum()
    row["items/new_share"] = float(window[alive][is_new].sum() / total) if total > 0 else 0.0
    row["items/new_supply"] = float(is_new.mean()) if len(alive) else 0.0
    fresh = a.newly_seen[a.born[a.newly_seen] > 0]
    row["items/time_to_first_exposure"] = float(np.mean(a.round - a.born[fresh])) if len(fresh) else float("nan")
    row["items/alive"] = float(len(alive))
    valid = a.slates >= 0
    row["promotions/unsupported_share"] = unsupported_share(a.claimed[valid], a.unsupported[valid])
    row["promotions/hype"] = float(a.hype[valid].mean()) if valid.any() else 0.0
    b, k = a.slates.shape
    weights = exposure.position_weights(k)
    slate_utility = (np.where(valid, a.utility, 0.0) * weights).sum(1) / (valid * weights).sum(1).clip(1e-12)
    any_click = a.choice >= 0
    row["users/utility"] = float(slate_utility.mean()) if b else float("nan")
    delivered = np.where(any_click, a.utility[np.arange(b), np.maximum(a.choice, 0)], a.outside_utility)
    row["users/delivered"] = float(delivered.mean()) if b else float("nan")
    row["users/click_rate"] = float(any_click.mean()) if b else 0.0
    row["users/rating"] = float(np.nanmean(a.stars)) if any_click.any() else float("nan")
    # decision accuracy (SELLER's utility-aware check): AUC of the click, over the shown items,
    # against "the user would rate it 4 stars or more"; 0.5 when clicks ignore what is good
    clicked = np.zeros((b, k), dtype=bool)
    clicked[np.flatnonzero(any_click), a.choice[any_click]] = True
    row["users/decision_auc"] = accuracy.auc(clicked[valid], a.good[valid])
    row["users/trust"] = float(a.trust.mean())
    row["users/visits"] = float(b)
    row["users/churned"] = float(a.churned)
    row["users/active"] = float(len(a.trust))
    if len(a.eval_slates):
        gains = (a.eval_slates[:, :, None] == a.eval_top[:, None, :]).any(2).astype(np.float64)
        ideal = np.ones((len(a.eval_top), a.eval_top.shape[1]))
        row["accuracy/ndcg@10"] = accuracy.ndcg_at_k(gains, ideal, 10)
        row["accuracy/recall@10"] = accuracy.recall_at_k(a.eval_slates, a.eval_top, 10)
    else:
        row["accuracy/ndcg@10"] = row["accuracy/recall@10"] = float("nan")
    row["providers/exits"] = float(a.exits)
    row["providers/active"] = float(a.providers_active)
    row["platform/fairness_weight"] = float(a.fairness_weight)
    return row


EXPLANATION_KEYS = ("explain/precision", "explain/recall", "explain/f1", "explain/misrep", "explain/align",
                    "explain/click_lift")


def explanation_row(named: np.ndarray, reasons: np.ndarray, misrep: np.ndarray, align: np.ndarray,
                    lift: np.ndarray | None) -> dict[str, float]:
    """SELLER's utility-aware evaluation of one round's explanations, over the explained shown items.

    Text quality: micro precision and recall of the named aspects against the users' true reasons,
    and their F1. Effect: ``misrep``, the share of named aspects the items lack; ``align``, the
    users' mean taste for what was named; ``click_lift``, the mean over utility users of the click
    probability with the explanations minus without (the decision accuracy is ``users/decision_auc``).

    Args:
        named, reasons: (B, K, E) aspect ids, -1 padded.
        misrep, align: (B, K) per shown item (``agents.users.Reaction``).
        lift: (B,) per user, NaN for language-model users; None: not measured.
    """
    explained = (named >= 0).any(2)
    hits = ((named[..., :, None] == reasons[..., None, :]) & (named[..., :, None] >= 0)).any(3).sum()
    n_named, n_reasons = (named >= 0).sum(), (reasons[explained] >= 0).sum()
    precision = hits / n_named if n_named else float("nan")
    recall = hits / n_reasons if n_reasons else float("nan")
    if not (n_named and n_reasons):
        f1 = float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    finite = lift is not None and np.isfinite(lift).any()
    return {"explain/precision": float(precision), "explain/recall": float(recall), "explain/f1": float(f1),
            "explain/misrep": float(misrep[explained].mean()) if explained.any() else float("nan"),
            "explain/align": float(align[explained].mean()) if explained.any() else float("nan"),
            "explain/click_lift": float(np.nanmean(lift)) if finite else float("nan")}
