"""Candidate retrieval: faiss inner-product search over observable content vectors + exploration.

Each active user's query is the mean content vector of their history (what the platform knows of
them). A user with no history is seeded with the content vector of one alive item drawn in
proportion to 1 + its popularity: cold users lean toward popular items without all of them
sharing one list (at round 0, when nothing is popular yet, the seeds are uniform). A share ``explore`` of
each pool is drawn uniformly from alive items, so new and unpopular items can enter the loop.
Top-k comes from faiss (never from a full score matrix: DESIGN section 11).

The index (``env.retrieval``): ``flat`` is exact and rebuilt whenever the catalogue changes;
``ivf`` (inverted lists) and ``hnsw`` (a navigable graph) are approximate and follow the
catalogue incrementally: arriving items are added, departed ones removed (ivf) or filtered out at
search time and dropped at the next rebuild (hnsw). A row the approximate index leaves short (an
ivf probe that found fewer items than asked, say) is searched again exactly, so every pool is
full and distinct. The approximate indexes are saved in checkpoints (``faiss.serialize_index``),
so a resumed run searches the very index the uninterrupted one does; the flat one is rebuilt.
HNSW inserts run on one thread: faiss's parallel insert builds a different graph each time.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from agorasim.config import RetrievalConfig


class Retriever:
    """Inner-product search over alive items with the index ``env.retrieval`` names."""

    def __init__(self, cfg: RetrievalConfig | None = None):
        self.cfg = cfg or RetrievalConfig()
        self.kind: str | None = None  # the index in use: flat | ivf | hnsw
        self._index = None
        self._ids = np.zeros(0, np.int64)  # flat, hnsw: the item id of each index row
        self._indexed = np.zeros(0, bool)  # ivf, hnsw: alive item ids the index holds
        self._dead = 0  # hnsw: indexed rows whose item has left
        self._trained_on = 0  # ivf: items the quantiser was trained on
        self._key = None

    def __getstate__(self):  # faiss indexes do not pickle: the approximate ones travel serialised
        state = self.__dict__.copy()
        keep = self.kind in ("ivf", "hnsw") and self._index is not None
        state["_index"] = faiss.serialize_index(self._index) if keep else None
        if not keep:
            state.update(kind=None, _ids=np.zeros(0, np.int64), _indexed=np.zeros(0, bool), _key=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._index is not None:
            self._index = faiss.deserialize_index(self._index)

    # -- the index ------------------------------------------------------------------------------

    def _wanted(self, n_alive: int) -> str:
        kind = self.cfg.index
        if kind == "auto":
            return "flat" if n_alive < self.cfg.exact_below else "ivf"
        return kind

    def _refresh(self, content: np.ndarray, alive_ids: np.ndarray) -> None:
        key = (len(content), len(alive_ids), int(alive_ids.sum()))
        if key == self._key:
            return
        kind = self._wanted(len(alive_ids))
        if kind == "flat":
            index = faiss.IndexFlatIP(content.shape[1])
            index.add(np.ascontiguousarray(content[alive_ids], dtype=np.float32))
            self._index, self._ids = index, alive_ids
        elif kind != self.kind or self._index is None:
            self._build(kind, content, alive_ids)
        else:
            self._update(content, alive_ids)
        self.kind, self._key = kind, key

    def _build(self, kind: str, content: np.ndarray, alive_ids: np.ndarray) -> None:
        d, cfg = content.shape[1], self.cfg
        vectors = np.ascontiguousarray(content[alive_ids], dtype=np.float32)
        if kind == "ivf":
            n = len(alive_ids)
            nlist = max(1, min(cfg.nlist or int(4 * math.sqrt(n)), n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.add_with_ids(vectors, alive_ids.astype(np.int64))
            self._trained_on = n
        else:
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.ef_construction
            _single_threaded(index.add, vectors)
            self._ids, self._dead = alive_ids.astype(np.int64), 0
        self._index = index
        self._indexed = np.zeros(len(content), bool)
        self._indexed[alive_ids] = True

    def _update(self, content: np.ndarray, alive_ids: np.ndarray) -> None:
        alive = np.zeros(len(content), bool)
        alive[alive_ids] = True
        indexed = np.zeros(len(content), bool)
        indexed[: len(self._indexed)] = self._indexed
        arrived, left = np.flatnonzero(alive & ~indexed), np.flatnonzero(indexed & ~alive)
        if self.kind == "ivf":
            if len(alive_ids) >= self.cfg.retrain_growth * self._trained_on:
                return self._build("ivf", content, alive_ids)
            if len(left):
                self._index.remove_ids(faiss.IDSelectorBatch(left.astype(np.int64)))
            if len(arrived):
                self._index.add_with_ids(np.ascontiguousarray(content[arrived], dtype=np.float32), arrived)
        else:
            self._dead += len(left)
            if self._dead >= self.cfg.rebuild_dead * (len(self._ids) + len(arrived)):
                return self._build("hnsw", content, alive_ids)
            if len(arrived):
                _single_threaded(self._index.add, np.ascontiguousarray(content[arrived], dtype=np.float32))
                self._ids = np.concatenate([self._ids, arrived])
        indexed[left], indexed[arrived] = False, True
        self._indexed = indexed

    def search(self, queries: np.ndarray, n: int, content: np.ndarray, alive_ids: np.ndarray) -> np.ndarray:
        """(B, n) alive item ids nearest each query by inner product (n <= alive items)."""
        self._refresh(content, alive_ids)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "flat":
            return self._ids[self._index.search(queries, n)[1]]
        # the approximate indexes search each distinct query once: cold users seeded with the same
        # item, and users with the same history, share a query (about 40% of a 1M-user round's)
        distinct, inverse = _distinct_rows(queries)
        if self.kind == "ivf":
            self._index.nprobe = self.cfg.nprobe
            found = self._index.search(distinct, n)[1]
        else:
            bitmap = np.packbits(self._indexed[self._ids], bitorder="little")  # rows whose item is alive
            selector = faiss.IDSelectorBitmap(len(self._ids), faiss.swig_ptr(bitmap))
            params = faiss.SearchParametersHNSW(efSearch=max(self.cfg.ef_search, n), sel=selector)
            rows = self._index.search(distinct, n, params=params)[1]
            found = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        if inverse is not None:
            found = found[inverse]
        short = np.flatnonzero((found < 0).any(1))
        if len(short):  # the approximate index found too few: exact search for those rows
            scores = queries[short] @ np.asarray(content[alive_ids], np.float32).T
            top = np.argsort(-scores, 1, kind="stable")[:, :n]
            found[short] = alive_ids[top]
        return found

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
        queries = np.array(queries, dtype=np.float32)
        cold = np.flatnonzero(~has_history)
        if len(cold):
            weight = 1.0 + popularity[alive_ids]
            seeds = alive_ids[rng.choice(n_alive, len(cold), p=weight / weight.sum())]
            queries[cold] = content[seeds]
        if n_search:
            searched = self.search(queries, n_search, content, alive_ids)
        else:
            searched = np.zeros((b, 0), np.int64)
        position = np.full(content.shape[0], -1, np.int64)
        position[alive_ids] = np.arange(n_alive)
        drawn = draw_excluding(rng, n_alive, position[searched], n_explore)
        out[:, :n_search] = searched
        out[:, n_search:pool_eff] = alive_ids[drawn]
        return out


def _distinct_rows(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The distinct rows of ``queries`` (B, d) float32 in order of first appearance, and the index
    of each row among them (None when every row is distinct: ``queries`` itself is returned)."""
    if len(queries) < 2:
        return queries, None
    keys = np.ascontiguousarray(queries).view(np.dtype((np.void, queries.dtype.itemsize * queries.shape[1])))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(first) == len(queries):
        return queries, None
    order = np.argsort(first)  # distinct rows in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return queries[first[order]], rank[inverse.reshape(-1)]


