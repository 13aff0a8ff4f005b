"""Hand-computed values and known distributions for the exposure and accuracy metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agorasim.metrics import (
    coverage,
    dcg_weights,
    dgu,
    entropy,
    exposure_summary,
    gini,
    group_shares,
    hhi,
    hits_at_k,
    hr_at_k,
    intra_list_diversity,
    item_exposure,
    lorenz,
    mgu,
    ndcg_at_k,
    ndcg_at_k_rows,
    ndcg_next_item_at_k,
    novelty,
    popularity_groups,
    position_weights,
    recall_at_k,
    tail_share,
    target_shares,
    true_top_items,
)

W1 = 1.0 / math.log2(3.0)  # weight of the second slot, 0.6309...


# ---------------------------------------------------------------- exposure


def test_position_weights():
    # 1/log2(2), 1/log2(3), 1/log2(4), 1/log2(5)
    np.testing.assert_allclose(position_weights(4), [1.0, W1, 0.5, 1.0 / math.log2(5.0)])
    np.testing.assert_allclose(dcg_weights(3), position_weights(3))
    assert position_weights(3).dtype == np.float64


def test_item_exposure_with_padding():
    slates = np.array([[0, 2, -1], [2, 1, 0]])
    # item 0: slot 0 of row 0 (1) + slot 2 of row 1 (0.5) = 1.5
    # item 1: slot 1 of row 1 = 1/log2 3
    # item 2: slot 1 of row 0 (1/log2 3) + slot 0 of row 1 (1)
    # item 3: never shown; the -1 slot is ignored
    weighted = item_exposure(slates, n_items=4)
    np.testing.assert_allclose(weighted, [1.5, W1, 1.0 + W1, 0.0])
    raw = item_exposure(slates, n_items=4, weighted=False)
    np.testing.assert_array_equal(raw, [2.0, 1.0, 2.0, 0.0])
    assert raw.dtype == np.float64 and raw.shape == (4,)


def test_gini_hand_values():
    # sorted ascending, i = 1..4: coefficients 2i-n-1 = -3, -1, 1, 3
    # [0,0,0,1]: 3*1 / (4*1) = 0.75
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)
    # [1,2,3,4]: (-3 - 2 + 3 + 12) / (4*10) = 10/40 = 0.25
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)


@pytest.mark.parametrize("n", [1, 2, 5, 100])
def test_gini_known_distributions(n):
    assert gini(np.full(n, 3.0)) == pytest.approx(0.0, abs=1e-12)
    one_item = np.zeros(n)
    one_item[n // 2] = 7.0
    assert gini(one_item) == pytest.approx((n - 1) / n)


def test_gini_degenerate():
    assert gini([]) == 0.0
    assert gini([0, 0, 0]) == 0.0


def test_gini_invariant_to_permutation_and_scaling():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.exponential(size=rng.integers(2, 50))
        x[rng.random(x.size) < 0.3] = 0.0
        base = gini(x)
        assert gini(rng.permutation(x)) == pytest.approx(base, abs=1e-12)
        assert gini(x * rng.uniform(0.01, 100.0)) == pytest.approx(base, abs=1e-12)
        assert 0.0 <= base <= (x.size - 1) / x.size + 1e-12


def test_hhi():
    # shares 1/4, 1/4, 1/2 -> 1/16 + 1/16 + 4/16 = 6/16
    assert hhi([1, 1, 2]) == pytest.approx(6 / 16)
    assert hhi(np.ones(8)) == pytest.approx(1 / 8)
    assert hhi([0, 5, 0]) == pytest.approx(1.0)
    assert hhi([0, 0]) == 0.0


def test_entropy():
    # shares 1/2, 1/2, 0, 0: -(2 * 0.5 log 0.5) / log 4 = log 2 / log 4 = 0.5
    assert entropy([1, 1, 0, 0]) == pytest.approx(0.5)
    assert entropy(np.ones(10)) == pytest.approx(1.0)
    assert entropy([0, 0, 4, 0]) == pytest.approx(0.0)
    assert entropy([3]) == 0.0
    assert entropy([0, 0]) == 0.0


def test_coverage():
    assert coverage([0, 1, 2, 0]) == pytest.approx(0.5)
    assert coverage([0, 0]) == 0.0
    assert coverage([]) == 0.0


def test_tail_share_with_ties():
    popularity = np.array([5, 1, 5, 0, 3])
    exposure = np.array([1.0, 2.0, 3.0, 4.0, 0.0])  # total 10
    # stable sort of -popularity: items 0, 2 (tie at 5, lower index first), 4, 1, 3
    # head_fraction 0.4 -> ceil(2) = 2 head items {0, 2}: tail = (2 + 4 + 0) / 10
    assert tail_share(exposure, popularity, head_fraction=0.4) == pytest.approx(0.6)
    # head_fraction 0.2 -> 1 head item, item 0 wins the tie with item 2: tail = 9 / 10
    assert tail_share(exposure, popularity, head_fraction=0.2) == pytest.approx(0.9)
    assert tail_share(np.zeros(5), popularity) == 0.0


def test_tail_share_head_size_not_inflated_by_float_noise():
    # 0.2 * 15 = 3.0000000000000004 in floating point; the head must still be 3 items.
    popularity = np.arange(15, 0, -1)  # item 0 most popular
    exposure = np.zeros(15)
    exposure[3] = 1.0  # the fourth most popular item is tail
    assert tail_share(exposure, popularity) == pytest.approx(1.0)


def test_tail_share_is_exactly_zero_when_the_head_has_all_exposure():
    """Total minus the head's sum rounded to +-1e-16 in 10 of 50 such worlds (a share of
    exposure below 0 in metrics.csv); the tail's own sum is exactly 0."""
    for seed in range(50):
        rng = np.random.default_rng(seed)
        exposure, popularity = rng.random(997) / 7, rng.integers(0, 50, 997)
        assert tail_share(exposure, popularity, head_fraction=1.0) == 0.0
        exposure[np.argsort(-popularity, kind="stable")[200:]] = 0.0  # the head (200 items) has it all
        assert tail_share(exposure, popularity) == 0.0


