"""MGFRec multi-round grounding: the describe-ground-critique subgraph, the slate it builds, and
the market with the ``ground`` node wired in."""

import hashlib
import json
import re

import numpy as np
import pytest

from agorasim.agents import grounding
from agorasim.agents.backends import is_llm_user
from agorasim.agents.engines.base import ChatResponse, Engine
from agorasim.agents.engines.fake import ITEM_LINE, FakeEngine, fake_answer
from agorasim.agents.grounding import Grounder, append_unpromoted, is_grounded_user, place_on_top
from agorasim.agents.items import Promotions
from agorasim.config import build_config
from agorasim.env.market import Market
from agorasim.errors import UserInputError
from agorasim.run import checkpoint
from agorasim.scenarios import load_scenario

PLAIN_NODES = ["__start__", "world", "retrieve", "recommend", "promote", "rerank", "respond", "log", "learn",
               "users", "ledger", "providers", "measure", "empty_round", "__end__"]


def bag_of_words(texts, cache=False):
    """Deterministic stand-in for MiniLM: hashed bag of words, unit rows (a text matches a title
    best when they share words)."""
    out = np.zeros((len(texts), 64), np.float32)
    for n, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
            out[n, h % 64] += 1.0 if h >> 31 else -1.0
        out[n, 0] += 1e-3  # never an all-zero row
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def fake_embedder(monkeypatch):
    monkeypatch.setattr(grounding, "embed_texts", bag_of_words)


@pytest.fixture
def real_cache(tmp_path_factory, monkeypatch):
    """One embedding cache for this module's real-embedder tests (titles embedded once)."""
    monkeypatch.setenv("AGORASIM_CACHE", str(tmp_path_factory.getbasetemp() / "grounding-cache"))


def grounding_market(overrides, *extra):
    return Market(build_config(load_scenario("cold-start"), overrides + [
        "agents.users.backend=fake", "policy.name=popularity", "agents.grounding.enabled=true", *extra]))


class Script:
    """A scripted fake engine's answers: every critique clicks the first grounded item and rates
    every item ``rating``; descriptions as the default fake. Records the prompts it saw."""

    def __init__(self, rating):
        self.rating = rating
        self.describe, self.critique = [], []

    def __call__(self, request):
        prompt = request.messages[-1].content
        if "Items shown:" in prompt:
            self.critique.append(prompt)
            ids = [int(m.group(1)) for m in ITEM_LINE.finditer(prompt)]
            return json.dumps([{"item_id": i, "click": n == 0, "rating": self.rating, "reason": "so so"}
                               for n, i in enumerate(ids)])
        self.describe.append(prompt)
        return fake_answer(request)


def loop_users(market, n=12):
    return np.flatnonzero(market.world.population.view("active"))[:n]


# -- pure helpers --------------------------------------------------------------------------------
def test_place_on_top_keeps_length_order_and_drops_duplicates():
    top = np.array([[5, 2, -1], [-1, -1, -1], [7, 8, 9]])
    slates = np.array([[1, 2, 3, -1], [4, 5, 6, 7], [9, 1, 2, 3]])
    out = place_on_top(top, slates)
    np.testing.assert_array_equal(out, [[5, 2, 1, 3], [4, 5, 6, 7], [7, 8, 9, 1]])


def test_append_unpromoted_gives_grounded_items_an_empty_promotion():
    ranked = np.array([[10, 11, 12]])
    promotions = Promotions(claimed=np.array([[3, 1, 0]]), unsupported=np.array([[1, 0, 0]]),
                            hype=np.array([[0.5, 0.2, 0.0]]), accuracy=np.array([[0.5, 1.0, 1.0]]))
    slates = np.array([[99, 11, 10]])
    ranked2, promotions2 = append_unpromoted(ranked, promotions, slates)
    np.testing.assert_array_equal(ranked2, [[10, 11, 12, 99, -1, -1]])
    columns = (slates[:, :, None] == ranked2[:, None, :]).argmax(2)
    shown = promotions2.take(columns)
    np.testing.assert_array_equal(shown.claimed, [[0, 1, 3]])
    np.testing.assert_allclose(shown.hype, [[0.0, 0.2, 0.5]])
    np.testing.assert_allclose(shown.accuracy, [[1.0, 1.0, 0.5]])
    same = append_unpromoted(ranked, promotions, np.array([[12, 10, -1]]))
    assert same[0] is ranked and same[1] is promotions


