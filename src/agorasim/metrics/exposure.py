"""Exposure and its concentration over the catalogue.

Exposure of an item is the attention it receives from the slates shown: a slot at position
``pos`` (0-based) is worth ``1/log2(pos+2)``, the DCG position discount (Järvelin & Kekäläinen,
2002), so the top slot counts 1 and lower slots count less; raw counts are available too.

Every concentration measure here takes a per-item exposure vector over the *current* catalogue,
zero-exposure items included (DESIGN.md section 9); the caller drops items that have left.
All functions are vectorised numpy and return plain Python floats for scalar results.
"""

from __future__ import annotations

import math

import numpy as np

TARGET_KINDS = ("uniform", "supply", "merit")
# Added to every merit so that the lowest-quality group still has a (tiny) positive target and
# an all-equal quality vector gives shares proportional to group sizes instead of 0/0.
_MERIT_EPS = 1e-9


def position_weights(k: int) -> np.ndarray:
    """Position discount of each slate slot.

    Args:
        k: Number of slots.

    Returns:
        ``(k,)`` float64 array, ``1/log2(pos+2)`` for ``pos = 0..k-1`` (DCG discount,
        Järvelin & Kekäläinen 2002): 1, 0.631, 0.5, ...
    """
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)


def item_exposure(slates: np.ndarray, n_items: int, weighted: bool = True) -> np.ndarray:
    """Exposure received by every item from a batch of slates.

    Args:
        slates: ``(B, K)`` int item ids, best slot first; ``-1`` marks an empty slot and is
            ignored.
        n_items: Catalogue size; ids must lie in ``[0, n_items)``.
        weighted: If true, each slot adds its position weight ``1/log2(pos+2)``;
            otherwise each slot adds 1 (raw impression counts).

    Returns:
        ``(n_items,)`` float64 exposure per item.
    """
    slates = np.asarray(slates)
    if slates.ndim == 1:
        slates = slates[None, :]
    valid = slates >= 0
    ids = slates[valid]
    assert ids.size == 0 or ids.max() < n_items, "slate item id out of range"
    weights = None
    if weighted:
        weights = np.broadcast_to(position_weights(slates.shape[1]), slates.shape)[valid]
    return np.bincount(ids, weights=weights, minlength=n_items).astype(np.float64)


def _nonnegative(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    assert not np.any(x < 0), "exposure values must be non-negative"
    return x


def gini(x) -> float:
    """Gini coefficient of a non-negative vector, zero entries included.

    Uses the sorted form ``G = sum_i (2i - n - 1) x_(i) / (n sum x)`` with ``x_(i)`` ascending
    and ``i`` 1-based (Damgaard & Weiner 2000, eq. 1). Uniform gives 0; all mass on one of
    ``n`` entries gives ``(n-1)/n``.

    Args:
        x: ``(n,)`` non-negative values (exposure per item).

    Returns:
        The Gini coefficient in ``[0, (n-1)/n]``; 0.0 for an empty or all-zero vector.
    """
    x = _nonnegative(x)
    n = x.size
    total = x.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.dot(2.0 * i - n - 1.0, np.sort(x)) / (n * total))


def hhi(x) -> float:
    """Herfindahl-Hirschman index: sum of squared shares.

    ``HHI = sum_i s_i^2`` with ``s_i = x_i / sum x`` (Hirschman 1964). Uniform over ``n``
    gives ``1/n``; one item gives 1.

    Args:
        x: ``(n,)`` non-negative values.

    Returns:
        HHI in ``[1/n, 1]``; 0.0 if the total is 0.
    """
    x = _nonnegative(x)
    total = x.sum()
    if total <= 0:
        return 0.0
    shares = x / total
    return float(np.dot(shares, shares))


def entropy(x) -> float:
    """Normalised Shannon entropy of the shares.

    ``H = -sum_i s_i log s_i / log n`` (Shannon 1948, normalised by the maximum ``log n``), with
    ``0 log 0 = 0`` and ``n = len(x)`` so zero-exposure items lower the score. Uniform gives 1;
    one item gives 0.

    Args:
        x: ``(n,)`` non-negative values.

    Returns:
        Entropy in ``[0, 1]``; 0.0 if ``n <= 1`` or the total is 0.
    """
    x = _nonnegative(x)
    n = x.size
    total = x.sum()
    if n <= 1 or total <= 0:
        return 0.0
    shares = x / total
    # log(1) = 0 stands in for log(0) so that 0 log 0 contributes 0 without a warning.
    plogp = shares * np.log(np.where(shares > 0, shares, 1.0))
    return float(-plogp.sum() / math.log(n))


