import pickle

import faiss
import numpy as np
import pytest

from agorasim.config import RetrievalConfig
from agorasim.env.retrieval import Retriever, draw_excluding
from agorasim.run import checkpoint


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pools_are_distinct_alive_and_nearest_first():
    rng = np.random.default_rng(0)
    content = unit(rng.normal(size=(500, 8)))
    alive = np.flatnonzero(np.arange(500) % 7 != 0)  # every 7th item is dead
    queries = content[[1, 2, 3]]
    popularity = np.zeros(500)
    popularity[[497, 499]] = 1e12  # 497 is dead: never a seed
    pools = Retriever().candidates(queries, np.array([True, True, False]), content, alive,
                                   popularity, pool=20, explore=0.25, rng=rng)
    assert pools.shape == (3, 20)
    for row in pools:
        assert len(set(row)) == 20 and np.all(np.isin(row, alive))
    # searched part: the item itself is its own nearest neighbour
    assert pools[0, 0] == 1 and pools[1, 0] == 2
    # a user with no history is seeded by an item drawn by popularity: here surely 499
    assert pools[2, 0] == 499 and 497 not in pools[2]


def test_small_catalogue_is_padded():
    content = unit(np.eye(4))
    pools = Retriever().candidates(content[:2], np.ones(2, bool), content, np.arange(3), np.zeros(4),
                                   pool=5, explore=0.5, rng=np.random.default_rng(0))
    assert pools.shape == (2, 5)
    assert np.all(pools[:, 3:] == -1)
    for row in pools:
        assert sorted(row[:3]) == [0, 1, 2]


def test_exploration_draws_avoid_excluded_items():
    rng = np.random.default_rng(3)
    exclude = np.tile(np.arange(10), (400, 1))
    drawn = draw_excluding(rng, 1000, exclude, 30)
    assert drawn.shape == (400, 30)
    assert not np.isin(drawn, np.arange(10)).any()
    assert all(len(set(r)) == 30 for r in drawn)
    # roughly uniform over the allowed range
    counts = np.bincount(drawn.ravel(), minlength=1000)[10:]
    assert counts.sum() == 400 * 30 and counts.min() > 0 and counts.max() < 40


# -- approximate indexes (env.retrieval.index) --------------------------------------------------------

