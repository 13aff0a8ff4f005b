"""What a policy may observe when it learns: the platform's view of the market, never its truth.

``Observation`` is handed to ``Policy.update`` after each round. It holds read-only views:

* ``CatalogueView``: per item, what a platform can see (the observable content vector, title,
  provider, category, brand, price band, catalogue features, arrival round, whether it is listed,
  its click count). The true vector ``phi_i`` and the quality ``q_i`` the users' utility reads are
  not reachable from it.
* ``LogView``: the interaction log through its public queries (every click, the clicks of one
  round, the impressions since a round), never its storage.

Arrays are views without copies, marked read-only: a policy that wants to keep one across rounds
copies it (the catalogue keeps counting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Catalogue columns a platform may observe; ``embedding`` (phi) and ``quality`` (q) stay hidden.
OBSERVABLE = ("content", "provider", "category", "brand", "price_band", "features", "born", "alive",
              "interactions")


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class CatalogueView:
    """The catalogue's observable columns (``OBSERVABLE``), used rows only, read-only."""

    def __init__(self, catalogue):
        self._catalogue = catalogue

    @property
    def n(self) -> int:
        return self._catalogue.n

    @property
    def titles(self) -> list[str]:
        return self._catalogue.titles

    def view(self, name: str) -> np.ndarray:
        """The used rows of an observable column."""
        if name not in OBSERVABLE:
            raise AttributeError(f"catalogue column {name!r} is not observable by a policy "
                                 f"(observable: {', '.join(OBSERVABLE)})")
        return _readonly(self._catalogue.view(name))

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.view(name)

    def alive_ids(self) -> np.ndarray:
        return np.flatnonzero(self._catalogue.view("alive"))


class LogView:
    """The interaction log through its public queries."""

    def __init__(self, log):
        self._log = log

    def clicks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, round) of every click, in time order."""
        return self._log.clicks()

    def clicked_in_round(self, round: int) -> tuple[np.ndarray, np.ndarray]:
        """(user, item) of every click of round ``round``."""
        return self._log.clicked_in_round(round)

    def clicked_item(self, round: int, users: np.ndarray) -> np.ndarray:
        """The item each of ``users`` clicked in round ``round`` (-1 if none; at most one click
        per user and round): the in-loop training target."""
        clicked_users, clicked_items = self.clicked_in_round(round)
        order = np.argsort(clicked_users, kind="stable")
        clicked_users, clicked_items = clicked_users[order], clicked_items[order]
        target = np.full(len(users), -1, np.int64)
        if len(clicked_users):
            where = np.minimum(np.searchsorted(clicked_users, users), len(clicked_users) - 1)
            found = clicked_users[where] == users
            target[found] = clicked_items[where[found]]
        return target

    def arrays(self, since_round: int = 0) -> dict[str, np.ndarray]:
        """Every impression of rounds ``>= since_round``: round, user, item, position, click, rating."""
        return self._log.arrays(since_round)


@dataclass(frozen=True)
class Observation:
    """What the platform knows after ``round``: the observable catalogue and the log.

    Attributes:
        round: the round just played.
        catalogue: ``CatalogueView``.
        log: ``LogView``.
    """

    round: int
    catalogue: CatalogueView
    log: LogView

    @classmethod
    def of(cls, log, catalogue, round: int) -> Observation:
        """The observation of a market's (or a test's) log and catalogue after ``round``."""
        return cls(int(round), CatalogueView(catalogue), LogView(log))