def coverage(x) -> float:
    """Share of entries that are strictly positive (catalogue coverage).

    Args:
        x: ``(n,)`` values, e.g. exposure per item.

    Returns:
        ``#{i: x_i > 0} / n``; 0.0 for an empty vector.
    """
    x = np.asarray(x).ravel()
    if x.size == 0:
        return 0.0
    return float(np.count_nonzero(x > 0) / x.size)


def _head_size(head_fraction: float, n: int) -> int:
    # The small tolerance keeps float noise (0.2 * 15 = 3.0000000000000004) from adding an item.
    return min(n, int(math.ceil(head_fraction * n - 1e-9)))


def tail_share(exposure, popularity, head_fraction: float = 0.2) -> float:
    """Share of exposure that goes to items outside the popularity head.

    The head is the ``ceil(head_fraction * n)`` items with the most past interactions, ties
    broken by lower item index first (stable sort of ``-popularity``); every other item is tail
    (the long-tail share of Abdollahpouri et al. 2017).

    Args:
        exposure: ``(n,)`` non-negative exposure per item.
        popularity: ``(n,)`` past interaction counts per item.
        head_fraction: Fraction of items counted as head, in ``[0, 1]``.

    Returns:
        Tail exposure divided by total exposure; 0.0 if the total is 0.
    """
    exposure = _nonnegative(exposure)
    popularity = np.asarray(popularity, dtype=np.float64).ravel()
    assert exposure.shape == popularity.shape, "exposure and popularity must align"
    total = exposure.sum()
    if total <= 0:
        return 0.0
    head = np.argsort(-popularity, kind="stable")[: _head_size(head_fraction, exposure.size)]
    tail = np.ones(exposure.size, bool)
    tail[head] = False
    # the tail's own sum: total - head sum rounds to about -1e-16 when the head has everything
    return float(exposure[tail].sum() / total)