def clustered(n, d=16, clusters=20, seed=0):
    """Unit vectors around ``clusters`` centres, as the catalogue's categories make them."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, d)))
    return unit(centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d)))


def exact_top(queries, content, alive, n):
    index = faiss.IndexFlatIP(content.shape[1])
    index.add(np.ascontiguousarray(content[alive]))
    return alive[index.search(np.ascontiguousarray(queries), n)[1]]


def recall(found, truth):
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_follows_arrivals_and_departures(kind):
    content = clustered(4000)
    alive = np.arange(3000)
    queries = content[3000:3200]  # not in the index yet
    retriever = Retriever(RetrievalConfig(index=kind))
    first = retriever.search(queries, 40, content[:3000], alive)
    assert retriever.kind == kind and recall(first, exact_top(queries, content, alive, 40)) >= 0.95
    # a third of the items leave and 1,000 arrive (among them each query's own vector)
    alive = np.r_[alive[alive % 3 != 0], np.arange(3000, 4000)]
    found = retriever.search(queries, 40, content, alive)
    assert np.isin(found, alive).all() and all(len(set(row)) == 40 for row in found)
    assert (found[:, 0] == np.arange(3000, 3200)).all()  # the arrival identical to the query comes first
    assert recall(found, exact_top(queries, content, alive, 40)) >= 0.95
    if kind == "ivf":  # removed from the inverted lists, not only filtered
        assert retriever._index.ntotal == len(alive)
    else:  # still in the graph, filtered out at search time
        assert retriever._index.ntotal == 4000 and retriever._dead == 1000


def test_ivf_retrains_once_the_catalogue_has_doubled_and_hnsw_rebuilds_once_half_left():
    content = clustered(2500)
    ivf = Retriever(RetrievalConfig(index="ivf"))
    ivf.search(content[:5], 10, content[:1000], np.arange(1000))
    assert ivf._trained_on == 1000 and ivf._index.nlist == 1000 // 39  # 4 sqrt(1000) = 126 > n / 39 = 25
    ivf.search(content[:5], 10, content[:1900], np.arange(1900))
    assert ivf._trained_on == 1000 and ivf._index.ntotal == 1900  # grown 1.9x: same quantiser, items added
    ivf.search(content[:5], 10, content[:2000], np.arange(2000))
    assert ivf._trained_on == 2000 and ivf._index.nlist == 2000 // 39  # 2x: retrained
    hnsw = Retriever(RetrievalConfig(index="hnsw", rebuild_dead=0.5))
    hnsw.search(content[:5], 10, content[:1000], np.arange(1000))
    hnsw.search(content[:5], 10, content[:1000], np.arange(501, 1000))  # 501 of 1,000 left: rebuilt
    assert hnsw._dead == 0 and hnsw._index.ntotal == 499 and (hnsw._ids == np.arange(501, 1000)).all()
    hnsw.search(content[:5], 10, content[:1000], np.arange(600, 1000))  # 99 of 499 left: filtered
    assert hnsw._dead == 99 and hnsw._index.ntotal == 499


def test_rows_the_approximate_index_leaves_short_are_searched_exactly():
    content = clustered(2000)
    alive = np.arange(2000)
    retriever = Retriever(RetrievalConfig(index="ivf", nlist=50, nprobe=1))
    queries = content[:300]
    found = retriever.search(queries, 60, content, alive)
    raw = retriever._index.search(np.ascontiguousarray(queries), 60)[1]
    short = (raw < 0).any(1)
    assert short.sum() > 10  # one list of ~40 items cannot give 60 results: the case exists
    assert (found[short] == exact_top(queries[short], content, alive, 60)).all()
    assert (found[~short] == raw[~short]).all() and (found >= 0).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_repeated_query_is_searched_once_and_gets_the_same_pool(kind, monkeypatch):
    content = clustered(2000)
    alive = np.arange(2000)
    distinct = content[:30]
    order = np.random.default_rng(0).integers(0, 30, 90)  # 90 queries, each of the 30 about three times
    queries = distinct[order]
    retriever = Retriever(RetrievalConfig(index=kind))
    alone = retriever.search(distinct, 25, content, alive)
    seen = []
    search = retriever._index.search
    monkeypatch.setattr(retriever._index, "search", lambda q, n, **kw: seen.append(len(q)) or search(q, n, **kw))
    found = retriever.search(queries, 25, content, alive)
    assert seen == [len(np.unique(order))]  # one row per distinct query reached faiss
    np.testing.assert_array_equal(found, alone[order])


def test_auto_is_exact_below_the_threshold_and_ivf_above():
    content = clustered(3000)
    retriever = Retriever(RetrievalConfig(index="auto", exact_below=2500))
    retriever.search(content[:5], 10, content[:2000], np.arange(2000))
    assert retriever.kind == "flat"
    retriever.search(content[:5], 10, content, np.arange(3000))
    assert retriever.kind == "ivf" and retriever._index.ntotal == 3000


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_checkpointed_index_searches_as_the_uninterrupted_one(kind):
    content = clustered(3000)
    live = Retriever(RetrievalConfig(index=kind))
    live.search(content[:5], 10, content[:2000], np.arange(2000))
    restored = checkpoint.loads(checkpoint.dumps(live))  # the safe loader takes the serialised index
    assert isinstance(pickle.dumps(live), bytes) and restored.kind == kind
    alive = np.r_[np.arange(100, 2000), np.arange(2000, 2300)]
    queries = content[2500:2700]
    assert (live.search(queries, 30, content[:2300], alive) == restored.search(queries, 30, content[:2300], alive)).all()
    assert live._index.ntotal == restored._index.ntotal


def test_hnsw_builds_the_same_graph_every_time():
    content = clustered(3000)
    runs = [Retriever(RetrievalConfig(index="hnsw")).search(content[:200], 30, content, np.arange(3000))
            for _ in range(2)]
    assert (runs[0] == runs[1]).all()