def test_best_puts_clicks_first_then_ratings():
    pool = np.array([[4, 5, 6, 7, -1]])
    clicked = np.array([[False, False, True, False, False]])
    rating = np.array([[3.0, np.nan, 2.0, 8.0, np.nan]])
    np.testing.assert_array_equal(Grounder.best(pool, clicked, rating, 4), [[6, 7, 4, 5]])
    np.testing.assert_array_equal(Grounder.best(pool[:, :1], clicked[:, :1], rating[:, :1], 3), [[4, -1, -1]])


def test_grounded_users_are_a_share_of_llm_users_independent_of_the_llm_hash():
    users = np.arange(20_000)
    assert not is_grounded_user(users, 0.0).any() and is_grounded_user(users, 1.0).all()
    grounded, llm = is_grounded_user(users, 0.3), is_llm_user(users, 0.5)
    assert grounded.mean() == pytest.approx(0.3, abs=0.02)
    assert grounded[llm].mean() == pytest.approx(0.3, abs=0.02)  # not a nested prefix of the llm users


# -- the subgraph --------------------------------------------------------------------------------
def test_loop_stops_after_one_round_when_everyone_is_satisfied(small_overrides, fake_embedder):
    market = grounding_market(small_overrides, "agents.grounding.rounds=3", "agents.grounding.accept_rating=7")
    script = Script(rating=9)
    market.grounder.engine = FakeEngine(script=script)
    users = loop_users(market)
    state = market.grounder.run(market.world, users)
    assert state["iteration"] == 1
    assert state["satisfied"].all() and (state["iterations"] == 1).all()
    assert len(script.describe) == len(users) and len(script.critique) == len(users)
    metrics, timings = market.grounder.flush()
    assert metrics["llm/grounding/calls"] == 2 * len(users) and "llm/grounding/latency_s" in timings


def test_loop_runs_r_rounds_while_unsatisfied_and_feeds_critique_back(small_overrides, fake_embedder):
    per_round, rounds = 4, 3
    market = grounding_market(small_overrides, f"agents.grounding.rounds={rounds}",
                              f"agents.grounding.per_round={per_round}", "agents.grounding.accept_rating=7")
    script = Script(rating=3)
    market.grounder.engine = FakeEngine(script=script)
    users = loop_users(market)
    state = market.grounder.run(market.world, users)
    assert state["iteration"] == rounds and (state["iterations"] == rounds).all()
    assert not state["satisfied"].any()
    assert len(script.describe) == rounds * len(users) == len(script.critique)
    # every round grounds per_round new, real, alive items for every user
    pool = state["pool"]
    assert pool.shape == (len(users), rounds * per_round) and (pool >= 0).all()
    assert all(len(set(row)) == len(row) for row in pool)
    assert market.world.catalogue.alive[pool].all()
    # the critique of earlier rounds reaches later descriptions
    assert all("They were shown and said:" not in p for p in script.describe[: len(users)])
    later = script.describe[len(users):]
    assert later and all("They were shown and said: Item " in p and "rated 3" in p for p in later)
    assert np.isfinite(state["rating"]).all() and state["clicked"][:, ::per_round].all()


