"""Platform agent: re-rankers (conformance and hand-computed cases), the exposure ledger, the
fairness controller and the registry."""

import pickle

import numpy as np
import pytest

from agorasim.platform import (
    RERANKERS,
    ControllerReranker,
    ExposureLedger,
    MMRReranker,
    NewItemBoost,
    NoRerank,
    RerankRequest,
    TriRecReranker,
    check_reranker,
    make_reranker,
    reranker_params,
    take_columns,
)
from agorasim.platform.conformance import random_request


def make_request(candidates, relevance, groups=None, group_exposure=(3.0, 1.0), target=(0.5, 0.5),
                 item_utility=None, is_new=None, embedding=None, k=2):
    """A one-user request over a small hand-made catalogue."""
    candidates = np.atleast_2d(np.asarray(candidates, dtype=np.int64))
    relevance = np.atleast_2d(np.asarray(relevance, dtype=np.float64))
    n_items = int(candidates.max()) + 1
    return RerankRequest(
        candidates=candidates,
        relevance=relevance,
        item_utility=(np.ones(candidates.shape) if item_utility is None
                      else np.atleast_2d(np.asarray(item_utility, dtype=np.float64))),
        groups=np.zeros(n_items, dtype=np.int64) if groups is None else np.asarray(groups),
        group_exposure=np.asarray(group_exposure, dtype=np.float64),
        target=np.asarray(target, dtype=np.float64),
        is_new=np.zeros(n_items, dtype=bool) if is_new is None else np.asarray(is_new, dtype=bool),
        embedding=np.ones((n_items, 2)) if embedding is None else np.asarray(embedding, dtype=float),
        k=k,
    )


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_every_registered_reranker_conforms(name):
    check_reranker(make_reranker(name))
    check_reranker(make_reranker(name), random_request(seed=3, n_users=12, n_candidates=20, k=8,
                                                       n_groups=8))


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_rows_are_independent_of_the_batch(name):
    # vectorised over users: re-ranking a row alone gives the same slate as inside the batch
    reranker = make_reranker(name)
    request = random_request(seed=1)
    batch = reranker.slates(request)
    for row in range(batch.shape[0]):
        alone = RerankRequest(**{**request.__dict__,
                                 "candidates": request.candidates[row:row + 1],
                                 "relevance": request.relevance[row:row + 1],
                                 "item_utility": request.item_utility[row:row + 1]})
        np.testing.assert_array_equal(reranker.slates(alone)[0], batch[row])


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_fewer_candidates_than_k_pads_with_minus_one(name):
    request = make_request([[4, 2, 7]], [[3.0, 2.0, 1.0]], groups=np.zeros(8, dtype=int), k=5)
    slate = make_reranker(name).slates(request)
    assert slate.shape == (1, 5)
    assert sorted(slate[0, :3]) == [2, 4, 7]
    assert list(slate[0, 3:]) == [-1, -1]


def test_conformance_catches_a_broken_reranker():
    class Duplicates(NoRerank):
        def rerank(self, request):
            columns = super().rerank(request)
            columns[:, 1] = columns[:, 0]
            return columns

    class Mutates(NoRerank):
        def rerank(self, request):
            request.relevance[:] = 0.0
            return super().rerank(request)

    class ItemIds(NoRerank):  # the old contract: item ids instead of columns
        def rerank(self, request):
            return take_columns(request.candidates, super().rerank(request))

    with pytest.raises(AssertionError, match="repeats"):
        check_reranker(Duplicates())
    with pytest.raises(AssertionError, match="mutated request.relevance"):
        check_reranker(Mutates())
    with pytest.raises(AssertionError, match="columns must be -1 or in"):
        check_reranker(ItemIds())


def test_rerankers_return_columns_of_the_candidates():
    request = make_request([[5, 3, 9, -1]], [[0.1, 0.9, 0.5, -np.inf]], k=4)
    columns = NewItemBoost(boost=0.0).rerank(request)
    np.testing.assert_array_equal(columns, [[1, 2, 0, -1]])  # by relevance 0.9, 0.5, 0.1; one slot short
    np.testing.assert_array_equal(take_columns(request.candidates, columns), [[3, 9, 5, -1]])


def test_no_rerank_keeps_policy_order():
    request = make_request([[5, 3, 9, -1]], [[0.1, 0.9, 0.5, -np.inf]], k=3)
    np.testing.assert_array_equal(NoRerank().slates(request), [[5, 3, 9]])


# ----------------------------------------------------------------------------- TriRec

