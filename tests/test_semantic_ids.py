"""Semantic ids: unique paths, determinism, later arrivals, the token layout."""

import pickle

import numpy as np
import pytest

from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens, token_offsets, tokens_to_codes


def unit_embeddings(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def n_unique(codes: np.ndarray) -> int:
    return len(np.unique(codes, axis=0))


def test_paths_are_unique_and_in_range():
    ids = SemanticIds(levels=3, codebook_size=16)
    codes = ids.fit(unit_embeddings(600), seed=1)
    assert codes.shape == (600, 4) and codes.dtype == np.int64
    assert n_unique(codes) == 600
    assert ids.level_sizes[:3] == [16, 16, 16]
    assert ((codes >= 0) & (codes < np.array(ids.level_sizes))).all()
    # the de-duplication level is exactly as large as the largest collision group
    _, counts = np.unique(codes[:, :3], axis=0, return_counts=True)
    assert ids.level_sizes[3] == counts.max()
    np.testing.assert_array_equal(ids.codes, codes)


def test_codes_are_reproducible_for_a_seed():
    x = unit_embeddings(400)
    first = SemanticIds(levels=2, codebook_size=12).fit(x, seed=7)  # 12: not a power of two
    again = SemanticIds(levels=2, codebook_size=12).fit(x, seed=7)
    np.testing.assert_array_equal(first, again)
    assert first[:, :2].max() < 12


def test_identical_embeddings_share_a_prefix_and_get_dedup_codes_in_item_order():
    # items 2 and 4 are the same point; the other four are distinct directions
    x = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [-1, 0], [0.7, 0.7]], np.float32)
    ids = SemanticIds(levels=2, codebook_size=4)
    codes = ids.fit(x, seed=0)
    np.testing.assert_array_equal(codes[2, :2], codes[4, :2])
    assert codes[2, 2] == 0 and codes[4, 2] == 1
    assert (codes[[0, 1, 3, 5], 2] == 0).all()
    assert ids.level_sizes == [4, 4, 2]
    assert n_unique(codes) == 6


def test_encode_new_continues_dedup_codes_without_touching_old_ones():
    x = unit_embeddings(300)
    ids = SemanticIds(levels=2, codebook_size=16, dedup_size=16)  # room for arrivals in every prefix
    old = ids.fit(x, seed=0).copy()
    sizes = list(ids.level_sizes)
    arrivals = np.concatenate([x[[5, 5, 17]], unit_embeddings(20, seed=1)])
    new = ids.encode_new(arrivals)
    assert new.shape == (23, 3)
    np.testing.assert_array_equal(ids.codes[:300], old)  # old items keep their codes
    assert ids.level_sizes == sizes  # the vocabulary is fixed
    assert n_unique(ids.codes) == 323  # new paths are unique and differ from the old ones
    # copies of item 5 land on item 5's prefix, after every code already used there
    same = (old[:, :2] == old[5, :2]).all(1)
    used = old[same, 2].max()
    np.testing.assert_array_equal(new[0], [*old[5, :2], used + 1])
    np.testing.assert_array_equal(new[1], [*old[5, :2], used + 2])
    np.testing.assert_array_equal(new[:, :2], ids.quantise(arrivals))  # nearest prefix, no fallback
    np.testing.assert_array_equal(new[3:, :2], ids.quantise(arrivals[3:]))


def test_full_prefix_falls_back_to_a_sibling_prefix():
    x = unit_embeddings(200)
    ids = SemanticIds(levels=2, codebook_size=8)  # dedup level exactly as large as needed
    old = ids.fit(x, seed=0)
    size = ids.level_sizes[-1]
    copies = np.repeat(x[:1], size + 1, axis=0)  # more copies than the prefix can hold
    new = ids.encode_new(copies)
    assert n_unique(ids.codes) == len(ids.codes)
    assert (new[:, 0] == old[0, 0]).all()  # all stay in item 0's level-0 bucket
    moved = (new[:, 1] != old[0, 1])
    assert moved.sum() >= 1
    assert (new[:, 2] < size).all()


def test_too_many_collisions_is_explained():
    x = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="more levels"):
        SemanticIds(levels=1, codebook_size=4).fit(x, seed=0)
    with pytest.raises(ValueError, match="codebook_size"):
        SemanticIds(codebook_size=1)


def test_encode_new_needs_fit_and_the_quantiser_pickles():
    with pytest.raises(ValueError, match="fit"):
        SemanticIds().encode_new(unit_embeddings(2))
    ids = SemanticIds(levels=2, codebook_size=8, dedup_size=8)
    ids.fit(unit_embeddings(100), seed=3)
    clone = pickle.loads(pickle.dumps(ids))
    arrivals = unit_embeddings(10, seed=4)
    np.testing.assert_array_equal(ids.encode_new(arrivals), clone.encode_new(arrivals))


def test_token_layout_by_hand():
    sizes = [4, 4, 3]
    np.testing.assert_array_equal(token_offsets(sizes, 5), [5, 9, 13])
    np.testing.assert_array_equal(token_offsets(sizes), [0, 4, 8])
    codes = np.array([[1, 2, 0], [3, 3, 2]])
    tokens = codes_to_tokens(codes, sizes, 5)
    np.testing.assert_array_equal(tokens, [[6, 11, 13], [8, 12, 15]])
    np.testing.assert_array_equal(tokens_to_codes(tokens, sizes, 5), codes)
    ids = SemanticIds(levels=2, codebook_size=4)
    ids.level_sizes = sizes
    np.testing.assert_array_equal(ids.codes_to_tokens(codes, 5), tokens)