def test_satisfied_users_leave_the_batch(small_overrides, fake_embedder):
    """With the hash-driven fake engine some users are satisfied early; only the others go on."""
    market = grounding_market(small_overrides, "agents.grounding.rounds=3", "agents.grounding.accept_rating=5")
    calls = []
    market.grounder.engine = FakeEngine(script=lambda r: calls.append(r) or fake_answer(r))
    users = loop_users(market, 40)
    state = market.grounder.run(market.world, users)
    iterations, satisfied = state["iterations"], state["satisfied"]
    assert satisfied.any() and not satisfied.all()
    assert (iterations[~satisfied] == 3).all() and (iterations >= 1).all() and (iterations[satisfied] < 3).any()
    describes = [r for r in calls if "Describe" in r.messages[-1].content]
    assert len(describes) == iterations.sum()


def test_description_falls_back_to_liked_titles_when_the_call_fails(small_overrides, fake_embedder):
    class DescribeDown(Engine):
        def generate(self, requests):
            return [ChatResponse(error="server down") if "Describe" in r.messages[-1].content
                    else ChatResponse(text=fake_answer(r)) for r in requests]

    market = grounding_market(small_overrides, "agents.grounding.rounds=1")
    market.grounder.engine = DescribeDown()
    users = loop_users(market, 5)
    state = market.grounder.run(market.world, users)
    metrics, _ = market.grounder.flush()
    assert metrics["grounding/fallbacks"] == len(users) and metrics["llm/grounding/errors"] == len(users)
    assert state["descriptions"] == state["fallback"]
    # a liked title matches itself best: the first liked item is grounded first
    titles = market.world.catalogue.titles
    for first, wanted in zip(state["pool"][:, 0], state["fallback"]):
        assert titles[first] in wanted


def test_grounded_items_go_on_top_of_the_slate(small_overrides, fake_embedder):
    k = 10
    market = grounding_market(small_overrides, "agents.grounding.share=1", "agents.grounding.per_round=3")
    market.grounder.engine = FakeEngine(script=Script(rating=9))
    users = loop_users(market, 8)
    state = market.grounder.run(market.world, users)
    top = Grounder.best(state["pool"], state["clicked"], state["rating"], 3)
    alive = market.world.catalogue.alive_ids()
    slates = np.stack([np.setdiff1d(alive, top[b])[b: b + k] for b in range(len(users))])
    slates[0, 4] = top[0, 1]  # the platform already shows a grounded item: not shown twice
    slates[1, 7:] = -1  # a short slate is filled up
    out = market.grounder.ground(market.world, users, slates)
    assert out.shape == slates.shape
    np.testing.assert_array_equal(out[:, :3], top)
    assert market.world.catalogue.alive[out[out >= 0]].all()
    for b in range(len(users)):
        real = out[b][out[b] >= 0]
        assert len(set(real)) == len(real)
        rest = [x for x in slates[b] if x >= 0 and x not in top[b]]
        np.testing.assert_array_equal(out[b, 3: 3 + len(rest)], rest[: k - 3])
    assert (out[1] >= 0).all()
    metrics, _ = market.grounder.flush()
    assert metrics["grounding/users"] == len(users) and metrics["grounding/satisfied"] == 1.0
    assert metrics["grounding/iterations"] == 1.0 and metrics["grounding/placed"] == 3.0


def test_nobody_selected_leaves_the_slates_alone(small_overrides, fake_embedder):
    market = grounding_market(small_overrides, "agents.grounding.share=0")
    slates = np.arange(20).reshape(2, 10)
    assert market.grounder.ground(market.world, np.array([3, 4]), slates) is slates
    metrics, _ = market.grounder.flush()
    assert metrics["grounding/users"] == 0 and np.isnan(metrics["grounding/satisfied"])


# -- the market ----------------------------------------------------------------------------------
def test_grounding_needs_a_language_model_backend(small_overrides):
    with pytest.raises(UserInputError, match="agents.grounding needs a language-model user backend"):
        Market(build_config(load_scenario("cold-start"), small_overrides + ["agents.grounding.enabled=true"]))


