"""Candidate retrieval: faiss inner-product search over observable content vectors + exploration.

Each active user's query is the mean content vector of their history (what the platform knows of
them). A user with no history is seeded with the content vector of one alive item drawn in
proportion to 1 + its popularity: cold users lean toward popular items without all of them
sharing one list (at round 0, when nothing is popular yet, the seeds are uniform). A share ``explore`` of
each pool is drawn uniformly from alive items, so new and unpopular items can enter the loop.
Top-k comes from faiss (never from a full score matrix: DESIGN section 11).
"""

from __future__ import annotations

import faiss
import numpy as np


class Retriever:
    """Flat inner-product index over alive items, rebuilt only when the catalogue changes."""

    def __init__(self):
        self._index = None
        self._ids = np.zeros(0, np.int64)
        self._key = None

    def __getstate__(self):  # faiss indexes do not pickle; rebuilt from the catalogue on demand
        return {"_index": None, "_ids": np.zeros(0, np.int64), "_key": None}

    def _refresh(self, content: np.ndarray, alive_ids: np.ndarray) -> None:
        key = (len(content), len(alive_ids), int(alive_ids.sum()))
        if key == self._key:
            return
        index = faiss.IndexFlatIP(content.shape[1])
        index.add(np.ascontiguousarray(content[alive_ids], dtype=np.float32))
        self._index, self._ids, self._key = index, alive_ids, key

    def candidates(self, queries: np.ndarray, has_history: np.ndarray, content: np.ndarray,
                   alive_ids: np.ndarray, popularity: np.ndarray, pool: int, explore: float,
                   rng: np.random.Generator) -> np.ndarray:
        """(B, pool) distinct alive item ids per user, -1 padded if the catalogue is smaller.

        Args:
            queries: (B, d) unit query vectors (user profiles).
            has_history: (B,) users with at least one consumed item.
            content: (n_items, d) observable item vectors.
            alive_ids: ids of alive items.
            popularity: (n_items,) clicks so far (cold users' seeds).
            pool: pool size C.
            explore: share of the pool drawn uniformly at random.
        """
        b = len(queries)
        n_alive = len(alive_ids)
        pool_eff = min(pool, n_alive)
        n_explore = int(round(explore * pool_eff))
        n_search = pool_eff - n_explore
        out = np.full((b, pool), -1, np.int64)
        if pool_eff == 0 or b == 0:
            return out
        self._refresh(content, alive_ids)
        queries = np.array(queries, dtype=np.float32)
        cold = np.flatnonzero(~has_history)
        if len(cold):
            weight = 1.0 + popularity[alive_ids]
            seeds = alive_ids[rng.choice(n_alive, len(cold), p=weight / weight.sum())]
            queries[cold] = content[seeds]
        if n_search:
            searched = self._ids[self._index.search(queries, n_search)[1]]
        else:
            searched = np.zeros((b, 0), np.int64)
        position = np.full(content.shape[0], -1, np.int64)
        position[alive_ids] = np.arange(n_alive)
        drawn = _draw_excluding(rng, n_alive, position[searched], n_explore)
        out[:, :n_search] = searched
        out[:, n_search:pool_eff] = alive_ids[drawn]
        return out


def _draw_excluding(rng: np.random.Generator, n: int, exclude: np.ndarray, count: int) -> np.ndarray:
    """Per row, ``count`` distinct uniform draws from range(n) avoiding that row's ``exclude``.

    Draws with replacement and drops collisions (cheap when n is large); rows left short, and
    small catalogues, fall back to ranking random keys over the whole range.
    """
    b = len(exclude)
    if count == 0:
        return np.zeros((b, 0), np.int64)

    def by_keys(rows: np.ndarray) -> np.ndarray:
        keys = rng.random((len(rows), n))
        np.put_along_axis(keys, exclude[rows], 2.0, 1)
        return np.sort(np.argpartition(keys, count - 1, 1)[:, :count], 1)

    if n <= 4 * (count + exclude.shape[1]) + 64:
        return by_keys(np.arange(b))
    m = count + 8  # few collisions when n is large; short rows take the slow path
    draws = rng.integers(0, n, (b, m))
    order = np.argsort(draws, 1, kind="stable")
    ranked = np.take_along_axis(draws, order, 1)
    repeat_sorted = np.zeros_like(ranked, dtype=bool)
    repeat_sorted[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeat = np.zeros_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, 1)
    valid = ~repeat & ~(draws[:, :, None] == exclude[:, None, :]).any(2)
    keep = valid & (np.cumsum(valid, 1) <= count)
    short = np.flatnonzero(keep.sum(1) < count)
    out = np.zeros((b, count), np.int64)
    full = np.setdiff1d(np.arange(b), short)
    out[full] = draws[full][keep[full]].reshape(len(full), count)
    if len(short):
        out[short] = by_keys(short)
    return out