# Shared hand case: G = 2 groups, target shares t = [0.5, 0.5], window exposure E = [3, 1].
# Items 10 (group 0, rel 3), 11 (group 0, rel 2), 12 (group 1, rel 1), in that policy order.
# Before any pick: s = [0.75, 0.25], |s - t| = [0.25, 0.25], L1 gap 0.5, g* = group 0 (first max).
# Position 0, w = 1:
#   add to group 0: s' = [4/5, 1/5] -> |s' - t| = [0.3, 0.3]: dDGU = 0.5 - 0.6 = -0.1,
#                   dMGU = 0.25 - 0.3 = -0.05
#   add to group 1: s' = [3/5, 2/5] -> |s' - t| = [0.1, 0.1]: dDGU = 0.5 - 0.2 = 0.3,
#                   dMGU = 0.25 - 0.1 = 0.15
GROUPS = np.array([0] * 10 + [0, 0, 1])


def test_fairness_gains_by_hand():
    d_dgu, d_mgu = TriRecReranker._fairness_gains(np.array([[3.0, 1.0]]), np.array([0.5, 0.5]),
                                                  np.array([[0, 0, 1]]), 1.0)
    np.testing.assert_allclose(d_dgu, [[-0.1, -0.1, 0.3]], atol=1e-12)
    np.testing.assert_allclose(d_mgu, [[-0.05, -0.05, 0.15]], atol=1e-12)
    # no exposure yet: shares count as uniform (gap 0); any pick moves to [1, 0] (L1 gap 1)
    d_dgu, d_mgu = TriRecReranker._fairness_gains(np.zeros((1, 2)), np.array([0.5, 0.5]),
                                                  np.array([[0, 1]]), 1.0)
    np.testing.assert_allclose(d_dgu, [[-1.0, -1.0]])
    np.testing.assert_allclose(d_mgu, [[-0.5, -0.5]])


def test_trirec_relevance_weight_schedule():
    reranker = TriRecReranker(a_min=0.2, a_max=1.0, p=1.0)
    assert reranker.relevance_weight(0) == pytest.approx(1.0)  # w(0) = 1: pure relevance on top
    # w(1) = 1/log2(3) = 0.63093 -> a = 0.2 + 0.8 * 0.63093 = 0.70474
    assert reranker.relevance_weight(1) == pytest.approx(0.2 + 0.8 / np.log2(3))


def test_trirec_strong_fairness_weight_picks_the_under_exposed_group():
    # Default a-schedule. Position 0: a = 1, so the most relevant item 10 wins whatever the weight.
    # Position 1: E = [3 + 1, 1] = [4, 1]; remaining 11 (group 0, rel 2) and 12 (group 1, rel 1).
    #   rel normalised: 11 -> 1, 12 -> 0; adding to group 1 shrinks the gap, adding to group 0
    #   widens it, so both fairness terms normalise to 11 -> 0, 12 -> 1 (fairness = 0.5 + 0.5 = 1).
    #   a = 0.70474: score(11) = 0.70474, score(12) = 0.29526 * fairness_weight,
    #   so 12 wins once fairness_weight > 0.70474 / 0.29526 = 2.387.
    request = make_request([[10, 11, 12]], [[3.0, 2.0, 1.0]], groups=GROUPS, k=2)
    np.testing.assert_array_equal(TriRecReranker(fairness_weight=1.0).slates(request), [[10, 11]])
    np.testing.assert_array_equal(TriRecReranker(fairness_weight=2.3).slates(request), [[10, 11]])
    np.testing.assert_array_equal(TriRecReranker(fairness_weight=2.5).slates(request), [[10, 12]])


def test_trirec_fairness_at_the_top_position():
    # a_min = a_max = 0.5 at every position. Position 0 (see the shared case above):
    #   rel normalised [1, 0.5, 0]; dDGU and dMGU normalised [0, 0, 1] -> fairness [0, 0, 1]
    #   score = 0.5 * rel + 0.5 * fairness_weight * fairness
    #   weight 0.5: [0.5, 0.25, 0.25] -> 10;   weight 2: [0.5, 0.25, 1.0] -> 12
    # Position 1 after 12 (weight 2): E = [3, 2], w = 0.63093; 10 and 11 both group 0, so the
    #   fairness terms are constant (-> 0) and relevance decides: 10.
    request = make_request([[10, 11, 12]], [[3.0, 2.0, 1.0]], groups=GROUPS, k=2)
    np.testing.assert_array_equal(
        TriRecReranker(a_min=0.5, a_max=0.5, fairness_weight=0.5).slates(request), [[10, 11]])
    np.testing.assert_array_equal(
        TriRecReranker(a_min=0.5, a_max=0.5, fairness_weight=2.0).slates(request), [[12, 10]])


