import numpy as np

from agorasim.env.retrieval import Retriever, _draw_excluding


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
    drawn = _draw_excluding(rng, 1000, exclude, 30)
    assert drawn.shape == (400, 30)
    assert not np.isin(drawn, np.arange(10)).any()
    assert all(len(set(r)) == 30 for r in drawn)
    # roughly uniform over the allowed range
    counts = np.bincount(drawn.ravel(), minlength=1000)[10:]
    assert counts.sum() == 400 * 30 and counts.min() > 0 and counts.max() < 40
