"""A windowed ledger of position-weighted item exposure: the platform's memory of who was shown.

The fairness re-rankers read the exposure every popularity group received over the last
``window`` rounds (``group_exposure``), the same state for every user of a round, so the result
does not depend on the order in which users happen to be processed (unlike TriRec's within-batch
running state). The catalogue grows during a run, so later rounds may carry longer vectors;
shorter ones count as zero for the items that did not exist yet.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class ExposureLedger:
    """Per-round item exposure over a sliding window of rounds.

    Args:
        window: number of most recent recorded rounds kept (>= 1).

    Attributes:
        window: the window length in rounds.
    """

    def __init__(self, window: int):
        if int(window) < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = int(window)
        # (round, exposure vector) pairs, oldest first; deque and arrays keep the ledger picklable
        self._rounds: deque[tuple[int, np.ndarray]] = deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._rounds)

    @property
    def rounds(self) -> list[int]:
        """The recorded rounds still inside the window, oldest first."""
        return [r for r, _ in self._rounds]

    def record(self, round: int, item_exposure: np.ndarray) -> None:
        """Store one round's exposure; the oldest round falls out once the window is full.

        Args:
            round: the round the exposure was received in (strictly increasing across calls).
            item_exposure: (n_items,) position-weighted exposure of every item this round
                (sum over users of 1/log2(pos+2) at the positions the item was shown).
        """
        exposure = np.asarray(item_exposure, dtype=np.float64)
        assert exposure.ndim == 1, f"item_exposure must be 1-D, got shape {exposure.shape}"
        if self._rounds:
            assert round > self._rounds[-1][0], (
                f"rounds must be recorded in increasing order: {round} after {self._rounds[-1][0]}")
        # copy so the caller can reuse its buffer
        self._rounds.append((int(round), exposure.copy()))

    def item_totals(self, n_items: int) -> np.ndarray:
        """(n_items,) exposure summed over the window; items absent from a round count zero."""
        totals = np.zeros(n_items, dtype=np.float64)
        for _, exposure in self._rounds:
            assert exposure.shape[0] <= n_items, (
                f"a recorded round has {exposure.shape[0]} items but n_items={n_items}; "
                "the catalogue only grows")
            totals[: exposure.shape[0]] += exposure
        return totals

    def group_exposure(self, groups: np.ndarray, n_groups: int) -> np.ndarray:
        """(n_groups,) exposure summed over the window and over the items of each group.

        Args:
            groups: (n_items,) group id of every item in the current catalogue.
            n_groups: number of groups G (groups without exposure get 0).
        """
        groups = np.asarray(groups)
        assert groups.size == 0 or groups.max() < n_groups, (
            f"group id {groups.max()} out of range for n_groups={n_groups}")
        totals = self.item_totals(groups.shape[0])
        return np.bincount(groups, weights=totals, minlength=n_groups).astype(np.float64)
