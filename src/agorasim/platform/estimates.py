"""What the platform estimates from what it may observe: items' expected utility to a user, the
items' popularity groups and the groups' target exposure shares.

Pure functions over observable arrays (content vectors, click counts, the alive list, the
promotions' pull); the market calls them each round and hands the results to the re-ranker
(``RerankRequest``) and to the policies (``ExposureState``).
"""

from __future__ import annotations

import numpy as np

from agorasim.metrics import exposure


def expected_item_utility(profiles: np.ndarray, content: np.ndarray, hype: np.ndarray) -> np.ndarray:
    """EIU, TriRec's item-side utility: ``sigmoid(3 * <profile, content> + hype)``.

    Args:
        profiles: (B, d) what the platform knows of each user (the mean of its history vectors).
        content: (B, K', d) observable vectors of each user's ranked candidates.
        hype: (B, K') the candidates' promotion pull.

    Returns:
        (B, K') values in (0, 1): how much each item gains from being shown to this user.
    """
    match = np.einsum("bd,bkd->bk", profiles, content)
    return 1.0 / (1.0 + np.exp(-(3.0 * match + hype)))


def popularity_groups(popularity: np.ndarray, alive: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_items,) popularity group of every item, computed over the alive ones (0 = most
    popular; items that left the market: group 0)."""
    groups = np.zeros(len(popularity), np.int64)
    groups[alive] = exposure.popularity_groups(popularity[alive], n_groups)
    return groups


def group_targets(target: str, groups: np.ndarray, alive: np.ndarray, n_groups: int,
                  quality: np.ndarray) -> np.ndarray:
    """(n_groups,) target exposure shares of the groups (``platform.target``) over alive items."""
    return exposure.target_shares(target, groups[alive], n_groups, quality[alive])
