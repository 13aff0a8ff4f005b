"""PaperEval's new-item evaluator (platform/evaluator.py): hand values of ALGORITHMS.md section 10,
its retrieval, its outcome counts, the evaluator-ranked boost, and the market with it on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from agorasim.config import EvaluatorConfig, build_config
from agorasim.errors import UserInputError
from agorasim.platform.base import RerankRequest
from agorasim.platform.evaluator import ItemEvaluator, evaluate, listmle, temperatures
from agorasim.platform.rerankers import NewItemBoost
from agorasim.run import checkpoint


def test_listmle_hand_values():
    """B = 2, scores (1, 0) in the correct order: log(1 + e^-1/tau) = .3133 at tau 1, .1269 at .5."""
    scores, outcome = torch.tensor([[1.0, 0.0]]), torch.tensor([0.9, 0.1])
    assert listmle(scores, outcome, torch.tensor([1.0])).item() == pytest.approx(0.3133, abs=1e-4)
    assert listmle(scores, outcome, torch.tensor([0.5])).item() == pytest.approx(0.1269, abs=1e-4)
    # the wrong order costs more: log(1 + e^1) = 1.3133; the steps are summed
    assert listmle(scores, torch.tensor([0.1, 0.9]), torch.tensor([1.0])).item() == pytest.approx(1.3133, abs=1e-4)
    both = listmle(scores.repeat(2, 1), outcome, torch.tensor([1.0, 0.5])).item()
    assert both == pytest.approx(0.3133 + 0.1269, abs=1e-4)
    # three items: -log(e^2/(e^2+e^1+e^0)) - log(e^1/(e^1+e^0)) - 0
    three = listmle(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0.5, 0.7, 0.1]), torch.tensor([1.0])).item()
    want = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
    assert three == pytest.approx(want, rel=1e-6)


def test_temperature_schedule():
    assert temperatures(4, 1.0, 0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert list(temperatures(0, 1.0, 0.2)) == [1.0]


def _evaluator(**fields) -> ItemEvaluator:
    return ItemEvaluator(EvaluatorConfig(enabled=True, **fields), dim=2, seed=0)


def test_neighbours_are_concurrent_similar_and_never_the_item_itself():
    content = np.array([[1, 0], [1, 0.1], [0.9, 0.3], [0, 1], [1, 0.05], [1, 0.02]], dtype=np.float64)
    born = np.array([0, 3, 4, 4, 9, 5])  # item 0 is the initial catalogue (never a neighbour)
    ev = _evaluator(k=2, window=2)
    found, sims = ev.neighbours(np.array([2, 5, 1]), content, born)
    # item 2 (born 4) sees items born 2..4: 1, 3 (and not 4, 5: born later); 1 is closer than 3
    assert found[0].tolist() == [1, 3]
    # item 5 (born 5) sees 3..5: items 1, 2, 3; by cosine 1 (0.1 off), 2, then 3
    assert found[1].tolist() == [1, 2]
    # item 1 (born 3) sees 1..3: only itself, so no neighbour
    assert found[2].tolist() == [-1, -1]
    assert sims[0, 0] == pytest.approx((1 * 0.9 + 0.1 * 0.3) / (math.hypot(1, 0.1) * math.hypot(0.9, 0.3)), rel=1e-5)
    none, _ = _evaluator(k=0).neighbours(np.array([2]), content, born)
    assert none.shape == (1, 0)


def test_outcomes_count_only_the_first_horizon_rounds():
    ev = _evaluator(horizon=2, min_impressions=2)
    born = np.array([0, 1, 1, 1])
    slates = np.array([[1, 2], [1, 3], [2, -1], [0, 3]])
    choice, stars = np.array([0, 1, -1, 0]), np.array([4.0, 2.0, np.nan, 5.0])
    for round in (1, 2, 3):  # round 3 is past the horizon of every new item, round 2 of item 0's
        ev.observe(round, slates, choice, stars, born)
    assert ev.impressions.tolist() == [1, 4, 4, 4] and ev.clicks.tolist() == [1, 2, 0, 2]
    assert ev.outcomes(1, born)[0].tolist() == []  # windows close after round 2
    ids, y = ev.outcomes(2, born)
    assert ids.tolist() == [1, 2, 3] and y.tolist() == [0.5, 0.0, 0.5]  # item 0 (initial catalogue) has none
    assert _evaluator(horizon=2, min_impressions=5).outcomes(2, born)[0].tolist() == []
    rating = _evaluator(horizon=2, min_impressions=2, outcome="rating")
    for round in (1, 2):
        rating.observe(round, slates, choice, stars, born)
    ids, y = rating.outcomes(2, born)
    assert ids.tolist() == [1, 3] and y.tolist() == [4.0, 2.0]  # item 2 was never clicked: no mean stars


def test_evaluate_by_hand():
    perfect = evaluate(np.array([3.0, 2.0, 1.0]), np.array([0.9, 0.5, 0.1]))
    assert perfect["evaluator/spearman"] == 1 and perfect["evaluator/kendall"] == 1
    assert perfect["evaluator/ndcg@10"] == pytest.approx(1.0) and perfect["evaluator/n"] == 3
    reversed_ = evaluate(np.array([1.0, 2.0, 3.0]), np.array([0.9, 0.5, 0.1]))
    assert reversed_["evaluator/spearman"] == -1
    # gains (1, 0.5, 0) in the order (0, 0.5, 1): DCG 0.5 / log2 3 + 1 / 2 over IDCG 1 + 0.5 / log2 3
    w = 1 / math.log2(3)
    assert reversed_["evaluator/ndcg@10"] == pytest.approx((0.5 * w + 0.5) / (1 + 0.5 * w))
    assert math.isnan(evaluate(np.ones(3), np.array([0.9, 0.5, 0.1]))["evaluator/spearman"])


def test_the_evaluator_learns_a_planted_outcome_and_every_ablation_trains():
    """Outcomes that are a linear function of content: after fits, the held-out items are
    ranked far better than chance (Spearman > 0.7) by the full model and by each ablation."""
    rng = np.random.default_rng(0)
    n, d = 600, 8
    content = rng.normal(size=(n, d))
    truth = content @ rng.normal(size=d)
    born = np.repeat(np.arange(1, 61), 10)
    for fields in ({}, {"k": 0}, {"steps": 0}, {"loss": "mse"}):
        ev = ItemEvaluator(EvaluatorConfig(enabled=True, min_impressions=1, horizon=1, epochs=20, **fields), d, seed=0)
        ev.impressions, ev.clicks = np.ones(n), (truth - truth.min()) / np.ptp(truth)
        ev.stars, ev.evaluated = np.zeros(n), np.zeros(n, dtype=bool)
        before = [p.detach().clone() for p in ev.net.parameters()]
        fit_rng = np.random.default_rng(1)
        ev.fit(39, content, np.where(born <= 40, born, 10**6), fit_rng)  # train on the first 40 rounds
        assert all(not torch.equal(a, b) for a, b in zip(before, ev.net.parameters()))
        figures = ev.fit(59, content, born, fit_rng)  # the last 20 rounds are held out, then trained on
        assert figures["evaluator/n"] == 200 and figures["evaluator/spearman"] > 0.7, fields


def test_boost_spreads_the_same_mean_bonus_by_the_evaluators_rank():
    is_new = np.array([False, True, True, True, True])
    prior = np.array([np.nan, 0.1, 0.9, 0.5, np.nan])  # item 4 is new but not yet scored
    request = RerankRequest(candidates=np.array([[0, 1, 2, 3, 4]]), relevance=np.zeros((1, 5)),
                            item_utility=np.ones((1, 5)), groups=np.zeros(5, np.int64), group_exposure=np.ones(1),
                            target=np.ones(1), is_new=is_new, embedding=np.zeros((5, 2)), k=3, item_prior=prior)
    scored = NewItemBoost(0.6, score="evaluator").bonus(request)
    # ranks from the worst: item 1 -> 0, item 3 -> 1, item 2 -> 2; bonus 2 * 0.6 * (r + 0.5) / 3
    assert scored == pytest.approx([0.0, 0.2, 1.0, 0.6, 0.6])
    assert NewItemBoost(0.6).bonus(request) == pytest.approx([0.0, 0.6, 0.6, 0.6, 0.6])
    assert NewItemBoost(0.6, score="evaluator").rerank(request).tolist() == [[2, 3, 4]]
    with pytest.raises(ValueError, match="score must be age or evaluator"):
        NewItemBoost(0.6, score="recency")


EVALUATED = ["market.n_users=600", "market.n_items=150", "market.n_providers=15", "market.new_items_per_round=6",
             "market.new_users_per_round=4", "agents.users.activity=0.3", "run.progress=false", "run.eval_users=32",
             "policy.name=popularity", "platform.reranker=new-item-boost", "platform.boost_score=evaluator",
             "platform.evaluator.min_impressions=3", "platform.evaluator.horizon=4", "platform.evaluator.train_every=4",
             "platform.evaluator.epochs=2"]


def _rows(market, rounds):
    for _ in range(rounds):
        market.step()
    return market.rows


def test_the_market_with_the_evaluator_reports_held_out_figures_and_resumes_exactly():
    from agorasim.env.market import Market

    config = build_config({}, EVALUATED)
    market = Market(config)
    rows = _rows(market, 12)
    # after round 3 no window has closed (items born at 1 close after round 4); the fit after
    # round 7 is the first, so only the one after round 11 has a model to hold items out against
    assert market.evaluator is not None and market.evaluator.fits == 2
    fitted = [r["round"] for r in rows if np.isfinite(r["evaluator/n"])]
    assert fitted == [11]
    assert all(math.isnan(r["evaluator/spearman"]) for r in rows if r["round"] != 11)
    assert -1 <= rows[11]["evaluator/spearman"] <= 1 and rows[11]["evaluator/n"] >= 3
    resumed = checkpoint.loads(checkpoint.dumps(market))  # through the checkpoint's allow-list
    straight = Market(config)
    a = _rows(straight, 18)
    b = _rows(resumed, 6)
    assert json.dumps(a) == json.dumps(b)  # a resumed run equals a straight one, evaluator included
    ages = build_config({}, EVALUATED[:-5] + ["platform.boost_score=age"])
    assert Market(ages).evaluator is None and "evaluator/n" not in _rows(Market(ages), 1)[0]


@pytest.mark.parametrize("sets, message", [
    (["platform.evaluator.hidden=33"], "config platform.evaluator: hidden 33 is not a multiple of heads 2"),
    (["platform.boost_score=recency"], "config platform.boost_score: must be one of 'age' or 'evaluator'"),
    (["platform.evaluator.batch_size=1"], "config platform.evaluator.batch_size: Input should be greater than or "
                                          "equal to 2"),
])
def test_bad_evaluator_settings_are_one_line(sets, message):
    with pytest.raises(UserInputError) as caught:
        build_config({}, sets)
    assert str(caught.value).startswith(message)
