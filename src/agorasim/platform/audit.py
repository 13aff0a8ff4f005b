"""Auditing promotions: how far the platform believes what item agents claim.

Today's audit reads an item's own catalogue (``agents/items.py``: ``audit_claims``, the metric
``promotions/unsupported_share``): exact, but only where the platform trusts the catalogue. The
neighbour audit is PaperEval's idea (ALGORITHMS.md section 10) turned to factuality: judge an item
by the items most like it. It retrieves the ``k`` nearest listed items by content (a faiss
inner-product index over unit content vectors; the item itself excluded) and flags every claimed
feature that fewer than ``threshold`` of them list. It can only work where similar items share
features (``market.features=category``); in the default world features are drawn independently of
content, and the audit is then a guess (its AUC is reported, not assumed).

``platform.audit`` says what the platform does with an audit: EIU, TriRec's item-side utility
(``platform/estimates.py``), reads a promotion's pull only in proportion to its supported claims
(``attributes``: those the catalogue supports; ``neighbours``: those the neighbour audit does not
flag); ``none`` believes promotions wholly, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from agorasim.metrics import accuracy

N_FEATURES = 12


def popcount(masks: np.ndarray) -> np.ndarray:
    return np.bitwise_count(masks.astype(np.uint64)).astype(np.float64)


@dataclass
class Audit:
    """The neighbour audit of a (B, K') block of promotions.

    Attributes:
        flagged: feature bit masks of the claims the audit flags.
        support: (B, K', F) share of the neighbours listing each feature.
    """

    flagged: np.ndarray
    support: np.ndarray

    def supported_share(self, claimed: np.ndarray) -> np.ndarray:
        """Share of each promotion's claims not flagged (1 where nothing is claimed)."""
        n = popcount(claimed)
        return np.where(n > 0, 1.0 - popcount(self.flagged & claimed) / np.maximum(n, 1), 1.0)

    def take(self, columns: np.ndarray) -> Audit:
        """The audit of the chosen columns (B, K) of each row."""
        safe = np.maximum(columns, 0)
        return Audit(np.take_along_axis(self.flagged, safe, 1),
                     np.take_along_axis(self.support, safe[:, :, None], 1))


class NeighbourAuditor:
    """Flags claims that the ``k`` nearest listed items by content do not share.

    Args:
        k: neighbours read per item.
        threshold: a claimed feature is flagged when fewer than this share of the neighbours list it.
    """

    def __init__(self, k: int, threshold: float):
        self.k, self.threshold = k, threshold

    def neighbour_features(self, items: np.ndarray, content: np.ndarray, features: np.ndarray,
                           listed: np.ndarray) -> np.ndarray:
        """(n, F) share of each item's k nearest listed items (itself excluded) that list each feature."""
        if len(items) == 0 or len(listed) < 2:
            return np.zeros((len(items), N_FEATURES))
        unit = (content / np.linalg.norm(content, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
        index = faiss.IndexFlatIP(unit.shape[1])
        index.add(unit[listed])
        k = min(self.k + 1, len(listed))
        _, found = index.search(unit[items], k)
        hits = np.where(found >= 0, listed[np.maximum(found, 0)], -1)
        keep = (hits >= 0) & (hits != items[:, None])
        keep &= np.cumsum(keep, 1) <= self.k  # the k nearest others
        bits = (features[np.maximum(hits, 0)][:, :, None] >> np.arange(N_FEATURES)) & 1  # (n, k+1, F)
        return (bits * keep[:, :, None]).sum(1) / np.maximum(keep.sum(1, keepdims=True), 1)

    def audit(self, items: np.ndarray, claimed: np.ndarray, content: np.ndarray, features: np.ndarray,
              listed: np.ndarray) -> Audit:
        """The audit of promotions ``claimed`` (B, K' bit masks) of ``items`` (B, K', -1 padded)."""
        unique, inverse = np.unique(np.maximum(items, 0), return_inverse=True)
        share = self.neighbour_features(unique, content, features, listed)[inverse.reshape(items.shape)]
        weak = share < self.threshold  # (B, K', F)
        flagged = (weak * (1 << np.arange(N_FEATURES))).sum(-1) & claimed
        return Audit(np.where(items >= 0, flagged, 0), share)


def audit_row(claimed: np.ndarray, unsupported: np.ndarray, audit: Audit | None) -> dict[str, float]:
    """The neighbour audit against the catalogue's truth over the shown promotions' claims:
    ``audit/flagged_share`` of claims flagged; ``audit/precision`` (flagged claims that are false),
    ``audit/recall`` (false claims flagged); ``audit/auc`` of ``1 - support`` separating false claims
    from true ones (0.5: the neighbours tell nothing). NaN where undefined."""
    keys = ("audit/flagged_share", "audit/precision", "audit/recall", "audit/auc")
    if audit is None:
        return dict.fromkeys(keys, float("nan"))
    bits = 1 << np.arange(N_FEATURES)
    is_claim = (claimed[..., None] & bits) > 0
    false = ((unsupported[..., None] & bits) > 0)[is_claim]
    flagged = ((audit.flagged[..., None] & bits) > 0)[is_claim]
    score = 1.0 - audit.support[is_claim]
    n = len(false)
    return {"audit/flagged_share": float(flagged.mean()) if n else float("nan"),
            "audit/precision": float(false[flagged].mean()) if flagged.any() else float("nan"),
            "audit/recall": float(flagged[false].mean()) if false.any() else float("nan"),
            "audit/auc": accuracy.auc(score, false) if n else float("nan")}