def test_trirec_pure_relevance_orders_by_relevance_times_item_utility():
    # a_min = a_max = 1: score = rel_norm * EIU_norm ** l_item.
    # rel [3, 2, 1] -> [1, 0.5, 0]; EIU [1, 4, 2.5] -> (x - 1) / 3 = [0, 1, 0.5] -> into
    # [1e-3, 1]: [0.001, 1, 0.5005]. l_item = 1: scores [0.001, 0.5, 0] -> 11 first.
    # Then 10 vs 12: rel [1, 0]; EIU [1, 2.5] -> [0.001, 1]: scores [0.001, 0] -> 10, then 12.
    request = make_request([[10, 11, 12]], [[3.0, 2.0, 1.0]], groups=GROUPS,
                           item_utility=[[1.0, 4.0, 2.5]], k=3)
    pure = dict(a_min=1.0, a_max=1.0, fairness_weight=5.0)
    np.testing.assert_array_equal(TriRecReranker(l_item=1.0, **pure).slates(request),
                                  [[11, 10, 12]])
    # l_item = 0 ignores item utility: the policy's order
    np.testing.assert_array_equal(TriRecReranker(l_item=0.0, **pure).slates(request),
                                  [[10, 11, 12]])


def test_trirec_zero_fairness_weight_equals_pure_relevance():
    request = random_request(seed=5, n_users=20, n_candidates=30, k=10, n_groups=8)
    no_fairness = TriRecReranker(fairness_weight=0.0).slates(request)
    pure = TriRecReranker(a_min=1.0, a_max=1.0).slates(request)
    np.testing.assert_array_equal(no_fairness, pure)
    assert not np.array_equal(TriRecReranker(fairness_weight=4.0).slates(request), pure)


def test_trirec_rejects_bad_parameters():
    with pytest.raises(ValueError, match="a_max"):
        TriRecReranker(a_min=0.5, a_max=0.2)
    with pytest.raises(ValueError, match="fairness_weight"):
        TriRecReranker(fairness_weight=-1.0)


# ----------------------------------------------------------------------------- controller


def test_controller_moves_weight_with_gini_and_clips():
    controller = ControllerReranker(target_gini=0.5, gain=2.0, min_weight=0.0, max_weight=4.0,
                                    initial_weight=1.0)
    controller.end_round({"exposure/gini": 0.7})  # above target: 1 + 2 * 0.2 = 1.4
    assert controller.fairness_weight == pytest.approx(1.4)
    assert controller.trirec.fairness_weight == pytest.approx(1.4)
    controller.end_round({"exposure/gini": 0.3})  # below target: 1.4 - 2 * 0.2 = 1.0
    assert controller.fairness_weight == pytest.approx(1.0)
    for _ in range(5):
        controller.end_round({"exposure/gini": 1.0})  # +1 per round, clipped at 4
    assert controller.fairness_weight == pytest.approx(4.0)
    for _ in range(5):
        controller.end_round({"exposure/gini": 0.0})  # -1 per round, clipped at 0
    assert controller.fairness_weight == pytest.approx(0.0)
    controller.end_round({"exposure/gini": float("nan")})  # no information: unchanged
    assert controller.fairness_weight == 0.0
    assert controller.weight_history[:3] == pytest.approx([1.0, 1.4, 1.0])
    with pytest.raises(KeyError, match="exposure/gini"):
        controller.end_round({})


def test_controller_weight_changes_the_slate():
    # the strong-fairness hand case: weight 1 keeps 11, weight 2.5 picks 12 (see above)
    request = make_request([[10, 11, 12]], [[3.0, 2.0, 1.0]], groups=GROUPS, k=2)
    controller = ControllerReranker(target_gini=0.5, gain=1.5, initial_weight=1.0)
    np.testing.assert_array_equal(controller.slates(request), [[10, 11]])
    controller.end_round({"exposure/gini": 1.0})  # 1 + 1.5 * 0.5 = 1.75
    controller.end_round({"exposure/gini": 1.0})  # 1.75 + 0.75 = 2.5
    assert controller.fairness_weight == pytest.approx(2.5)
    np.testing.assert_array_equal(controller.slates(request), [[10, 12]])


# ----------------------------------------------------------------------------- MMR, boost


def test_mmr_by_hand():
    # e10 = [1, 0], e11 = [0.9, 0.1] (cos with e10 = 0.9 / sqrt(0.82) = 0.99388), e12 = [0, 1]
    # rel [3, 2, 1] -> [1, 0.5, 0]. Position 0: no slate, 10 wins.
    # lambda 0.5, position 1: 11: 0.25 - 0.5 * 0.99388 = -0.247; 12: 0 - 0.5 * 0 = 0 -> 12.
    # lambda 0.7, position 1: 11: 0.35 - 0.3 * 0.99388 = 0.052; 12: 0 -> 11.
    embedding = np.zeros((13, 2))
    embedding[10], embedding[11], embedding[12] = [1.0, 0.0], [0.9, 0.1], [0.0, 1.0]
    request = make_request([[10, 11, 12]], [[3.0, 2.0, 1.0]], embedding=embedding, k=3)
    np.testing.assert_array_equal(MMRReranker(lambda_=0.5).slates(request), [[10, 12, 11]])
    np.testing.assert_array_equal(MMRReranker(lambda_=0.7).slates(request), [[10, 11, 12]])
    np.testing.assert_array_equal(MMRReranker(lambda_=1.0).slates(request), [[10, 11, 12]])