def _single_threaded(fn, *args) -> None:
    """Call ``fn`` with faiss on one thread (a deterministic HNSW insert), then restore."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        fn(*args)
    finally:
        faiss.omp_set_num_threads(threads)


_BLOCK_ROWS = 512  # rows of draw_excluding's exclusion check at a time


def draw_excluding(rng: np.random.Generator, n: int, exclude: np.ndarray, count: int) -> np.ndarray:
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
    # the (rows x draws x excluded) comparison is the function's cost: the narrowest integers that
    # hold every id (16 bits below 32,768 items) and blocks of rows whose comparison stays in
    # the cache (same result: ids are below n); 10k rows x 28 draws x 80 excluded: 15.5 ms at
    # 32 bits in one piece, 10 ms at 16 bits in blocks of 512 rows
    small = np.int16 if n < 2**15 else np.int32 if n < 2**31 else np.int64
    draws_small, exclude_small = draws.astype(small), exclude.astype(small)
    hit = np.empty(draws.shape, bool)
    for start in range(0, b, _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        hit[rows] = (draws_small[rows, :, None] == exclude_small[rows, None, :]).any(2)
    valid = ~repeat & ~hit
    keep = valid & (np.cumsum(valid, 1) <= count)
    short = np.flatnonzero(keep.sum(1) < count)
    out = np.zeros((b, count), np.int64)
    full = np.setdiff1d(np.arange(b), short)
    out[full] = draws[full][keep[full]].reshape(len(full), count)
    if len(short):
        out[short] = by_keys(short)
    return out
