"""Conformance checks every re-ranker passes (call them from the re-ranker's own test).

    from agorasim.platform.conformance import check_reranker
    check_reranker(MyReranker())

``check_reranker`` raises ``AssertionError`` with a message saying which rule broke.
"""

from __future__ import annotations

import copy
from dataclasses import fields

import numpy as np

from agorasim.platform.base import Reranker, RerankRequest, take_columns


def random_request(seed: int = 0, n_users: int = 7, n_candidates: int = 15, k: int = 5,
                   n_groups: int = 4, n_items: int = 60, dim: int = 8) -> RerankRequest:
    """A small random request shaped like a policy's output.

    Candidates are distinct per row and ranked by decreasing relevance. Row 0 has fewer than k
    real candidates and row 1 a few -1 paddings at the end (but at least k real ones), so the
    padding rules get exercised. Needs n_users >= 2 and n_candidates > k.
    """
    assert n_users >= 2 and n_candidates > k, "need two rows and more candidates than k"
    rng = np.random.default_rng(seed)
    candidates = np.stack([rng.choice(n_items, size=n_candidates, replace=False)
                           for _ in range(n_users)]).astype(np.int64)
    relevance = -np.sort(-rng.normal(size=(n_users, n_candidates)), axis=1)
    item_utility = rng.uniform(0.1, 2.0, size=(n_users, n_candidates))
    n_real = np.full(n_users, n_candidates)
    n_real[0] = k - 2
    n_real[1] = k + 1
    padding = np.arange(n_candidates)[None, :] >= n_real[:, None]
    candidates[padding] = -1
    relevance[padding] = -np.inf
    item_utility[padding] = 0.0
    return RerankRequest(
        candidates=candidates,
        relevance=relevance,
        item_utility=item_utility,
        groups=rng.integers(0, n_groups, size=n_items),
        group_exposure=rng.uniform(0.0, 10.0, size=n_groups),
        target=np.full(n_groups, 1.0 / n_groups),
        is_new=rng.random(n_items) < 0.2,
        embedding=rng.normal(size=(n_items, dim)),
        k=k,
    )


def check_reranker(reranker: Reranker, request: RerankRequest | None = None) -> None:
    """Assert that ``reranker`` follows the ``Reranker.rerank`` contract on ``request``.

    Checks: a (B, k) integer array of columns into the candidates (-1 or in range); every chosen
    column holds one of that row's real candidates; no item twice in a row; the row holds min(k, real candidates) items, -1 only after them;
    the same request gives the same slates twice; the request's arrays are left unchanged.

    Args:
        reranker: the re-ranker under test.
        request: the batch to use; a small random one (``random_request``) when None.
    """
    if request is None:
        request = random_request()
    before = copy.deepcopy(request)
    name = getattr(reranker, "name", type(reranker).__name__)

    columns = reranker.rerank(request)
    candidates = np.asarray(request.candidates)
    n_users, n_candidates = candidates.shape
    k = request.k
    assert isinstance(columns, np.ndarray), f"{name}: rerank must return a numpy array, got {type(columns)}"
    assert columns.shape == (n_users, k), f"{name}: columns shape {columns.shape}, expected {(n_users, k)}"
    assert np.issubdtype(columns.dtype, np.integer), f"{name}: columns dtype {columns.dtype} is not integer"
    assert np.all((columns >= -1) & (columns < n_candidates)), (
        f"{name}: columns must be -1 or in [0, {n_candidates}), got {columns[(columns < -1) | (columns >= n_candidates)]}")
    slate = take_columns(candidates, columns)
    assert np.array_equal(slate, reranker.slates(request)), f"{name}: slates() disagrees with rerank()'s columns"

    for row in range(n_users):
        real_candidates = candidates[row][candidates[row] >= 0]
        items = slate[row]
        shown = items[items != -1]
        assert np.all(items >= -1), f"{name}: row {row} has ids below -1: {items}"
        outside = np.setdiff1d(shown, real_candidates)
        assert outside.size == 0, f"{name}: row {row} shows {outside} which are not its candidates"
        assert np.unique(shown).size == shown.size, f"{name}: row {row} repeats an item: {items}"
        expected = min(k, np.unique(real_candidates).size)
        assert shown.size == expected, (
            f"{name}: row {row} shows {shown.size} items but has {real_candidates.size} real "
            f"candidates for k={k}; -1 is only allowed when fewer than k are real")
        assert np.all(items[:expected] != -1), (
            f"{name}: row {row} puts -1 before its real items: {items}")

    again = reranker.rerank(request)
    assert np.array_equal(columns, again), f"{name}: not deterministic, same request gave {columns} then {again}"

    for field in fields(RerankRequest):
        old, new = getattr(before, field.name), getattr(request, field.name)
        if isinstance(old, np.ndarray):
            same = old.shape == np.shape(new) and np.array_equal(old, new, equal_nan=old.dtype.kind == "f")
        else:
            same = old == new
        assert same, f"{name}: rerank mutated request.{field.name}"