def test_new_item_boost_by_hand():
    # rel [3, 2, 1] -> [1, 0.5, 0]; item 12 is new.
    # boost 0.6: [1, 0.5, 0.6] -> 10, 12, 11; boost 1: 12 ties 10 at 1.0, policy order keeps 10
    # first; boost 1.5: 12 first.
    is_new = np.zeros(13, dtype=bool)
    is_new[12] = True
    request = make_request([[10, 11, 12]], [[3.0, 2.0, 1.0]], is_new=is_new, k=3)
    np.testing.assert_array_equal(NewItemBoost(boost=0.6).slates(request), [[10, 12, 11]])
    np.testing.assert_array_equal(NewItemBoost(boost=1.0).slates(request), [[10, 12, 11]])
    np.testing.assert_array_equal(NewItemBoost(boost=1.5).slates(request), [[12, 10, 11]])
    np.testing.assert_array_equal(NewItemBoost(boost=0.0).slates(request), [[10, 11, 12]])


# ----------------------------------------------------------------------------- ledger


def test_ledger_window_padding_and_groups():
    ledger = ExposureLedger(window=2)
    ledger.record(0, np.array([7.0, 7.0]))
    ledger.record(1, np.array([1.0, 0.0]))
    ledger.record(2, np.array([0.0, 2.0, 1.0]))  # round 0 falls out; the catalogue grew
    assert ledger.rounds == [1, 2]
    # [1, 0, 0, 0] + [0, 2, 1, 0] = [1, 2, 1, 0]
    np.testing.assert_allclose(ledger.item_totals(4), [1.0, 2.0, 1.0, 0.0])
    ledger.record(3, np.array([0.0, 1.0, 1.0, 5.0]))
    # [0, 2, 1, 0] + [0, 1, 1, 5] = [0, 3, 2, 5]; groups [0, 1, 1, 0] -> [0 + 5, 3 + 2, 0]
    np.testing.assert_allclose(ledger.item_totals(4), [0.0, 3.0, 2.0, 5.0])
    np.testing.assert_allclose(ledger.group_exposure(np.array([0, 1, 1, 0]), 3), [5.0, 5.0, 0.0])


def test_ledger_copies_input_and_pickles():
    ledger = ExposureLedger(window=3)
    buffer = np.array([1.0, 2.0])
    ledger.record(0, buffer)
    buffer[:] = 100.0
    restored = pickle.loads(pickle.dumps(ledger))
    np.testing.assert_allclose(restored.item_totals(2), [1.0, 2.0])
    assert restored.window == 3
    with pytest.raises(ValueError, match="window"):
        ExposureLedger(window=0)


# ----------------------------------------------------------------------------- registry


def test_make_reranker_checks_names_and_params():
    assert isinstance(make_reranker("mmr", lambda_=0.3), MMRReranker)
    controller = make_reranker("controller", target_gini=0.4, a_min=0.1)
    assert controller.trirec.a_min == 0.1
    assert "a_min" in reranker_params("controller")
    assert "fairness_weight" not in reranker_params("controller")
    with pytest.raises(ValueError, match="unknown reranker 'fair'"):
        make_reranker("fair")
    with pytest.raises(ValueError, match="lambda"):
        make_reranker("mmr", lamda=0.3)
    with pytest.raises(ValueError, match="allowed: \\(none\\)"):
        make_reranker("none", k=3)
    for name, cls in RERANKERS.items():
        assert cls.name == name


def test_platform_estimates_by_hand():
    from agorasim.platform.estimates import expected_item_utility, group_targets, popularity_groups

    eiu = expected_item_utility(np.array([[1.0, 0.0]]), np.array([[[1.0, 0.0], [0.0, 1.0]]]), np.array([[0.0, 0.5]]))
    assert eiu == pytest.approx(np.array([[1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-0.5))]]))  # 0.9526, 0.6225
    # item 1 has left: it is not ranked among the alive and sits in group 0
    groups = popularity_groups(np.array([9.0, 100.0, 1.0, 5.0]), np.array([0, 2, 3]), 2)
    assert groups[1] == 0 and groups[0] == 0 and groups[2] == 1
    assert group_targets("uniform", groups, np.array([0, 2, 3]), 2, np.zeros(4)).sum() == pytest.approx(1.0)
