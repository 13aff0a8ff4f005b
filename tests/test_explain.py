"""SELLER's explanations (platform/explain.py, ALGORITHMS.md section 8): the explainers, the users'
reaction, the utility-aware evaluation, and the paper's check that text quality cannot tell a
persuasive-but-false explainer from an honest one while the decisions can."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from agorasim.agents import prompts
from agorasim.agents.backends import SlateRequest
from agorasim.config import ExplanationConfig, build_config
from agorasim.errors import UserInputError
from agorasim.metrics.round import explanation_row
from agorasim.platform.explain import (
    ExplainRequest,
    LearnedExplainer,
    TemplateExplainer,
    aspect_names,
    aspects_in_text,
    render,
    top_aspects,
)
from agorasim.run import checkpoint

SMALL = ["market.n_users=300", "market.n_items=200", "market.n_providers=20", "market.dim=8"]


def _market(sets):
    from agorasim.env.market import Market

    return Market(build_config({}, SMALL + sets))


def _rows(market, rounds):
    for _ in range(rounds):
        market.step()
    return market.rows


# -- hand values ---------------------------------------------------------------------------------
def test_top_aspects_profile_and_text_by_hand():
    score = np.array([[[0.1, 0.9, 0.5, 0.9]]])
    assert top_aspects(score, np.array([[[True, True, True, True]]]), 2).tolist() == [[[1, 3]]]  # tie: lower index
    assert top_aspects(score, np.array([[[True, False, False, False]]]), 2).tolist() == [[[0, -1]]]
    names = aspect_names(34)
    assert names[0] == "sturdy" and names[33] == "aspect 33" and len(set(names)) == 34
    assert aspects_in_text("Sleek, and sturdy; not sturdier.", names) == [names.index("sleek"), 0]
    assert aspects_in_text("aspect 33 matters", names) == [33]  # "aspect 3" is not read into it
    assert render(np.array([0, -1]), names) == "Picked for you: it is sturdy."
    assert render(np.array([-1, -1]), names) == ""


def test_reasons_reaction_and_claim_accuracy_by_hand():
    market = _market(["market.dim=4", "platform.explain=template"])
    w = market.world
    w.population.taste[0] = [1.0, 0.5, -0.2, 0.0]
    w.catalogue.embedding[5] = [0.6, 0.3, 0.5, 0.5]  # lists every aspect (>= 0.2)
    w.catalogue.embedding[6] = [0.1, 0.8, 0.3, -0.5]  # lists aspects 1 and 2
    users, slates = np.array([0]), np.array([[5, 6, -1]])
    listed = market.listed_aspects(slates)
    assert listed.tolist() == [[[True] * 4, [False, True, True, False], [False] * 4]]
    # contributions theta * phi: item 5 [.6, .15, -.1, 0]; item 6 [.1, .4, -.06, 0]
    reasons = market.users.reasons(w, users, slates, listed, 2, "attributes")
    assert reasons.tolist() == [[[0, 1], [1, -1], [-1, -1]]]  # only listed aspects that add to the match
    product = market.users.reasons(w, users, slates, listed, 2, "product")
    assert product.tolist() == [[[0, 1], [1, 0], [-1, -1]]]
    named = np.array([[[0, 2], [0, 1], [-1, -1]]])
    reaction = market.users.react(w, users, slates, named, listed, reasons)
    # liking = max(theta, 0) / max theta = [1, .5, 0, 0]
    assert np.allclose(reaction.align, [[0.5, 0.75, 0.0]])
    assert np.allclose(reaction.misrep, [[0.0, 0.5, 0.0]])  # item 6 does not list aspect 0
    beta, gamma = market.config.agents.users.explanation_pull, market.config.agents.users.misrep_penalty
    assert (beta, gamma) == (1.0, 0.5)
    assert np.allclose(reaction.pull, [[0.5, 0.75 - 0.25, 0.0]])
    # trust's target: 2 promotion claims (half true) and 2 aspects (half true) -> 2 of 4
    accuracy = reaction.accuracy(np.array([[2.0, 2.0, 0.0]]), np.array([[0.5, 0.5, 1.0]]))
    assert np.allclose(accuracy, [[(1 + 2) / 4, (1 + 1) / 4, 1.0]])


def test_click_lift_is_the_logit_difference_by_hand():
    market = _market(["platform.explain=template"])
    cfg = market.config.agents.users
    u, trust, pull = 2.0, 0.6, 0.5
    request = SlateRequest(users=np.array([0]), slates=np.array([[3]]), true_utility=np.array([[u]]),
                           hype=np.zeros((1, 1)), trust=np.array([trust]), round=0, explain_pull=np.array([[pull]]))
    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sigma((u + trust * pull - cfg.outside_utility) / cfg.temperature) - sigma(
        (u - cfg.outside_utility) / cfg.temperature)
    assert market.users.click_lift(request) == pytest.approx([expected])
    assert expected > 0.1


def test_explanation_row_by_hand():
    named = np.array([[[0, 1], [2, -1], [-1, -1]]])
    reasons = np.array([[[1, 3], [2, -1], [4, 5]]])  # the unexplained slot's reasons do not count
    row = explanation_row(named, reasons, np.array([[0.5, 0.0, 0.0]]), np.array([[0.2, 0.4, 0.0]]),
                          np.array([0.1, np.nan]))
    assert row["explain/precision"] == pytest.approx(2 / 3) and row["explain/recall"] == pytest.approx(2 / 3)
    assert row["explain/f1"] == pytest.approx(2 / 3)
    assert row["explain/misrep"] == pytest.approx(0.25) and row["explain/align"] == pytest.approx(0.3)
    assert row["explain/click_lift"] == pytest.approx(0.1)  # NaN rows (language-model users) left out
    none = explanation_row(np.full((1, 2, 2), -1), np.full((1, 2, 2), -1), np.zeros((1, 2)), np.zeros((1, 2)), None)
    assert all(math.isnan(v) for v in none.values())


# -- the explainers ----------------------------------------------------------------------------
def _request(profile, listed, slates=None):
    b, k, d = listed.shape
    return ExplainRequest(users=np.arange(b), slates=np.zeros((b, k), np.int64) if slates is None else slates,
                          listed=listed, profile=profile, history=np.full((b, 3), -1), content=np.zeros((1, 2)),
                          titles=["x"], writes=np.ones(b, bool), round=0)


def test_template_grounded_names_listed_aspects_and_free_names_what_the_user_likes():
    profile = np.array([[0.6, 0.5, 0.1, -0.6], [0.0, 0.0, 0.0, 0.0]])  # the platform's mean content of the history
    listed = np.array([[[False, True, True, True]], [[False, True, True, False]]])
    rng = np.random.default_rng(0)
    grounded = TemplateExplainer(ExplanationConfig(), 4).explain(_request(profile, listed), rng)
    assert grounded.aspects.tolist() == [[[1, 2]], [[1, 2]]]
    assert grounded.text[0, 0] == "Picked for you: it is stylish and precise."
    free = TemplateExplainer(ExplanationConfig(mode="free"), 4).explain(_request(profile, listed), rng)
    # the profile's favourites, listed or not; a user without history gets the item's own aspects
    assert free.aspects.tolist() == [[[0, 1]], [[1, 2]]]
    empty = TemplateExplainer(ExplanationConfig(), 4).explain(_request(profile, listed, np.full((2, 1), -1)), rng)
    assert (empty.aspects == -1).all() and (empty.text == "").all()


def test_the_learned_explainer_learns_the_reasons_and_grounded_decoding_never_misrepresents():
    cfg = ExplanationConfig(steps=60, batch_size=64, lr=1e-2)
    dim, n = 6, 40
    rng = np.random.default_rng(0)
    content = rng.normal(size=(n, 5)).astype(np.float32)
    listed = rng.random((n, dim)) < 0.5
    listed[:, 0] = True
    # each item's reasons: its first two listed aspects (a rule the model can learn from item inputs)
    reasons = np.array([np.r_[np.flatnonzero(row)[:2], [-1] * 2][:2] for row in listed])
    items = np.arange(n).repeat(5)
    history = rng.integers(-1, n, (len(items), 4))
    explainer = LearnedExplainer(cfg, dim, 5, seed=0)
    before = explainer.decode(history[:n], np.arange(n), content, listed)
    first = explainer.learn(history, items, reasons[items], content, listed[items], 0, np.random.default_rng(1))
    for r in range(1, 6):
        last = explainer.learn(history[:0], items[:0], reasons[:0], content, listed[:0], r, np.random.default_rng(r))
    after = explainer.decode(history[:n], np.arange(n), content, listed)
    assert last["explain/loss"] < 0.5 * first["explain/loss"] and last["explain/steps"] == 6 * cfg.steps
    hit = lambda out: np.mean([len(set(o[o >= 0]) & set(r[r >= 0])) / 2 for o, r in zip(out, reasons)])  # noqa: E731
    assert hit(after) > hit(before) + 0.2 and hit(after) > 0.8
    assert all(listed[i, a] for i, row in enumerate(after) for a in row if a >= 0)  # grounded: listed only
    assert len(explainer.buffer["items"]) == len(items)


# -- in the market -------------------------------------------------------------------------------
def test_a_persuasive_explainer_raises_clicks_costs_trust_and_text_f1_hides_most_of_it():
    """The paper's check on a small world, 1 seed, 40 rounds (the explanations scenario has 3 seeds):
    against no explanation, the persuasive (free) template raises clicks; against the honest one it
    misrepresents a share of what it names and costs trust, while its text F1 against the users'
    true reasons falls by much less than the share it gets wrong."""
    base = ["market.n_users=2000", "market.n_items=1000", "market.n_providers=100", "market.dim=32"]
    keys = ("users/click_rate", "users/trust", "explain/f1", "explain/misrep", "explain/click_lift")

    def run(sets):
        rows = _rows(_market(base + sets), 40)[10:]
        return {k: float(np.mean([r.get(k, np.nan) for r in rows])) for k in keys}

    none, honest = run([]), run(["platform.explain=template"])
    persuasive = run(["platform.explain=template", "platform.explanation.mode=free"])
    assert persuasive["users/click_rate"] > none["users/click_rate"] + 0.05 and persuasive["explain/click_lift"] > 0.03
    assert honest["explain/misrep"] == 0 and persuasive["explain/misrep"] > 0.15
    assert persuasive["users/trust"] < honest["users/trust"] - 0.01
    assert 0 < honest["explain/f1"] - persuasive["explain/f1"] < 0.5 * persuasive["explain/misrep"]
    assert math.isnan(none["explain/f1"])


def test_the_round_graph_has_the_explanation_phases_only_when_asked():
    assert "explain" not in _market([]).graph.get_graph().nodes
    template = _market(["platform.explain=template"]).graph.get_graph().nodes
    assert "explain" in template and "explainer" not in template
    learned = _market(["platform.explain=learned"]).graph.get_graph().nodes
    assert "explain" in learned and "explainer" in learned
    plain = _rows(_market([]), 2)
    assert not any(k.startswith("explain/") for k in plain[-1])


def test_the_learned_explainer_is_deterministic_and_resumes_exactly():
    sets = ["platform.explain=learned", "platform.explanation.steps=3"]
    market = _market(sets)
    _rows(market, 4)
    assert market.rows[-1]["explain/steps"] == 12 and np.isfinite(market.rows[-1]["explain/f1"])
    resumed = checkpoint.loads(checkpoint.dumps(market))
    straight = _rows(_market(sets), 7)
    assert json.dumps(straight) == json.dumps(_rows(resumed, 3))


def test_llm_explainer_reads_its_aspects_from_the_text_memoises_and_replays(tmp_path):
    store = tmp_path / "cache.jsonl"
    sets = ["platform.explain=llm", "platform.explanation.writer=fake", "agents.cache.mode=record",
            f"agents.cache.path={store}"]
    market = _market(sets)
    rows = _rows(market, 3)
    assert rows[0]["llm/explain/calls"] > 0 and rows[-1]["explain/misrep"] == 0  # grounded: listed aspects only
    assert np.isfinite(rows[-1]["explain/f1"])
    calls = sum(r["llm/explain/calls"] for r in rows)
    memo = len(market.explainer.memo)
    assert calls == memo  # one call per distinct (item, liked aspects, last purchase)
    replay = _rows(_market(sets[:2] + ["agents.cache.mode=replay", f"agents.cache.path={store}"]), 3)
    assert json.dumps(replay) == json.dumps(rows)  # the same figures from the store, no model
    free = _rows(_market(sets[:2] + ["platform.explanation.mode=free"]), 6)
    assert max(r["explain/misrep"] for r in free) > 0  # told it may, the fake writer names liked aspects


def test_language_model_users_read_the_explanation():
    messages = prompts.user_messages("You like tools.", [], [(3, "Drill", "Durable.", "Picked for you: it is sturdy.")],
                                     defence=True)
    assert "[3] Drill <promo>Durable.</promo> <why>Picked for you: it is sturdy.</why>" in messages[-1].content
    plain = prompts.user_messages("You like tools.", [], [(3, "Drill", "", "It is sturdy.")], defence=False)
    assert "[3] Drill Platform says: It is sturdy." in plain[-1].content
    market = _market(["agents.users.backend=fake", "platform.explain=template"])
    rows = _rows(market, 2)
    assert rows[-1]["llm/users/calls"] > 0 and math.isnan(rows[-1]["explain/click_lift"])  # no counterfactual


@pytest.mark.parametrize("sets, message", [
    (["platform.explain=persuasive"], "config platform.explain: must be one of"),
    (["platform.explanation.hidden=33"], "config platform.explanation: hidden 33 is not a multiple of heads 2"),
    (["platform.explanation.n_aspects=0"], "config platform.explanation.n_aspects: Input should be greater"),
    (["agents.users.misrep_penalty=-1"], "config agents.users.misrep_penalty: Input should be greater"),
])
def test_bad_explanation_settings_are_one_line(sets, message):
    with pytest.raises(UserInputError) as caught:
        build_config({}, sets)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_more_aspects_than_dimensions_is_refused_before_the_run(tmp_path):
    from agorasim.run.preflight import check_config

    with pytest.raises(UserInputError, match="platform.explanation.n_aspects: an explanation names aspects of the "
                                             "market.dim=4 dimensions, got 5"):
        check_config(build_config({}, ["market.dim=4", "platform.explain=template", "platform.explanation.n_aspects=5"]))
    torch.manual_seed(0)  # the learned explainer never touches torch's global generator
    state = torch.random.get_rng_state()
    _market(["platform.explain=learned"])
    assert torch.equal(state, torch.random.get_rng_state())


def test_events_record_the_explanation_of_every_judgement(tmp_path):
    from agorasim.cli import main

    out = tmp_path / "run"
    code = main(["run", "--scenario", "cold-start", "--out", str(out), "--set", "run.rounds=2", *[
        f"--set={s}" for s in SMALL + ["platform.explain=template", "run.events_users=3", "run.progress=false"]]])
    assert code == 0
    (folder,) = [p for p in out.rglob("events.jsonl")]
    first = json.loads(folder.read_text().splitlines()[0])
    names = set(aspect_names(8))
    judged = [j for j in first["judgements"]]
    assert judged and all(j["explanation"] and set(j["explanation"]) <= names for j in judged)
    header = (folder.parent / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"explain/f1", "explain/click_lift", "explain/misrep"} <= set(header)
