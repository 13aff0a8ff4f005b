"""Ranking accuracy and beyond-accuracy metrics of recommended slates.

Rows are users: ``ranked`` is ``(B, K)`` item ids, best first, with ``-1`` for an empty slot
(an empty slot is always a miss). Accuracy is measured against each user's true top items (the
world knows the utility) and against the next consumed item (DESIGN.md section 9). Everything is
vectorised over users; mean metrics return plain Python floats.
"""

from __future__ import annotations

import numpy as np

from agorasim.metrics.exposure import position_weights


def dcg_weights(k: int) -> np.ndarray:
    """DCG position discounts ``1/log2(pos+2)``, ``pos = 0..k-1`` (Järvelin & Kekäläinen 2002).

    Args:
        k: Number of positions.

    Returns:
        ``(k,)`` float64 array.
    """
    return position_weights(k)


def _mean(rows: np.ndarray) -> float:
    return float(rows.mean()) if rows.size else 0.0


def ndcg_at_k_rows(gains: np.ndarray, ideal_gains: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k from gathered gains.

    ``DCG@k = sum_{pos<k} gain_pos / log2(pos+2)`` and ``NDCG@k = DCG@k / IDCG@k``
    (Järvelin & Kekäläinen 2002, linear gains), where IDCG uses the user's best gains.

    Args:
        gains: ``(B, K)`` gain of each ranked item for its user, in ranked order; empty slots
            should carry gain 0.
        ideal_gains: ``(B, M)`` the user's best achievable gains, sorted descending.
        k: Cut-off.

    Returns:
        ``(B,)`` float64 NDCG@k; 0 for rows whose ideal DCG is 0.
    """
    gains = np.asarray(gains, dtype=np.float64)[:, :k]
    ideal_gains = np.asarray(ideal_gains, dtype=np.float64)[:, :k]
    dcg = gains @ dcg_weights(gains.shape[1])
    idcg = ideal_gains @ dcg_weights(ideal_gains.shape[1])
    positive = idcg > 0
    return np.where(positive, dcg / np.where(positive, idcg, 1.0), 0.0)


def ndcg_at_k(gains: np.ndarray, ideal_gains: np.ndarray, k: int) -> float:
    """Mean NDCG@k over users; see :func:`ndcg_at_k_rows`.

    Args:
        gains: ``(B, K)`` gain of each ranked item for its user.
        ideal_gains: ``(B, M)`` the user's best gains, sorted descending.
        k: Cut-off.

    Returns:
        Mean NDCG@k (0.0 for no rows).
    """
    return _mean(ndcg_at_k_rows(gains, ideal_gains, k))


def _target_matches(ranked: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """``(B, min(k, K))`` bool: slot holds the user's target; padding never matches."""
    top = np.asarray(ranked)[:, :k]
    target = np.asarray(target).ravel()
    return (top == target[:, None]) & (top >= 0)


def hits_at_k(ranked: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Whether each user's held-out item appears in the top ``k``.

    Args:
        ranked: ``(B, K)`` item ids, best first; ``-1`` is an empty slot.
        target: ``(B,)`` one held-out item per user.
        k: Cut-off.

    Returns:
        ``(B,)`` float64 of 0/1.
    """
    return _target_matches(ranked, target, k).any(axis=1).astype(np.float64)


def hr_at_k(ranked: np.ndarray, target: np.ndarray, k: int) -> float:
    """Hit rate@k: mean of :func:`hits_at_k` over users.

    Args:
        ranked: ``(B, K)`` item ids, best first.
        target: ``(B,)`` one held-out item per user.
        k: Cut-off.

    Returns:
        Fraction of users whose target is in their top ``k``.
    """
    return _mean(hits_at_k(ranked, target, k))


def ndcg_next_item_at_k(ranked: np.ndarray, target: np.ndarray, k: int) -> float:
    """NDCG@k with a single relevant item (the next consumed one).

    With one relevant item the ideal DCG is 1, so the score is ``1/log2(rank+2)`` if the target
    sits at 0-based ``rank < k`` and 0 otherwise (the leave-one-out protocol of SASRec,
    Kang & McAuley 2018).

    Args:
        ranked: ``(B, K)`` item ids, best first.
        target: ``(B,)`` one held-out item per user.
        k: Cut-off.

    Returns:
        Mean over users.
    """
    matches = _target_matches(ranked, target, k)
    # max, not sum: a duplicated target in a slate still counts once, at its best rank.
    rows = (matches * dcg_weights(matches.shape[1])).max(axis=1, initial=0.0)
    return _mean(rows)


def recall_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Recall@k against a set of relevant items per user.

    ``Recall@k = |top-k ∩ relevant| / |relevant|`` per user, 0 for users with no relevant item,
    then averaged. Computed with one ``(B, k, R)`` comparison.

    Args:
        ranked: ``(B, K)`` item ids, best first; ``-1`` is an empty slot.
        relevant: ``(B, R)`` relevant item ids (distinct per row), ``-1`` padding.
        k: Cut-off.

    Returns:
        Mean recall@k over users.
    """
    top = np.asarray(ranked)[:, :k]
    relevant = np.asarray(relevant)
    if relevant.ndim == 1:
        relevant = relevant[:, None]
    is_relevant = relevant >= 0
    # found[b, r]: relevant item r of user b appears somewhere in the user's top k.
    found = (top[:, :, None] == relevant[:, None, :]).any(axis=1) & is_relevant
    n_relevant = is_relevant.sum(axis=1)
    rows = np.where(n_relevant > 0, found.sum(axis=1) / np.maximum(n_relevant, 1), 0.0)
    return _mean(rows)


def true_top_items(utility: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest-utility items per user, best first.

    Uses ``torch.topk`` on the CPU: a partial selection, about 10x faster than
    ``np.argpartition`` on a (256, 20000) matrix, and never a full sort of a row.

    Args:
        utility: ``(B, n)`` true utility of every item for every user.
        k: Number of items to keep; clipped to ``n``.

    Returns:
        ``(B, min(k, n))`` int64 item indices, descending utility.
    """
    import torch

    utility = np.asarray(utility)
    if not np.issubdtype(utility.dtype, np.floating):
        utility = utility.astype(np.float64)
    k = min(k, utility.shape[1])
    if k <= 0:
        return np.empty((utility.shape[0], 0), dtype=np.int64)
    _, top = torch.from_numpy(np.ascontiguousarray(utility)).topk(k, dim=1, largest=True, sorted=True)
    return top.numpy().astype(np.int64)


def intra_list_diversity(slates: np.ndarray, embedding: np.ndarray) -> float:
    """Intra-list diversity: mean pairwise cosine distance inside each slate.

    ``ILD(slate) = mean_{i<j} (1 - cos(e_i, e_j))`` over the slate's non-empty slots
    (Ziegler et al. 2005), averaged over slates with at least two items. A zero embedding has
    cosine 0 with everything.

    Args:
        slates: ``(B, K)`` item ids, ``-1`` for an empty slot.
        embedding: ``(n_items, d)`` item embeddings.

    Returns:
        Mean ILD in ``[0, 2]``; 0.0 if no slate has two items.
    """
    slates = np.asarray(slates)
    embedding = np.asarray(embedding, dtype=np.float64)
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    unit = embedding / np.where(norms > 0, norms, 1.0)
    valid = slates >= 0
    vectors = unit[np.where(valid, slates, 0)]  # (B, K, d)
    cosine = vectors @ vectors.transpose(0, 2, 1)  # (B, K, K)
    k = slates.shape[1]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    n_pairs = pairs.sum(axis=(1, 2))
    has_pairs = n_pairs > 0
    if not has_pairs.any():
        return 0.0
    distance_sum = ((1.0 - cosine) * pairs).sum(axis=(1, 2))
    return float((distance_sum[has_pairs] / n_pairs[has_pairs]).mean())


def novelty(slates: np.ndarray, popularity: np.ndarray) -> float:
    """Mean self-information of the shown items.

    ``novelty(i) = -log2((pop_i + 1) / (sum pop + n_items))``, the popularity-based
    self-information of Zhou et al. 2010 with add-one smoothing so unseen items stay finite.

    Args:
        slates: ``(B, K)`` item ids, ``-1`` for an empty slot (ignored).
        popularity: ``(n_items,)`` past interaction counts.

    Returns:
        Mean novelty in bits over all shown items; 0.0 if nothing is shown.
    """
    slates = np.asarray(slates)
    popularity = np.asarray(popularity, dtype=np.float64).ravel()
    shown = slates[slates >= 0]
    if shown.size == 0:
        return 0.0
    information = -np.log2((popularity + 1.0) / (popularity.sum() + popularity.size))
    return float(information[shown].mean())


def auc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` from the rest.

    The Mann-Whitney form: the fraction of (positive, negative) pairs where the positive scores
    higher, a tie counting 1/2; 0.5 is chance. With 0/1 scores it is ``(1 + TPR - FPR) / 2``.

    Args:
        scores: Scores of any shape.
        positive: Bool of the same shape.

    Returns:
        The AUC in ``[0, 1]``; ``nan`` if there are no positives or no negatives.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"auc: scores {scores.shape} and positive {positive.shape} differ in shape")
    hits, misses = scores[positive], np.sort(scores[~positive])
    if hits.size == 0 or misses.size == 0:
        return float("nan")
    below = np.searchsorted(misses, hits, side="left")
    tied = np.searchsorted(misses, hits, side="right") - below
    return float((below + 0.5 * tied).sum() / (hits.size * misses.size))