def test_round_graph_has_a_ground_node_only_when_enabled(small_overrides):
    plain = Market(build_config(load_scenario("cold-start"), small_overrides + ["agents.users.backend=fake"]))
    assert plain.grounder is None and list(plain.graph.get_graph().nodes) == PLAIN_NODES
    grounded = grounding_market(small_overrides).graph.get_graph()
    edges = {(e.source, e.target) for e in grounded.edges}
    assert {("rerank", "ground"), ("ground", "respond")} <= edges and ("rerank", "respond") not in edges


def run_market(market, rounds, seen=None):
    for _ in range(rounds):
        market.step()
        if seen is not None:
            seen.append((market.last_round["slates"].copy(), market.last_round["alive"].copy()))
    return market.rows


def check_rows(rows, seen, k):
    for row in rows:
        assert {"grounding/users", "grounding/iterations", "grounding/satisfied", "llm/grounding/calls"} <= set(row)
    assert sum(r["grounding/users"] for r in rows) > 0
    assert all(0 <= r["grounding/satisfied"] <= 1 for r in rows if r["grounding/users"])
    assert len(seen) == len(rows)
    for slates, alive in seen:
        assert slates.shape[1] == k and np.isin(slates[slates >= 0], alive).all()
        for row in slates:
            real = row[row >= 0]
            assert len(set(real)) == len(real)


def test_market_with_grounding_is_reproducible(small_overrides, fake_embedder):
    extra = ["agents.grounding.share=0.5", "agents.grounding.rounds=2"]
    seen = []
    a = run_market(grounding_market(small_overrides, *extra), 4, seen)
    b = run_market(grounding_market(small_overrides, *extra), 4)
    check_rows(a, seen, 10)
    assert json.dumps(a) == json.dumps(b)


def test_pickled_market_with_grounding_continues_identically(small_overrides, fake_embedder):
    extra = ["agents.grounding.share=0.5"]
    straight = run_market(grounding_market(small_overrides, *extra), 4)
    market = grounding_market(small_overrides, *extra)
    run_market(market, 2)
    resumed = run_market(checkpoint.loads(checkpoint.dumps(market)), 2)
    assert json.dumps(resumed) == json.dumps(straight)


# -- with the real embedder (all-MiniLM-L6-v2) ----------------------------------------------------
@pytest.mark.slow  # embeds the catalogue titles with MiniLM on a cold cache (~15 s on 2 CPUs)
def test_real_embedder_grounds_a_title_to_its_item(small_overrides, real_cache):
    market = grounding_market(small_overrides, "agents.grounding.rounds=1")
    cat = market.world.catalogue
    counts = {t: cat.titles.count(t) for t in cat.titles}
    users = loop_users(market, 4)
    wanted = [i for i in cat.alive_ids() if counts[cat.titles[i]] == 1][: len(users)]
    by_user = dict(zip(users.tolist(), wanted))

    def script(request):
        prompt = request.messages[-1].content
        if "Describe" in prompt:  # the n-th describe request of the batch is user n's
            asked.append(prompt)
            return cat.titles[wanted[len(asked) - 1]]
        return fake_answer(request)

    asked = []
    market.grounder.engine = FakeEngine(script=script)
    state = market.grounder.run(market.world, users)
    assert [by_user[int(u)] for u in users] == state["pool"][:, 0].tolist()


@pytest.mark.slow  # real MiniLM embeddings of titles and descriptions
def test_market_with_grounding_and_real_embedder_is_reproducible(small_overrides, real_cache):
    extra = ["agents.grounding.share=0.3", "run.rounds=2"]
    seen = []
    a = run_market(grounding_market(small_overrides, *extra), 2, seen)
    b = run_market(grounding_market(small_overrides, *extra), 2)
    check_rows(a, seen, 10)
    assert json.dumps(a) == json.dumps(b)