def test_lorenz():
    population, share = lorenz(np.ones(7), points=11)
    np.testing.assert_allclose(population, np.linspace(0, 1, 11))
    np.testing.assert_allclose(share, population)  # uniform -> the diagonal

    population, share = lorenz([0, 0, 0, 1], points=5)
    np.testing.assert_allclose(population, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(share, [0, 0, 0, 0, 1.0])

    # [3, 1] sorted is [1, 3]: cumulative shares 0, 1/4, 1 at population 0, 1/2, 1
    _, share = lorenz([3, 1], points=3)
    np.testing.assert_allclose(share, [0, 0.25, 1.0])
    # halfway between 0 and 1/2 population: interpolated 1/8
    _, share = lorenz([3, 1], points=5)
    np.testing.assert_allclose(share, [0, 0.125, 0.25, 0.625, 1.0])

    _, share = lorenz(np.zeros(3), points=4)
    np.testing.assert_allclose(share, np.linspace(0, 1, 4))


def test_lorenz_area_matches_gini():
    # Gini = 1 - 2 * area under the Lorenz curve (exact at the n + 1 knots).
    x = np.array([1.0, 2.0, 3.0, 4.0])
    population, share = lorenz(x, points=5)
    area = float(np.sum(np.diff(population) * (share[1:] + share[:-1]) / 2))
    assert 1 - 2 * area == pytest.approx(gini(x))


def test_popularity_groups_with_ties():
    popularity = np.array([3, 7, 7, 0, 1, 7, 2, 2, 9, 0])
    # stable descending order: 8(9) 1(7) 2(7) 5(7) 0(3) 6(2) 7(2) 4(1) 3(0) 9(0)
    # rank r -> group r * 4 // 10: ranks 0-2 -> 0, 3-4 -> 1, 5-7 -> 2, 8-9 -> 3
    groups = popularity_groups(popularity, n_groups=4)
    np.testing.assert_array_equal(groups, [1, 0, 0, 3, 2, 1, 2, 2, 0, 3])
    assert groups.dtype.kind == "i"


def test_popularity_groups_equal_counts():
    groups = popularity_groups(np.arange(16), n_groups=8)
    np.testing.assert_array_equal(np.bincount(groups), np.full(8, 2))
    assert groups[15] == 0 and groups[0] == 7  # most popular item in group 0


def test_group_shares_targets_and_gaps():
    groups = np.array([0, 0, 1, 2])
    exposure = np.array([1.0, 1.0, 2.0, 0.0])
    shares = group_shares(exposure, groups, 3)
    np.testing.assert_allclose(shares, [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(group_shares(np.zeros(4), groups, 3), np.zeros(3))

    uniform = target_shares("uniform", groups, 3)
    np.testing.assert_allclose(uniform, [1 / 3, 1 / 3, 1 / 3])
    # gaps 1/6, 1/6, 1/3
    assert dgu(shares, uniform) == pytest.approx(2 / 3)
    assert mgu(shares, uniform) == pytest.approx(1 / 3)

    supply = target_shares("supply", groups, 3)
    np.testing.assert_allclose(supply, [0.5, 0.25, 0.25])
    # gaps 0, 1/4, 1/4
    assert dgu(shares, supply) == pytest.approx(0.5)
    assert mgu(shares, supply) == pytest.approx(0.25)

    # merit = quality - min + 1e-9 = [0, 2, 1, 0] (+eps): groups get 2, 1, 0 of 3
    merit = target_shares("merit", groups, 3, quality=np.array([1.0, 3.0, 2.0, 1.0]))
    np.testing.assert_allclose(merit, [2 / 3, 1 / 3, 0.0], atol=1e-8)
    assert merit.sum() == pytest.approx(1.0)

    assert dgu(shares, shares) == 0.0 and mgu(shares, shares) == 0.0
    assert dgu([1, 0], [0, 1]) == pytest.approx(2.0)


def test_target_shares_errors():
    with pytest.raises(ValueError, match="uniform"):
        target_shares("zipf", np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="quality"):
        target_shares("merit", np.array([0, 1]), 2)


def test_exposure_summary():
    summary = exposure_summary(np.ones(4), np.array([4, 3, 2, 1]), n_groups=2)
    assert set(summary) == {
        "exposure/gini",
        "exposure/hhi",
        "exposure/entropy",
        "exposure/coverage",
        "exposure/tail_share",
        "exposure/dgu",
        "exposure/mgu",
    }
    assert summary["exposure/gini"] == pytest.approx(0.0, abs=1e-12)
    assert summary["exposure/hhi"] == pytest.approx(0.25)
    assert summary["exposure/entropy"] == pytest.approx(1.0)
    assert summary["exposure/coverage"] == pytest.approx(1.0)
    # head = ceil(0.2 * 4) = 1 item (item 0): tail gets 3 of 4
    assert summary["exposure/tail_share"] == pytest.approx(0.75)
    assert summary["exposure/dgu"] == pytest.approx(0.0)
    assert summary["exposure/mgu"] == pytest.approx(0.0)
    assert all(isinstance(v, float) for v in summary.values())

    # all exposure on the most popular item: groups {0,1} get 1, {2,3} get 0 -> gaps 1/2, 1/2
    concentrated = exposure_summary(np.array([2.0, 0, 0, 0]), np.array([4, 3, 2, 1]), n_groups=2)
    assert concentrated["exposure/gini"] == pytest.approx(0.75)
    assert concentrated["exposure/tail_share"] == pytest.approx(0.0)
    assert concentrated["exposure/dgu"] == pytest.approx(1.0)
    assert concentrated["exposure/mgu"] == pytest.approx(0.5)


# ---------------------------------------------------------------- accuracy


def test_ndcg_one_relevant_item_at_rank_two():
    gains = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    ideal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: DCG = 1/log2(3), IDCG = 1; row 1: IDCG = 0 -> 0
    np.testing.assert_allclose(ndcg_at_k_rows(gains, ideal, k=3), [W1, 0.0])
    assert ndcg_at_k(gains, ideal, k=3) == pytest.approx(W1 / 2)
    # at k = 1 the relevant item is cut off
    assert ndcg_at_k(gains[:1], ideal[:1], k=1) == 0.0


def test_ndcg_graded():
    gains = np.array([[3.0, 2.0, 0.0]])
    ideal = np.array([[3.0, 2.0, 1.0]])
    assert ndcg_at_k(gains, ideal, k=2) == pytest.approx(1.0)
    # k = 3: (3 + 2/log2 3) / (3 + 2/log2 3 + 1/2)
    expected = (3 + 2 * W1) / (3 + 2 * W1 + 0.5)
    assert ndcg_at_k(gains, ideal, k=3) == pytest.approx(expected)


def test_hits_hr_and_next_item_ndcg():
    ranked = np.array([[5, 3, 1], [2, -1, -1], [4, 0, 7], [2, -1, -1]])
    target = np.array([3, 9, 7, -1])  # the -1 target must not match a padded slot
    np.testing.assert_array_equal(hits_at_k(ranked, target, k=2), [1, 0, 0, 0])
    np.testing.assert_array_equal(hits_at_k(ranked, target, k=3), [1, 0, 1, 0])
    assert hr_at_k(ranked, target, k=3) == pytest.approx(2 / 4)
    # row 0 at rank 1 -> 1/log2 3; row 2 at rank 2 -> 1/log2 4 = 0.5
    assert ndcg_next_item_at_k(ranked, target, k=3) == pytest.approx((W1 + 0.5) / 4)
    assert ndcg_next_item_at_k(ranked, target, k=2) == pytest.approx(W1 / 4)


def test_recall_at_k():
    ranked = np.array([[1, 2, 3], [4, -1, -1], [6, 7, 8]])
    relevant = np.array([[2, 9, -1], [5, -1, -1], [8, 6, -1]])
    # k=2: row 0 {1,2} finds 2 of {2,9} -> 1/2; row 1 -> 0 (padding never matches);
    #      row 2 {6,7} finds 6 of {8,6} -> 1/2. mean = 1/3
    assert recall_at_k(ranked, relevant, k=2) == pytest.approx(1 / 3)
    # k=3: 1/2, 0, 1 -> 1/2
    assert recall_at_k(ranked, relevant, k=3) == pytest.approx(0.5)
    # a user with no relevant items scores 0 and still counts in the mean
    no_relevant = np.array([[1, 2, 3], [1, 2, 3]])
    assert recall_at_k(no_relevant, np.array([[1, 2], [-1, -1]]), k=3) == pytest.approx(0.5)


def test_true_top_items():
    utility = np.array([[0.1, 0.9, 0.5, 0.3], [4.0, -1.0, 2.0, 8.0]])
    np.testing.assert_array_equal(true_top_items(utility, 2), [[1, 2], [3, 0]])
    np.testing.assert_array_equal(true_top_items(utility, 4), [[1, 2, 3, 0], [3, 0, 2, 1]])
    assert true_top_items(utility, 10).shape == (2, 4)

    rng = np.random.default_rng(1)
    big = rng.normal(size=(6, 50))
    np.testing.assert_array_equal(true_top_items(big, 7), np.argsort(-big, axis=1)[:, :7])


def test_intra_list_diversity():
    # orthogonal unit vectors: every pair has cosine 0 -> distance 1
    assert intra_list_diversity(np.array([[0, 1, 2]]), np.eye(3)) == pytest.approx(1.0)
    embedding = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # items 0, 1 are parallel (distance 0); each is orthogonal to item 2 -> (0 + 1 + 1) / 3
    assert intra_list_diversity(np.array([[0, 1, 2]]), embedding) == pytest.approx(2 / 3)
    # row 1 has one item and is left out of the average; padding is ignored in row 0
    slates = np.array([[0, 1, -1], [2, -1, -1]])
    assert intra_list_diversity(slates, embedding) == pytest.approx(0.0, abs=1e-12)
    assert intra_list_diversity(np.array([[0, -1]]), embedding) == 0.0


def test_novelty():
    popularity = np.array([3, 0, 1])  # total 4, smoothed denominator 4 + 3 = 7
    slates = np.array([[0, 1], [2, -1]])
    # -log2(4/7), -log2(1/7), -log2(2/7) over the three shown items
    expected = (math.log2(7 / 4) + math.log2(7) + math.log2(7 / 2)) / 3
    assert novelty(slates, popularity) == pytest.approx(expected)
    assert novelty(np.array([[-1, -1]]), popularity) == 0.0


# -- the round's metrics row: one pure function over the round's arrays -----------------------------

def test_round_row_by_hand():
    import json

    from agorasim.metrics import exposure
    from agorasim.metrics.round import RoundArrays, round_row

    nan = float("nan")
    arrays = RoundArrays(
        round=5, slates=np.array([[0, 1], [2, -1]]), utility=np.array([[1.0, 2.0], [3.0, 0.0]]),
        good=np.array([[True, True], [False, True]]),  # the padded slot's True is not shown
        choice=np.array([1, -1]), stars=np.array([4.0, nan]),
        hype=np.array([[0.5, 0.25], [1.0, 9.9]]),  # the padded slot's 9.9 is not shown
        claimed=np.array([[0b11, 0b1], [0b100, 0b1111]]), unsupported=np.array([[0b1, 0], [0b100, 0b1111]]),
        item_exposure=np.array([1.0, 0.0, 1.0, 7.0]), window=np.array([2.0, 1.0, 1.0, 5.0]),
        cumulative=np.array([3.0, 1.0, 1.0, 0.0]), popularity=np.array([5.0, 1.0, 0.0, 9.0]),
        quality=np.zeros(4), is_new=np.array([False, False, True, True]), born=np.array([0, 0, 3, 3]),
        newly_seen=np.array([2]), alive=np.array([0, 1, 2]),  # item 3 has left: never counted
        trust=np.array([0.2, 0.4, 0.9]), churned=1,
        eval_slates=np.array([[0, 1]]), eval_top=np.array([[1, 2]]), n_groups=2, target="uniform",
        outside_utility=0.5, exits=2, providers_active=7, fairness_weight=nan)
    row = round_row(arrays)
    assert row["round"] == 5 and list(row)[0] == "round"
    # Gini of [1, 0, 1] sorted [0, 1, 1]: (-2*0 + 0*1 + 2*1) / (3 * 2) = 1/3
    assert row["exposure/gini_round"] == pytest.approx(1 / 3)
    assert row["exposure/gini_cumulative"] == pytest.approx(exposure.gini(np.array([3.0, 1.0, 1.0])))
    assert row["items/new_share"] == pytest.approx(1 / 4)  # window [2, 1, 1], the new item holds 1
    assert row["items/new_supply"] == pytest.approx(1 / 3) and row["items/alive"] == 3.0
    assert row["items/time_to_first_exposure"] == 2.0  # born at 3, first shown at 5
    assert row["promotions/unsupported_share"] == pytest.approx(2 / 4)  # claims 2 + 1 + 1, false 1 + 0 + 1
    assert row["promotions/hype"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    w1 = 1 / np.log2(3)  # the second slot's DCG weight
    assert row["users/utility"] == pytest.approx(((1 + 2 * w1) / (1 + w1) + 3.0) / 2)
    assert row["users/delivered"] == pytest.approx((2.0 + 0.5) / 2)  # the clicked 2.0, or the outside 0.5
    assert row["users/click_rate"] == 0.5 and row["users/rating"] == 4.0
    # decision AUC: good items score clicked 0 and 1, the bad one 0: pairs (0 vs 0) 1/2, (1 vs 0) 1
    assert row["users/decision_auc"] == pytest.approx(0.75)
    assert row["users/trust"] == pytest.approx(0.5) and row["users/active"] == 3.0
    assert row["users/visits"] == 2.0 and row["users/churned"] == 1.0
    # probe: slate [0, 1] against the top [1, 2]: DCG w1 over IDCG 1 + w1; recall 1/2
    assert row["accuracy/ndcg@10"] == pytest.approx(w1 / (1 + w1)) and row["accuracy/recall@10"] == 0.5
    assert row["providers/exits"] == 2.0 and row["providers/active"] == 7.0
    assert np.isnan(row["platform/fairness_weight"])
    again = round_row(arrays)  # pure: the same arrays, the same row, nothing changed
    assert json.dumps(again) == json.dumps(row) and arrays.item_exposure[3] == 7.0


def test_auc_by_hand():
    from agorasim.metrics.accuracy import auc

    # positives 0.8, 0.4 against negatives 0.4, 0.1: pairs 1, 1, 1/2 (tie), 1 -> 3.5 / 4
    assert auc([0.8, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert auc([[1, 0], [0, 0]], [[True, False], [True, False]]) == pytest.approx(0.75)  # (1 + TPR - FPR) / 2
    assert math.isnan(auc([0.3, 0.2], [True, True])) and math.isnan(auc([0.3], [False]))
    with pytest.raises(ValueError, match="differ in shape"):
        auc([0.1, 0.2], [True])
