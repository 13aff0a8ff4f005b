"""rl/{ugr,flexrec,flame,blade,flower}: the seed methods' pure functions against hand values.

Every hand value is from ALGORITHMS.md sections 1-5 (or computed in the comment next to it);
the invariants are the ones each method relies on.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from agorasim.metrics.exposure import gini
from agorasim.rl.advantages import group_advantages
from agorasim.rl.blade import BladeTarget, heaviside_cdf
from agorasim.rl.flame import (
    gini_after,
    jaccard,
    refusal_rewards,
    step_advantages,
    step_rewards,
)
from agorasim.rl.flexrec import (
    NEEDS,
    gaussian_nll,
    item_advantages,
    list_ndcg,
    need_gains,
    swap_credit,
    uncertainty_scaled,
)
from agorasim.rl.flower import (
    normalise_s,
    path_log_flows,
    personalised_log_reward,
    prefix_log_flows,
    reward_from_counts,
    reward_from_target_shares,
    subtb_loss,
)
from agorasim.rl.ugr import (
    confidence_auc,
    confidence_loss,
    difficulty_alpha,
    first_hit_rank,
    ugr_rewards,
)

D1 = 1.0 / math.log2(3.0)  # DCG discount of position 1: 0.6309298
D2 = 0.5  # 1/log2(4)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------- UGR

# ALGORITHMS.md section 4: G = 4 beams with log-probs (-1, -2, -3, -4), the target at rank 1.
UGR_HIT = np.array([[False, True, False, False]])
UGR_SCORES = np.array([[-1.0, -2.0, -3.0, -4.0]])


def test_ugr_rewards_length_normalised():
    # 5 generated tokens: s = (-0.2, -0.4, -0.6, -0.8); wrong beams 0, 2, 3:
    # exp(-0.2, -0.6, -0.8) = (0.81873, 0.54881, 0.44933), sum 1.81687
    # -> -softmax = (-0.45063, -0.30206, -0.24731), the hit gets 1
    r = ugr_rewards(UGR_HIT, UGR_SCORES, lengths=5)
    np.testing.assert_allclose(r, [[-0.4506, 1.0, -0.3021, -0.2473]], atol=1e-4)
    # mean 0; sample std sqrt(sum r^2 / 3) = sqrt((0.20306 + 1 + 0.09124 + 0.06116) / 3) = 0.6722
    assert r.std(ddof=1) == pytest.approx(0.6722, abs=1e-4)
    np.testing.assert_allclose(group_advantages(r), [[-0.670, 1.487, -0.449, -0.368]], atol=1e-3)
    # (B, G) lengths give the same as the int
    np.testing.assert_allclose(ugr_rewards(UGR_HIT, UGR_SCORES, np.full((1, 4), 5)), r)


def test_ugr_rewards_raw_sums():
    # exp(-1, -3, -4) = (0.36788, 0.04979, 0.01832), sum 0.43599 -> (0.84379, 0.11420, 0.04201)
    r = ugr_rewards(UGR_HIT, UGR_SCORES)
    np.testing.assert_allclose(r, [[-0.8438, 1.0, -0.1142, -0.0420]], atol=1e-4)


def test_ugr_rewards_group_mean_zero_with_a_hit_and_zero_without():
    rng = np.random.default_rng(0)
    scores = -rng.exponential(3.0, size=(50, 16))
    hit = np.zeros((50, 16), dtype=bool)
    hit[np.arange(40), rng.integers(0, 16, 40)] = True  # rows 40..49 have no hit
    r = ugr_rewards(hit, scores, lengths=5)
    # the softmax of the wrong beams sums to 1 and the hit is 1, so the mean is exactly 0
    np.testing.assert_allclose(r[:40].mean(axis=1), 0.0, atol=1e-12)
    assert np.all(r[40:] == 0.0)
    assert np.all(r[hit] == 1.0) and np.all(r[:40][~hit[:40]] < 0)


def test_ugr_rewards_padding_beams_get_zero_and_leave_the_softmax():
    scores = np.array([[-1.0, -2.0, -np.inf, -4.0]])
    hit = np.array([[False, True, False, False]])
    r = ugr_rewards(hit, scores)
    # softmax over beams 0 and 3 only: exp(-1) / (exp(-1) + exp(-4)) = 0.95257
    np.testing.assert_allclose(r, [[-0.95257, 1.0, 0.0, -0.04743]], atol=1e-5)
    assert r.mean() == pytest.approx(0.0, abs=1e-12)


def test_first_hit_rank_and_difficulty_alpha():
    hit = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)
    kstar = first_hit_rank(hit)
    np.testing.assert_array_equal(kstar, [1, -1, 0, 3])
    # alpha = alpha_min + (1 - alpha_min) k*/(G-1): k* = 1, G = 4, alpha_min = 0 -> 1/3
    np.testing.assert_allclose(difficulty_alpha(kstar, 4, 0.0), [1 / 3, 1.0, 0.0, 1.0])
    # alpha_min = 0.1: 0.1 + 0.9/3 = 0.4; rank 0 -> 0.1; no hit -> 1
    np.testing.assert_allclose(difficulty_alpha(kstar, 4, 0.1), [0.4, 1.0, 0.1, 1.0])
    with pytest.raises(ValueError):
        difficulty_alpha(kstar, 1, 0.0)


def test_confidence_loss_hand_value_and_reductions():
    # group 0: hit at 1 (c_gt = 0.9), beam 2 partial, beams 0 and 3 wrong; lambda_p = 1,
    # lambda_w = 0.5:
    #   partial: softplus(0.6 - 0.9) = log(1 + e^-0.3) = 0.554355
    #   wrong:   mean(softplus(-0.7), softplus(-0.6)) = mean(0.403186, 0.437488) = 0.420337
    #   L_0 = 0.554355 + 0.5 * 0.420337 = 0.764524
    # group 1: no hit, contributes nothing
    hand = softplus(-0.3) + 0.5 * (softplus(-0.7) + softplus(-0.6)) / 2
    assert hand == pytest.approx(0.764524, abs=1e-6)
    conf = torch.tensor([[0.2, 0.9, 0.6, 0.3], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    hit = np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    partial = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)  # a hit flagged partial is ignored
    loss = confidence_loss(conf, hit, partial, 1.0, 0.5)
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    # "all_groups": the sum over the 2 groups / 2
    all_groups = confidence_loss(conf, hit, partial, 1.0, 0.5, reduction="all_groups")
    assert all_groups.item() == pytest.approx(hand / 2, abs=1e-6)
    loss.backward()
    # the hit's confidence is pushed up, the others down; the hitless group gets no gradient
    assert conf.grad[0, 1] < 0 and torch.all(conf.grad[0, [0, 2, 3]] > 0)
    assert torch.all(conf.grad[1] == 0)
    # torch tensors for hit/partial give the same value
    same = confidence_loss(conf.detach(), torch.as_tensor(hit), torch.as_tensor(partial), 1.0, 0.5)
    assert same.item() == pytest.approx(hand, abs=1e-6)
    with pytest.raises(ValueError):
        confidence_loss(conf, hit, partial, 1.0, 0.5, reduction="sum")


def test_confidence_loss_empty_sets_and_no_hit():
    conf = torch.tensor([[0.2, 0.9, 0.6]], requires_grad=True)
    hit = np.array([[False, True, False]])
    # no partial beams: that term is 0, only wrong ones count: 0.5 * mean(sp(-0.7), sp(-0.3))
    loss = confidence_loss(conf, hit, np.zeros((1, 3), bool), 1.0, 0.5)
    assert loss.item() == pytest.approx(0.5 * (softplus(-0.7) + softplus(-0.3)) / 2, abs=1e-6)
    # no hit anywhere: a zero that still backpropagates
    zero = confidence_loss(conf, np.zeros((1, 3), bool), np.ones((1, 3), bool), 1.0, 0.5)
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert torch.all(conf.grad == 0)


def test_confidence_auc():
    # hits 0.9, 0.5; misses 0.1, 0.5, 0.7: pairs won (0.9: 3), (0.5: 1 + 1/2 tie) -> 4.5 / 6
    conf = np.array([0.9, 0.5, 0.1, 0.5, 0.7])
    hit = np.array([True, True, False, False, False])
    assert confidence_auc(conf, hit) == pytest.approx(0.75)
    assert confidence_auc(conf[None, :], hit[None, :]) == pytest.approx(0.75)
    assert confidence_auc([0.9, 0.1], [True, False]) == 1.0
    assert confidence_auc([0.1, 0.9], [True, False]) == 0.0
    assert math.isnan(confidence_auc([0.1, 0.9], [False, False]))
    assert math.isnan(confidence_auc([0.1, 0.9], [True, True]))


# ------------------------------------------------------------------------------------- FlexRec


def test_list_ndcg():
    # (0, 1, 0): DCG = 1/log2(3), IDCG (own gains sorted: 1, 0, 0) = 1
    assert list_ndcg([0.0, 1.0, 0.0]) == pytest.approx(D1)
    # IDCG from an external pool (1, 1, 0, 0) cut at 3: 1 + D1
    assert list_ndcg([0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]) == pytest.approx(D1 / (1 + D1))
    # a pool shorter than the list pads with 0; an all-zero list has NDCG 0
    assert list_ndcg([1.0, 0.0, 0.0], [1.0]) == pytest.approx(1.0)
    np.testing.assert_allclose(list_ndcg(np.zeros((2, 3, 4))), np.zeros((2, 3)))


def test_swap_credit_hand_example():
    # sigma = (A, B, C), gains (0, 1, 0), NDCG 0.63093:
    #   k=0: swap 0<->1 -> (1,0,0), NDCG 1: 0.63093 - 1 = -0.36907; swap 0<->2 -> same list, 0
    #        r_0 = (-0.36907 + 0) / 2 = -0.18453
    #   k=1: swap 1<->2 -> (0,0,1), NDCG 0.5: r_1 = 0.13093;  r_2 = 0 (no later position)
    np.testing.assert_allclose(swap_credit([0.0, 1.0, 0.0]), [-0.1845, 0.1309, 0.0], atol=1e-4)


def test_swap_credit_matches_explicit_swaps_and_signs():
    rng = np.random.default_rng(1)
    gains = rng.random((3, 4, 6))
    credit = swap_credit(gains)
    assert credit.shape == gains.shape
    # brute force: build every swapped list
    base = list_ndcg(gains)
    for k in range(6):
        diffs = []
        for j in range(k + 1, 6):
            swapped = gains.copy()
            swapped[..., [k, j]] = swapped[..., [j, k]]
            diffs.append(base - list_ndcg(swapped))
        expected = np.mean(diffs, axis=0) if diffs else np.zeros(base.shape)
        np.testing.assert_allclose(credit[..., k], expected, atol=1e-12)
    # sorted by descending gain: no swap can help, credit >= 0; ascending: credit <= 0
    descending = -np.sort(-gains, axis=-1)
    assert np.all(swap_credit(descending) >= -1e-15)
    assert np.all(swap_credit(descending[..., ::-1]) <= 1e-15)
    assert np.all(swap_credit(np.zeros((2, 5))) == 0.0)


def test_item_advantages_normalise_over_all_items_of_a_prompt():
    credit = np.array([[[1.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    a = item_advantages(credit)
    # prompt 0: mean 0.25, sample std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    np.testing.assert_allclose(a[0], [[0.75 / 0.5001, -0.25 / 0.5001], [-0.25 / 0.5001] * 2])
    assert np.all(a[1] == 0.0)


def test_uncertainty_scaled_and_gaussian_nll():
    # A / (1 + lam exp(log_var)): log_var 0 -> /2; log_var log 3, lam 1 -> /4
    scaled = uncertainty_scaled(np.array([2.0, 2.0]), np.array([0.0, math.log(3)]))
    np.testing.assert_allclose(scaled, [1.0, 0.5])
    np.testing.assert_allclose(uncertainty_scaled(np.array([2.0]), np.array([0.0]), lam=0.0), [2.0])
    scaled = uncertainty_scaled(torch.tensor([2.0]), torch.tensor([0.0]))
    assert torch.is_tensor(scaled) and scaled.item() == pytest.approx(1.0)
    # 0.5 * (log_var + (t - mu)^2 / exp(log_var)): (0, 0, t=1) -> 0.5; (0, log 4, t=2) ->
    # 0.5 * (1.386294 + 4/4) = 1.193147; mean 0.846574
    mu = torch.tensor([0.0, 0.0], requires_grad=True)
    log_var = torch.tensor([0.0, math.log(4.0)], requires_grad=True)
    nll = gaussian_nll(mu, log_var, np.array([1.0, 2.0]))
    assert nll.item() == pytest.approx((0.5 + 0.5 * (math.log(4.0) + 1.0)) / 2, abs=1e-6)
    nll.backward()
    assert torch.all(mu.grad < 0)  # mu is pulled toward the target
    # the NLL is minimised at log_var = log((t - mu)^2): d/dlog_var = 0.5 (1 - 1) = 0 at row 1
    assert log_var.grad[1].item() == pytest.approx(0.0, abs=1e-6)


def test_need_gains():
    click = np.array([[[0.5, 0.8, 0.2]]])
    seen = np.array([[[True, False, False]]])
    pop = np.array([[[1.0, 0.5, 0.0]]])
    exposure = np.array([[[0.0, math.e**2 - 2, 10.0]]])
    np.testing.assert_allclose(need_gains("rel", click), click)
    np.testing.assert_allclose(need_gains("explore", click, first_code_seen=seen),
                               [[[0.0, 0.8, 0.2]]])
    np.testing.assert_allclose(need_gains("trend", click, popularity=pop), [[[0.5, 0.4, 0.0]]])
    # niche: click / log(2 + exposure): 0.5/log 2, 0.8/2, 0.2/log 12
    np.testing.assert_allclose(need_gains("niche", click, exposure=exposure),
                               [[[0.5 / math.log(2), 0.4, 0.2 / math.log(12)]]])
    assert NEEDS == ("rel", "explore", "trend", "niche")
    with pytest.raises(ValueError, match="allowed: rel, explore, trend, niche"):
        need_gains("fun", click)
    with pytest.raises(ValueError, match="popularity"):
        need_gains("trend", click)


# --------------------------------------------------------------------------------------- FLAME


def test_flame_hand_example():
    # universe {0..5}; M_0 = {1, 2}, GT = {2, 3, 4}; add task, lines [3, invalid, 5]
    gt = np.isin(np.arange(6), [2, 3, 4])
    lists = [[1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3, 5]]
    masks = np.array([np.isin(np.arange(6), m) for m in lists])
    phi = jaccard(masks, gt)
    # |{2}|/|{1,2,3,4}| = .25; |{2,3}|/|{1,2,3,4}| = .5; unchanged .5; |{2,3}|/|{1,2,3,4,5}| = .4
    np.testing.assert_allclose(phi, [0.25, 0.5, 0.5, 0.4])
    r = step_rewards(phi)
    np.testing.assert_allclose(r, [0.25, 0.0, -0.1], atol=1e-12)
    assert r.sum() == pytest.approx(0.15)
    # refusal: refusals at steps (no, yes, no): -(0/1, 1/2, 1/3); total = last = -1/T refusals
    ref = refusal_rewards([False, True, False])
    np.testing.assert_allclose(ref, [0.0, -0.5, -1 / 3])
    assert ref[-1] == pytest.approx(-1 / 3)
    assert jaccard(np.zeros(4, bool), np.zeros(4, bool)) == 0.0


def test_step_rewards_telescope_exactly():
    rng = np.random.default_rng(2)
    phi = rng.random((4, 8, 6))
    r = step_rewards(phi)
    assert r.shape == (4, 8, 5)
    np.testing.assert_allclose(r.sum(axis=-1), phi[..., -1] - phi[..., 0], atol=1e-14)


def test_step_advantages():
    total = np.array([[1.0, -1.0]])
    step = np.array([[[0.2, -0.2], [0.0, 0.4]]])
    np.testing.assert_allclose(step_advantages(total, step), [[[1.1, 0.9], [-1.0, -0.8]]])
    np.testing.assert_allclose(step_advantages(total, step, weight=0.2),
                               [[[1.04, 0.96], [-1.0, -0.92]]])
    # normalised: the 4 step rewards of the prompt, mean 0.1, sample std sqrt(0.2/3) = 0.258199
    z = (step - 0.1) / (math.sqrt(0.2 / 3) + 1e-4)
    np.testing.assert_allclose(step_advantages(total, step, normalise=True),
                               total[..., None] + 0.5 * z)


def test_gini_after_matches_metrics_gini():
    rng = np.random.default_rng(3)
    exposure = rng.integers(0, 30, size=200).astype(np.float64)
    exposure[:50] = 0.0  # zero-exposure items are included in the Gini
    items = rng.integers(-1, 200, size=(4, 6, 5))
    items[0, 0, 1] = items[0, 0, 0]  # a repeated item
    items[1, 2] = -1  # an all-empty list
    w = 1.0 / np.log2(np.arange(5) + 2.0)
    got = gini_after(exposure, items, w)
    assert got.shape == (4, 6)
    for idx in np.ndindex(4, 6):
        x = exposure.copy()
        for k, item in enumerate(items[idx]):
            if item >= 0:
                x[item] += w[k]
        assert got[idx] == pytest.approx(gini(x), abs=1e-12), idx
    assert gini_after(exposure, items[1, 2], w) == pytest.approx(gini(exposure), abs=1e-12)
    # default weights 1, an empty ledger and one list: x = (1, 1, 0, 0);
    # sum over ordered pairs |xi - xj| = 2 * (2 ones x 2 zeros) = 8, / (2 n S = 2*4*2) = 0.5
    assert gini_after(np.zeros(4), np.array([0, 1])) == pytest.approx(0.5)
    assert gini_after(np.zeros(4), np.array([-1, -1])) == 0.0


# --------------------------------------------------------------------------------------- BLADE

BLADE_REF = np.array([0.1, 0.2, 0.3])
BLADE_GROUP = np.array([[0.5, 0.6, 0.7]])


def test_heaviside_cdf():
    samples = np.array([0.1, 0.2, 0.2, 0.4])
    # at 0.2: 0.1 below (1) + two ties (1/2 each) = 2 of 4
    np.testing.assert_allclose(heaviside_cdf([0.0, 0.1, 0.2, 0.3, 0.5], samples),
                               [0.0, 0.125, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError):
        heaviside_cdf(0.5, [])


def test_blade_static_gives_no_signal_above_the_reference():
    target = BladeTarget(alpha=3, dynamic=False)
    target.set_reference(BLADE_REF)
    # F_ref(r) = (1/3) sum 1[r_ref <= r] = 1 for all three rewards
    np.testing.assert_allclose(target.cdf(BLADE_GROUP, BLADE_GROUP), [[1.0, 1.0, 1.0]])
    rt = target.transform(BLADE_GROUP, 4)
    np.testing.assert_allclose(rt, 0.0, atol=1e-15)
    np.testing.assert_allclose(group_advantages(rt), 0.0, atol=1e-12)
    target.update(np.full(100, 0.9))  # static: never moves
    np.testing.assert_allclose(target.cdf(0.5), 1.0)
    # F_ref with ties counts the reference reward itself: 1[r_ref <= 0.2] = 2/3
    assert target.cdf(0.2) == pytest.approx(2 / 3)


def test_blade_hand_example():
    target = BladeTarget(alpha=3)
    target.set_reference(BLADE_REF)
    # F(0.5) = (3*1 + H(0) = 0.5) / 6 = 0.58333; F(0.6) = (3 + 1 + 0.5)/6 = 0.75;
    # F(0.7) = (3 + 2 + 0.5)/6 = 0.91667
    f = target.cdf(BLADE_GROUP, BLADE_GROUP)
    np.testing.assert_allclose(f, [[0.5833, 0.75, 0.9167]], atol=1e-4)
    # r~ = 3 log F = (3 * -0.53900, 3 * -0.28768, 3 * -0.08701)
    rt = target.transform(BLADE_GROUP, 4)
    np.testing.assert_allclose(rt, [[-1.617, -0.863, -0.261]], atol=1e-3)
    np.testing.assert_allclose(group_advantages(rt), [[-1.035, 0.075, 0.961]], atol=1e-3)
    # F^3 = (0.19850, 0.42188, 0.77025), sum 1.39063 -> (0.14274, 0.30337, 0.55389)
    w = target.distill_weights(BLADE_GROUP, 4)
    np.testing.assert_allclose(w, [[0.143, 0.303, 0.554]], atol=1e-3)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    # N defaults to G = 3
    np.testing.assert_allclose(target.transform(BLADE_GROUP), 2 * np.log(f))


def test_blade_groups_use_their_own_posterior_and_the_floor():
    target = BladeTarget(alpha=3, floor=1e-3)
    target.set_reference(BLADE_REF)
    groups = np.array([[0.5, 0.6, 0.7], [0.0, 0.01, 0.02]])
    f = target.cdf(groups, groups)
    np.testing.assert_allclose(f[0], [3.5 / 6, 4.5 / 6, 5.5 / 6])
    # rewards below the reference: the prior is 0, only the group term: (0.5, 1.5, 2.5) / 6
    np.testing.assert_allclose(f[1], [0.5 / 6, 1.5 / 6, 2.5 / 6])
    # F would be 0 without the group; the floor caps the log at log(1e-3)
    static = BladeTarget(alpha=3, dynamic=False)
    static.set_reference(BLADE_REF)
    np.testing.assert_allclose(static.transform(groups[1:], 4), 3 * math.log(1e-3))
    np.testing.assert_allclose(static.distill_weights(groups[1:], 4), 1 / 3)


def test_blade_target_moves_as_rewards_rise():
    target = BladeTarget(alpha=4, reservoir=12)
    target.set_reference(BLADE_REF)
    r0 = 0.5
    # prior F(0.5): 3/3 (reference), 3/7, 3/11, then 0 once the 12 kept rewards are .6/.7/.8
    priors, values = [target.cdf(r0)], [target.cdf(r0, [0.4, 0.5, 0.6])]
    for level in (0.6, 0.7, 0.8):
        target.update(np.full(4, level))
        priors.append(target.cdf(r0))
        values.append(target.cdf(r0, [0.4, 0.5, 0.6]))
    np.testing.assert_allclose(priors, [1.0, 3 / 7, 3 / 11, 0.0])
    assert all(a > b for a, b in zip(values, values[1:])), values
    # the reservoir keeps only the last 12 rewards: the reference is gone, prior F(0.5) = 0
    assert target.buffer.size == 12 and np.all(target.buffer >= 0.6)
    assert target.cdf(r0) == 0.0
    # (4 * 0 + H(0.1) + H(0) + H(-0.1)) / (4 + 3) = 1.5 / 7
    assert values[-1] == pytest.approx(1.5 / 7)


def test_blade_state_pickles_and_empty_prior():
    target = BladeTarget(alpha=3)
    with pytest.raises(ValueError):
        target.cdf(0.5)  # nothing to be a prior yet
    # no prior: only the group term, (0.5, 1.5, 2.5) / 3
    np.testing.assert_allclose(target.cdf(BLADE_GROUP, BLADE_GROUP), [[1 / 6, 0.5, 5 / 6]])
    target.set_reference(BLADE_REF)
    target.update(BLADE_GROUP)
    clone = pickle.loads(pickle.dumps(target))
    np.testing.assert_array_equal(clone.buffer, target.buffer)
    np.testing.assert_allclose(clone.transform(BLADE_GROUP, 4), target.transform(BLADE_GROUP, 4))
    with pytest.raises(ValueError):
        BladeTarget(alpha=-1)


# -------------------------------------------------------------------------------------- Flower

# items A = [1, 2], B = [1, 3], C = [4] in Flower; fixed depth 2 here, C = (4, 0); v = (6, 2, 2)
FLOWER_CODES = np.array([[1, 2], [1, 3], [4, 0]])
FLOWER_V = np.array([6.0, 2.0, 2.0])


def test_prefix_and_path_log_flows():
    levels = prefix_log_flows(FLOWER_CODES, FLOWER_V)
    assert len(levels) == 3
    np.testing.assert_allclose(np.exp(levels[0][1]), [10.0])
    np.testing.assert_array_equal(levels[1][0], [[1], [4]])
    np.testing.assert_allclose(np.exp(levels[1][1]), [8.0, 2.0])
    np.testing.assert_allclose(np.exp(levels[2][1]), [6.0, 2.0, 2.0])
    flows = path_log_flows(FLOWER_CODES, FLOWER_V, [0, 1, 2, 0])
    np.testing.assert_allclose(np.exp(flows), [[10, 8, 6], [10, 8, 2], [10, 2, 2], [10, 8, 6]])
    ratios = np.exp(np.diff(flows, axis=1))
    # r(1) = 8/10 = .8, r(2|1) = 6/8 = .75, product .6 = v_A / sum v
    assert ratios[0, 0] == pytest.approx(0.8) and ratios[0, 1] == pytest.approx(0.75)
    np.testing.assert_allclose(ratios.prod(axis=1), FLOWER_V[[0, 1, 2, 0]] / FLOWER_V.sum())
    # a zero reward has log-flow -inf, without a warning
    with np.errstate(all="raise"):
        zero = path_log_flows(FLOWER_CODES, [6.0, 0.0, 2.0], [1])
    assert zero[0, 2] == -np.inf and zero[0, 1] == pytest.approx(math.log(6.0))


def test_subtb_loss_zero_at_the_flow_policy_and_hand_value():
    flows = path_log_flows(FLOWER_CODES, FLOWER_V, [0, 1, 2])
    exact = torch.tensor(np.diff(flows, axis=1), requires_grad=True)
    assert subtb_loss(flows, exact).item() == pytest.approx(0.0, abs=1e-24)
    # one row, log pi off by (+0.1, -0.3): deltas (0.1, -0.3); sub-trajectories
    # [0,1): 0.1, [1,2): -0.3, [0,2): -0.2 -> 0.01 + 0.09 + 0.04 = 0.14
    one = torch.tensor(np.diff(flows[:1], axis=1) + [[0.1, -0.3]])
    assert subtb_loss(flows[:1], one).item() == pytest.approx(0.14, abs=1e-12)
    # D = 4: 10 sub-trajectories; delta all 1 -> sum over spans of length^2 = 4*1 + 3*4 + 2*9 + 16
    flat = np.zeros((2, 5))
    assert subtb_loss(flat, torch.ones(2, 4, dtype=torch.float64)).item() == pytest.approx(50.0)


def test_subtb_training_moves_free_logits_to_the_flow_ratios():
    torch.manual_seed(0)
    flows = torch.tensor(path_log_flows(FLOWER_CODES, FLOWER_V, [0, 1, 2]))
    root = torch.zeros(2, requires_grad=True)  # logits of first codes {1, 4}
    node1 = torch.zeros(2, requires_grad=True)  # logits of {2, 3} under 1 (node 4 has one child)
    optimiser = torch.optim.Adam([root, node1], lr=0.1)

    def loss_fn():
        lr, l1 = torch.log_softmax(root, 0), torch.log_softmax(node1, 0)
        log_pi = torch.stack([torch.stack([lr[0], l1[0]]), torch.stack([lr[0], l1[1]]),
                              torch.stack([lr[1], torch.zeros(())])]).double()
        return subtb_loss(flows, log_pi)

    first = loss_fn().item()
    assert first > 0.1  # uniform policy: pi(1) = .5 instead of .8
    for _ in range(300):
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimiser.step()
    assert loss.item() < 1e-4 < first
    np.testing.assert_allclose(torch.softmax(root, 0).detach(), [0.8, 0.2], atol=5e-3)
    np.testing.assert_allclose(torch.softmax(node1, 0).detach(), [0.75, 0.25], atol=5e-3)


def test_flower_rewards():
    np.testing.assert_allclose(reward_from_counts([0, 3, 5]), [1.0, 4.0, 6.0])
    np.testing.assert_allclose(reward_from_counts([0, 3], smoothing=0.0), [0.0, 3.0])
    # groups 0 (2 items), 1 (1 item), none; target shares (0.3, 0.7)
    r = reward_from_target_shares([0, 0, 1, -1], [0.3, 0.7])
    np.testing.assert_allclose(r, [0.15, 0.15, 0.7, 0.0])
    np.testing.assert_allclose(reward_from_target_shares([0, 1], [0.5, 0.5], supply=[4, 2]),
                               [0.125, 0.25])
    # s = (p - mean)/(max - min) + 1: p = (0.1, 0.2, 0.6): mean 0.3, spread 0.5 -> (0.6, 0.8, 1.6)
    s = normalise_s([[0.1, 0.2, 0.6], [0.3, 0.3, 0.3]])
    np.testing.assert_allclose(s, [[0.6, 0.8, 1.6], [1.0, 1.0, 1.0]])
    # log R / s: R^(1/s), liked items (s > 1) get a log-reward closer to 0
    np.testing.assert_allclose(personalised_log_reward(math.log(0.25), s[0]),
                               math.log(0.25) / np.array([0.6, 0.8, 1.6]))