def lorenz(x, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of a non-negative vector.

    Items are sorted ascending; the curve maps the poorest ``p`` share of items to the share of
    the total they hold (Lorenz 1905), linearly interpolated between the ``n + 1`` exact points.

    Args:
        x: ``(n,)`` non-negative values.
        points: Number of evenly spaced population shares to report (>= 2).

    Returns:
        ``(population_share, exposure_share)``, two ``(points,)`` float64 arrays from (0, 0) to
        (1, 1). An empty or all-zero vector gives the diagonal (perfect equality).
    """
    assert points >= 2, "lorenz needs at least the two endpoints"
    x = _nonnegative(x)
    population_share = np.linspace(0.0, 1.0, points)
    total = x.sum()
    if x.size == 0 or total <= 0:
        return population_share, population_share.copy()
    cumulative = np.concatenate(([0.0], np.cumsum(np.sort(x)) / total))
    exact_population = np.arange(x.size + 1, dtype=np.float64) / x.size
    exposure_share = np.interp(population_share, exact_population, cumulative)
    exposure_share[-1] = 1.0  # remove cumsum rounding at the endpoint
    return population_share, exposure_share


def popularity_groups(popularity, n_groups: int = 8) -> np.ndarray:
    """Equal-count popularity groups.

    Items are ranked by ``popularity`` descending, ties broken by lower index first (stable), and
    the item of rank ``r`` goes to group ``r * n_groups // n``; group 0 is the most popular.

    Args:
        popularity: ``(n,)`` past interaction counts per item.
        n_groups: Number of groups ``G``.

    Returns:
        ``(n,)`` int64 group of every item, in ``[0, n_groups)``.
    """
    popularity = np.asarray(popularity, dtype=np.float64).ravel()
    n = popularity.size
    order = np.argsort(-popularity, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    return rank * n_groups // max(n, 1)


def group_shares(exposure, groups, n_groups: int) -> np.ndarray:
    """Share of total exposure received by each group.

    Args:
        exposure: ``(n,)`` non-negative exposure per item.
        groups: ``(n,)`` int group of every item, in ``[0, n_groups)``.
        n_groups: Number of groups ``G``.

    Returns:
        ``(G,)`` float64 shares summing to 1; all zeros if the total exposure is 0.
    """
    exposure = _nonnegative(exposure)
    per_group = np.bincount(np.asarray(groups).ravel(), weights=exposure, minlength=n_groups)
    assert per_group.size == n_groups, "group id out of range"
    total = per_group.sum()
    if total <= 0:
        return np.zeros(n_groups, dtype=np.float64)
    return per_group / total


def target_shares(kind: str, groups, n_groups: int, quality=None) -> np.ndarray:
    """Exposure shares each group should receive under a fairness target.

    Args:
        kind: ``"uniform"`` (``1/G`` each), ``"supply"`` (share of items in each group) or
            ``"merit"`` (each group's share of the total merit, where an item's merit is
            ``quality - quality.min() + 1e-9`` so that it is positive).
        groups: ``(n,)`` int group of every item.
        n_groups: Number of groups ``G``.
        quality: ``(n,)`` item quality; required for ``"merit"``.

    Returns:
        ``(G,)`` float64 target shares summing to 1.

    Raises:
        ValueError: If ``kind`` is unknown or ``"merit"`` is asked for without ``quality``.
    """
    groups = np.asarray(groups).ravel()
    if kind == "uniform":
        return np.full(n_groups, 1.0 / n_groups)
    if kind == "supply":
        counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
        return counts / max(groups.size, 1)
    if kind == "merit":
        if quality is None:
            raise ValueError("target 'merit' needs quality: pass one value per item")
        quality = np.asarray(quality, dtype=np.float64).ravel()
        assert quality.shape == groups.shape, "quality and groups must align"
        if quality.size == 0:
            return np.zeros(n_groups, dtype=np.float64)
        merit = quality - quality.min() + _MERIT_EPS
        per_group = np.bincount(groups, weights=merit, minlength=n_groups)
        return per_group / per_group.sum()
    raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {kind!r}")


def dgu(shares, target) -> float:
    """Disparity of group exposure: L1 distance between group shares and target shares.

    ``DGU = sum_g |share_g - target_g|``, the group-utility disparity term of TriRec (its
    group-fairness objective over item popularity groups). 0 when every group gets its target;
    at most 2.

    Args:
        shares: ``(G,)`` exposure share per group.
        target: ``(G,)`` target share per group.

    Returns:
        The L1 gap in ``[0, 2]``.
    """
    gap = np.asarray(shares, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    return float(np.abs(gap).sum())


def mgu(shares, target) -> float:
    """Maximum group-utility gap: the largest single group's distance to its target.

    ``MGU = max_g |share_g - target_g|``, TriRec's worst-group counterpart of DGU.

    Args:
        shares: ``(G,)`` exposure share per group.
        target: ``(G,)`` target share per group.

    Returns:
        The largest absolute gap in ``[0, 1]``; 0.0 for zero groups.
    """
    gap = np.asarray(shares, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    return float(np.abs(gap).max()) if gap.size else 0.0


def group_vectors(exposure, popularity, n_groups: int = 8, target: str = "uniform",
                  quality=None) -> tuple[np.ndarray, np.ndarray]:
    """``(shares, target shares)`` of the popularity groups: the two vectors DGU and MGU compare.

    Args: as :func:`exposure_summary`.
    """
    groups = popularity_groups(popularity, n_groups)
    return group_shares(exposure, groups, n_groups), target_shares(target, groups, n_groups, quality)


def exposure_summary(
    exposure,
    popularity,
    n_groups: int = 8,
    target: str = "uniform",
    quality=None,
) -> dict[str, float]:
    """All concentration metrics of one exposure vector, namespaced for logging.

    Args:
        exposure: ``(n,)`` non-negative exposure per alive item (zeros included).
        popularity: ``(n,)`` past interactions per alive item; defines the head/tail split and
            the popularity groups.
        n_groups: Number of equal-count popularity groups for DGU/MGU.
        target: Target group shares, see :func:`target_shares`.
        quality: ``(n,)`` item quality, needed only for ``target="merit"``.

    Returns:
        Dict with keys ``exposure/gini``, ``exposure/hhi``, ``exposure/entropy``,
        ``exposure/coverage``, ``exposure/tail_share``, ``exposure/dgu``, ``exposure/mgu``.
    """
    shares, goal = group_vectors(exposure, popularity, n_groups, target, quality)
    return {
        "exposure/gini": gini(exposure),
        "exposure/hhi": hhi(exposure),
        "exposure/entropy": entropy(exposure),
        "exposure/coverage": coverage(exposure),
        "exposure/tail_share": tail_share(exposure, popularity),
        "exposure/dgu": dgu(shares, goal),
        "exposure/mgu": mgu(shares, goal),
    }
