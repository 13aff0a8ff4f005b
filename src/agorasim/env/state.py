"""Population state as structures of arrays: one row per item or user.

The catalogue and the population grow during a run (cold start: items and users arrive every
round), so every array is allocated with spare capacity and grown geometrically; ``n`` is the
number of rows in use. Hot loops index these arrays directly; nothing here is per-agent Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


def _grow(array: np.ndarray, n_needed: int, fill) -> np.ndarray:
    """Return ``array`` with at least ``n_needed`` rows, new rows set to ``fill``."""
    if array.shape[0] >= n_needed:
        return array
    capacity = max(n_needed, 2 * array.shape[0], 16)
    grown = np.full((capacity,) + array.shape[1:], fill, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


class _Rows:
    """Shared growth logic for the two structure-of-arrays tables.

    Subclasses are dataclasses whose array fields have one row per entity; ``_fill`` gives the
    value of rows that are allocated but not yet used.
    """

    n: int
    _fill: dict

    def _arrays(self):
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)]

    def _append(self, **columns) -> np.ndarray:
        """Append rows; every array column must be given. Returns the new row ids."""
        count = len(next(iter(columns.values())))
        start, stop = self.n, self.n + count
        for name in self._arrays():
            if name not in columns:
                raise KeyError(f"missing column {name!r}")
            grown = _grow(getattr(self, name), stop, self._fill.get(name, 0))
            grown[start:stop] = columns[name]
            setattr(self, name, grown)
        self.n = stop
        return np.arange(start, stop)

    def view(self, name: str) -> np.ndarray:
        """The used rows of column ``name`` (a view, no copy)."""
        return getattr(self, name)[: self.n]


@dataclass
class Catalogue(_Rows):
    """All items ever listed. Items never get deleted: an item that leaves has ``alive`` False.

    Attributes:
        embedding: true item vector ``phi_i`` (d floats, unit norm); hidden from the platform.
        content: observable content vector (``phi_i`` plus noise, unit norm) that retrieval,
            policies and the platform may use.
        quality: intrinsic quality ``q_i`` (utility units).
        provider: id of the provider (item agent) that owns the item.
        category: category path, one int per level (coarse to fine).
        brand, price_band: structured attributes the titles and promotions are rendered from.
        features: bit mask of catalogue features (what a grounded promotion may claim).
        born: round the item arrived (0 for the initial catalogue).
        alive: item is listed (False after its provider exited).
        interactions: clicks received so far (the popularity used by users and policies).
        first_exposure: round of first exposure, -1 while never shown.
        titles: rendered or real titles (Python list; only read by reports and LLM agents).
    """

    embedding: np.ndarray
    content: np.ndarray
    quality: np.ndarray
    provider: np.ndarray
    category: np.ndarray
    brand: np.ndarray
    price_band: np.ndarray
    features: np.ndarray
    born: np.ndarray
    alive: np.ndarray
    interactions: np.ndarray
    first_exposure: np.ndarray
    titles: list = field(default_factory=list)
    n: int = 0
    _fill: dict = field(default_factory=lambda: {"first_exposure": -1, "alive": False})

    @classmethod
    def empty(cls, dim: int, depth: int) -> Catalogue:
        return cls(
            embedding=np.zeros((0, dim), np.float32),
            content=np.zeros((0, dim), np.float32),
            quality=np.zeros(0, np.float32),
            provider=np.zeros(0, np.int64),
            category=np.zeros((0, depth), np.int64),
            brand=np.zeros(0, np.int64),
            price_band=np.zeros(0, np.int64),
            features=np.zeros(0, np.int64),
            born=np.zeros(0, np.int64),
            alive=np.zeros(0, bool),
            interactions=np.zeros(0, np.float64),
            first_exposure=np.zeros(0, np.int64),
        )

    def add(self, titles: list[str], **columns) -> np.ndarray:
        """List new items; returns their ids."""
        ids = self._append(**columns)
        self.titles.extend(titles)
        return ids

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def alive_ids(self) -> np.ndarray:
        return np.flatnonzero(self.view("alive"))


@dataclass
class Population(_Rows):
    """All users ever arrived. Users who churned keep their row with ``active`` False.

    Attributes:
        taste: ``theta_u`` (d floats); drifts toward consumed items.
        activity: probability of visiting in a round.
        conformity: ``c_u``, weight of log-popularity in utility.
        social: ``s_u``, weight of friends' consumption (social proof).
        novelty: ``n_u``, weight of item novelty (1 / (1 + age)).
        trust: ``trust_u`` in [0, 1], weight of promotions in perceived utility; learnt.
        patience: number of consecutive disappointing visits tolerated before churn.
        satisfaction: exponential average of delivered utility minus expectation.
        fatigue: consecutive disappointing visits.
        active: user has not churned.
        born: arrival round.
        history: last H clicked items, most recent last, -1 padded on the left.
    """

    taste: np.ndarray
    activity: np.ndarray
    conformity: np.ndarray
    social: np.ndarray
    novelty: np.ndarray
    trust: np.ndarray
    patience: np.ndarray
    satisfaction: np.ndarray
    fatigue: np.ndarray
    active: np.ndarray
    born: np.ndarray
    history: np.ndarray
    n: int = 0
    _fill: dict = field(default_factory=lambda: {"history": -1})

    @classmethod
    def empty(cls, dim: int, history_length: int = 20) -> Population:
        z = lambda dtype=np.float32: np.zeros(0, dtype)  # noqa: E731
        return cls(
            taste=np.zeros((0, dim), np.float32), activity=z(), conformity=z(), social=z(),
            novelty=z(), trust=z(), patience=z(np.int64), satisfaction=z(), fatigue=z(np.int64),
            active=z(bool), born=z(np.int64),
            history=np.zeros((0, history_length), np.int64),
        )

    def add(self, **columns) -> np.ndarray:
        columns.setdefault("history", np.full((len(columns["taste"]), self.history.shape[1]), -1))
        return self._append(**columns)

    def push_history(self, users: np.ndarray, items: np.ndarray) -> None:
        """Append one consumed item to each of ``users`` (distinct ids), shifting left."""
        if len(users) == 0:
            return
        rows = self.history[users]
        rows[:, :-1] = rows[:, 1:]
        rows[:, -1] = items
        self.history[users] = rows


@dataclass
class InteractionLog:
    """Every impression ever served, in round order (the data policies refit on).

    Stored as a list of per-round chunks of equal-length arrays; ``arrays()`` concatenates.
    Columns: round, user, item, position (0-based slot in the slate), click (0/1),
    rating (1-5 stars, NaN where not clicked).
    """

    chunks: list = field(default_factory=list)
    compacted_before: int = 0  # rounds before this keep only their clicks (``compact``)

    COLUMNS = ("round", "user", "item", "position", "click", "rating")

    def compact(self, before_round: int) -> None:
        """Drop the non-click impressions of rounds ``< before_round``; their clicks stay (what
        BPR, SASRec and SFT refit on and social proof counts). Bounds the log's growth to the
        clicks plus a window of full rounds (``run.log_window``)."""
        if before_round <= self.compacted_before:
            return
        for i, chunk in enumerate(self.chunks):
            if len(chunk["round"]) == 0 or chunk["round"][0] < self.compacted_before:
                continue
            if chunk["round"][0] >= before_round:
                break
            self.chunks[i] = _clicks_only(chunk)
        self.compacted_before = before_round

    def recompact(self) -> None:
        """Compact every chunk before ``compacted_before`` again (after chunks were read back
        from log segments written before they were compacted)."""
        for i, chunk in enumerate(self.chunks):
            if len(chunk["round"]) and chunk["round"][0] < self.compacted_before:
                self.chunks[i] = _clicks_only(chunk)

    def append(self, **columns: np.ndarray) -> None:
        assert set(columns) == set(self.COLUMNS), sorted(columns)
        self.chunks.append({k: np.asarray(v) for k, v in columns.items()})

    def segment(self, start: int) -> dict[str, np.ndarray]:
        """Chunks ``start:`` as one set of columns plus ``lengths`` (for writing them to disk)."""
        chunks = self.chunks[start:]
        lengths = np.array([len(c["round"]) for c in chunks], np.int64)
        columns = {k: (np.concatenate([c[k] for c in chunks]) if chunks else np.zeros(0)) for k in self.COLUMNS}
        return {**columns, "lengths": lengths}

    def extend_from_segment(self, segment: dict[str, np.ndarray]) -> None:
        """Append the chunks a ``segment`` holds (the inverse of ``segment``)."""
        bounds = np.concatenate([[0], np.cumsum(segment["lengths"])])
        for a, b in zip(bounds[:-1], bounds[1:]):
            self.chunks.append({k: segment[k][a:b] for k in self.COLUMNS})

    def arrays(self, since_round: int = 0) -> dict[str, np.ndarray]:
        chunks = [c for c in self.chunks if len(c["round"]) and c["round"][0] >= since_round]
        if not chunks:
            return {
                "round": np.zeros(0, np.int64), "user": np.zeros(0, np.int64),
                "item": np.zeros(0, np.int64), "position": np.zeros(0, np.int64),
                "click": np.zeros(0, np.int8), "rating": np.zeros(0, np.float32),
            }
        return {k: np.concatenate([c[k] for c in chunks]) for k in self.COLUMNS}

    def clicked_in_round(self, round: int) -> tuple[np.ndarray, np.ndarray]:
        """(user, item) of every click of round ``round`` (only the latest rounds are searched)."""
        for chunk in reversed(self.chunks):
            if len(chunk["round"]) == 0:
                continue
            if chunk["round"][0] == round:
                clicked = chunk["click"] > 0
                return chunk["user"][clicked], chunk["item"][clicked]
            if chunk["round"][0] < round:
                break
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def clicks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, round) of every click, in time order."""
        a = self.arrays()
        m = a["click"] > 0
        return a["user"][m], a["item"][m], a["round"][m]


def _clicks_only(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A log chunk's click rows (the chunk itself when it holds nothing else)."""
    keep = chunk["click"] > 0
    return chunk if keep.all() else {k: v[keep] for k, v in chunk.items()}
