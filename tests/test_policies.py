"""Recommender policies: the shared contract, hand examples and "training learns" checks."""

import numpy as np
import pytest
import torch

from agorasim.env.conformance import add_random_items, check_policy
from agorasim.env.state import Catalogue, InteractionLog
from agorasim.policy import POLICIES, BPRPolicy, PopularityPolicy, RecommendRequest, SASRecPolicy, make_policy
from agorasim.policy.baselines import valid_candidates
from agorasim.policy.observation import Observation
from agorasim.policy.sasrec import next_item_windows


def make_catalogue(n_items: int) -> Catalogue:
    catalogue = Catalogue.empty(dim=4, depth=1)
    add_random_items(catalogue, n_items, np.random.default_rng(0))
    return catalogue


def click_log(users, items) -> InteractionLog:
    """A log with one click per row, all in round 0, in the given (time) order."""
    users, items = np.asarray(users), np.asarray(items)
    log = InteractionLog()
    log.append(round=np.zeros(len(users), np.int64), user=users, item=items,
               position=np.zeros(len(users), np.int64), click=np.ones(len(users), np.int8),
               rating=np.full(len(users), 4.0, np.float32))
    return log


def request(users, candidates, alive, k, history=None) -> RecommendRequest:
    users = np.asarray(users)
    if history is None:
        history = np.full((len(users), 1), -1)
    return RecommendRequest(users=users, history=np.asarray(history), candidates=np.asarray(candidates),
                            alive=np.asarray(alive), k=k, round=0)


# ---------------------------------------------------------------- contract, registry, helpers

@pytest.mark.parametrize("name", sorted(POLICIES))
def test_conformance(name):
    check_policy(make_policy(name))


@pytest.mark.parametrize("name", ["popularity", "bpr", "sasrec"])
def test_conformance_refitting_every_round(name):
    # several refits with the catalogue growing and shrinking in between: warm start and growth
    check_policy(make_policy(name, refit_every=1), rounds=4, seed=3)


class _ClockMetrics(PopularityPolicy):
    """Reports wall-clock time as a metric: breaks run-to-run determinism."""

    def fit(self, log, catalogue, rng):
        import time
        super().fit(log, catalogue, rng)
        return {"train/seconds": time.perf_counter()}


class _ForcesItemZero(PopularityPolicy):
    """Puts item 0 first in every row, whether or not it is a candidate (or alive)."""

    def recommend(self, request, rng):
        items, scores = super().recommend(request, rng)
        return np.where(items == items[:, :1], 0, items), scores


class _GlobalTorchRng(PopularityPolicy):
    def fit(self, log, catalogue, rng):
        torch.rand(1)
        return super().fit(log, catalogue, rng)


@pytest.mark.parametrize("broken, message", [
    (_ClockMetrics, "metrics differ"), (_ForcesItemZero, "dead item|repeats|not in its candidates"),
    (_GlobalTorchRng, "global RNG")])
def test_conformance_rejects_broken_policies(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_policy(broken(refit_every=2))


def test_make_policy_explains_bad_input():
    with pytest.raises(ValueError, match="allowed: bpr, generative, grc, mindrec, popularity, random, sasrec"):
        make_policy("nope")
    with pytest.raises(ValueError, match="unknown parameter.*colour"):
        make_policy("bpr", colour=3)
    with pytest.raises(ValueError, match="refit_every"):
        make_policy("popularity", refit_every=0)
    assert make_policy("bpr", dim=8).dim == 8


def test_valid_candidates_drops_dead_unknown_and_repeated_ids():
    alive = np.array([True, False, True, True])
    candidates = np.array([[3, -1, 3, 9, 1, 0],
                           [0, 2, 3, 2, 0, -1]])
    np.testing.assert_array_equal(valid_candidates(candidates, alive),
                                  [[3, -1, -1, -1, -1, 0],
                                   [0, 2, 3, -1, -1, -1]])


def test_refit_happens_after_every_refit_every_th_round():
    catalogue, log = make_catalogue(3), click_log([0], [1])
    policy = PopularityPolicy(refit_every=3)
    refits = []
    for round in range(7):
        before = policy.counts
        policy.update(Observation.of(log, catalogue, round), np.random.default_rng(0))
        refits.append(policy.counts is not before)
    assert refits == [False, False, True, False, False, True, False]


# ---------------------------------------------------------------- popularity

def test_popularity_ranks_by_counts_at_the_last_refit():
    catalogue = make_catalogue(4)
    catalogue.interactions[:4] = [5, 1, 3, 0]
    policy, rng, log = PopularityPolicy(refit_every=2), np.random.default_rng(0), InteractionLog()
    req = request([0], [[0, 1, 2, 3]], catalogue.view("alive"), k=4)
    policy.update(Observation.of(log, catalogue, 1), rng)  # (1 + 1) % 2 == 0: refit
    items, scores = policy.recommend(req, rng)
    np.testing.assert_array_equal(items, [[0, 2, 1, 3]])
    np.testing.assert_array_equal(scores, [[5, 3, 1, 0]])

    catalogue.interactions[:4] = [0, 10, 0, 20]  # the world moves on ...
    policy.update(Observation.of(log, catalogue, 2), rng)  # ... but round 2 is no refit round
    np.testing.assert_array_equal(policy.recommend(req, rng)[0], [[0, 2, 1, 3]])

    policy.update(Observation.of(log, catalogue, 3), rng)  # refit: ties (items 0 and 2) keep candidate order
    np.testing.assert_array_equal(policy.recommend(req, rng)[0], [[3, 1, 0, 2]])


def test_popularity_scores_items_newer_than_the_refit_zero():
    catalogue = make_catalogue(2)
    catalogue.interactions[:2] = [2, 1]
    policy, rng = PopularityPolicy(refit_every=1), np.random.default_rng(0)
    policy.update(Observation.of(InteractionLog(), catalogue, 0), rng)
    new = add_random_items(catalogue, 1, rng)
    catalogue.interactions[new] = 100
    items, scores = policy.recommend(request([0], [[new[0], 1, 0]], catalogue.view("alive"), k=3), rng)
    np.testing.assert_array_equal(items, [[0, 1, new[0]]])
    np.testing.assert_array_equal(scores, [[2, 1, 0]])


# ---------------------------------------------------------------- BPR

def planted_clusters(seed=0, users_per_cluster=20, items_per_cluster=20, clicks_per_user=8):
    """Users 0..19 click only items 0..19, users 20..39 only items 20..39."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(2 * users_per_cluster):
        cluster = user // users_per_cluster
        own = rng.choice(items_per_cluster, size=clicks_per_user, replace=False) + cluster * items_per_cluster
        users += [user] * clicks_per_user
        items += list(own)
    order = rng.permutation(len(users))
    return np.array(users)[order], np.array(items)[order]


def test_bpr_separates_planted_clusters_and_its_loss_falls():
    users, items = planted_clusters()
    catalogue, log = make_catalogue(40), click_log(users, items)
    policy, rng = BPRPolicy(refit_every=1, batch_size=32, epochs=20), np.random.default_rng(0)
    first = policy.update(Observation.of(log, catalogue, 0), rng)["train/loss"]
    second = policy.update(Observation.of(log, catalogue, 1), rng)["train/loss"]
    assert second < first

    all_users = np.arange(40)
    scores = policy.score(all_users, np.full((40, 1), -1), np.tile(np.arange(40), (40, 1)))
    own = (all_users[:, None] // 20) == (np.arange(40)[None, :] // 20)
    # AUC per user: P(score of an own-cluster item > score of an other-cluster item)
    auc = [np.mean(s[o][:, None] > s[~o][None, :]) for s, o in zip(scores, own)]
    assert np.mean(auc) > 0.9


def test_bpr_unknown_users_score_by_bias_and_tables_grow_warm():
    users, items = planted_clusters(clicks_per_user=3)
    catalogue, log = make_catalogue(40), click_log(users, items)
    policy, rng = BPRPolicy(refit_every=1, epochs=2), np.random.default_rng(0)
    policy.update(Observation.of(log, catalogue, 0), rng)
    candidates = np.arange(40)[None]
    np.testing.assert_allclose(policy.score(np.array([999]), np.full((1, 1), -1), candidates),
                               policy.item_bias[None, :40], rtol=1e-6)

    known = policy.item_factors.copy()
    new = add_random_items(catalogue, 5, rng)
    assert np.all(policy.score(np.array([0]), np.full((1, 1), -1), new[None]) == 0)
    policy._grow(len(policy.user_factors) + 2, catalogue.n, rng)
    assert policy.item_factors.shape == (45, policy.dim) and len(policy.user_factors) == 42
    np.testing.assert_array_equal(policy.item_factors[:40], known)


# ---------------------------------------------------------------- SASRec

def test_next_item_windows_by_hand():
    users = np.array([0, 1, 0, 0, 1])
    items = np.array([10, 20, 11, 12, 21])
    x, y = next_item_windows(users, items, max_len=2)
    np.testing.assert_array_equal(x, [[10, 11], [-1, 20]])
    np.testing.assert_array_equal(y, [[11, 12], [-1, 21]])
    x, y = next_item_windows(users, items, max_len=1)  # user 0's newest pair comes first
    np.testing.assert_array_equal(x, [[11], [10], [20]])
    np.testing.assert_array_equal(y, [[12], [11], [21]])


def successor_log(n_items=30, n_users=120, length=12, seed=0):
    """Each user clicks a run i, i+1, i+2, ... (mod n_items) from a random start."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(n_items, size=n_users)
    items = (starts[:, None] + np.arange(length)) % n_items
    users = np.repeat(np.arange(n_users), length)
    return click_log(users, items.ravel())


def test_sasrec_learns_that_item_i_is_followed_by_i_plus_1():
    n_items, max_len = 30, 8
    catalogue, log = make_catalogue(n_items), successor_log(n_items)
    policy = SASRecPolicy(refit_every=1, max_len=max_len, epochs=25, batch_size=32, lr=5e-3)
    rng = np.random.default_rng(0)
    policy.update(Observation.of(log, catalogue, 0), rng)

    last = np.arange(n_items)
    history = (last[:, None] + np.arange(-4, 1)) % n_items  # 5 clicks ending at `last`
    history = np.pad(history, ((0, 0), (max_len - 5, 0)), constant_values=-1)
    candidates = np.tile(np.arange(n_items), (n_items, 1))
    items, _ = policy.recommend(request(last, candidates, catalogue.view("alive"), k=1, history=history), rng)
    assert np.mean(items[:, 0] == (last + 1) % n_items) >= 0.8


def test_sasrec_training_step_changes_every_parameter():
    catalogue, log = make_catalogue(30), successor_log(30, n_users=16, length=9)
    policy = SASRecPolicy(refit_every=1, max_len=8, epochs=1)
    policy.update(Observation.of(log, catalogue, 0), np.random.default_rng(0))  # builds the model
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    users, items, _ = log.clicks()
    inputs, targets = (torch.from_numpy(a) for a in next_item_windows(users, items, 8))
    optimizer = torch.optim.Adam(policy.model.parameters(), lr=1e-3)
    policy.train_step(inputs, targets, torch.arange(30), optimizer, torch.Generator().manual_seed(0))
    unchanged = [name for name, p in policy.model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged


def test_sasrec_empty_history_and_unknown_items_score_zero():
    catalogue, log = make_catalogue(30), successor_log(30, n_users=16, length=9)
    policy = SASRecPolicy(refit_every=1, max_len=8, epochs=1)
    policy.update(Observation.of(log, catalogue, 0), np.random.default_rng(0))
    history = np.array([[-1, -1, 3], [-1, -1, -1]])
    scores = policy.score(np.array([0, 1]), history, np.array([[4, 30, -1], [4, 5, 6]]))
    assert scores[0, 0] != 0 and np.all(scores[0, 1:] == 0) and np.all(scores[1] == 0)


def test_sft_micro_batches_give_the_whole_batch_gradient():
    import torch

    from agorasim.policy.generative import GenerativePolicy
    from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens
    from agorasim.rl.sft import sft_epoch

    def policy():
        p = GenerativePolicy(levels=2, codebook_size=4, hidden=16, layers=1, heads=2, prompt_items=3, max_len=3)
        p.ids = SemanticIds(levels=2, codebook_size=4)
        codes = p.ids.fit(np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32), seed=0)
        p.tokens = codes_to_tokens(codes, p.ids.level_sizes, p.first_code)
        p.build_lm([], seed=0)
        return p

    rng = np.random.default_rng(1)
    history, targets = rng.integers(-1, 30, size=(12, 3)), rng.integers(0, 30, size=12)
    whole, split = policy(), policy()
    for p, micro in ((whole, None), (split, 5)):
        optimizer = torch.optim.SGD(p.model.parameters(), lr=0.1)
        sft_epoch(p, optimizer, history, targets, 12, torch.Generator().manual_seed(0), micro_batch=micro)
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_policy_sft_passes_its_micro_batch(monkeypatch):
    """``sft_micro_batch`` reaches ``sft_epoch`` (warm start and refits); None is the whole batch
    for a model built from a config and 16 pairs for a pretrained one (SmolLM2's activations for
    256 pairs outgrew 24 GiB in the market); 0 is refused."""
    import torch

    import agorasim.rl.sft as sft_module
    from agorasim.policy.generative import GenerativePolicy

    seen = []
    monkeypatch.setattr(sft_module, "sft_epoch", lambda *a, **k: seen.append(k["micro_batch"]) or [1.0])

    class Log:
        def clicks(self):
            return np.array([0, 0, 1, 1, 1]), np.array([3, 4, 5, 6, 7]), np.array([0, 1, 0, 1, 2])

    for micro, expected in ((5, 5), (None, None)):
        p = GenerativePolicy(levels=2, codebook_size=4, hidden=16, layers=1, heads=2, prompt_items=3, max_len=3,
                             sft_micro_batch=micro)
        p.model = torch.nn.Linear(2, 2)  # sft only needs parameters to optimise
        p.sft(Log(), np.random.default_rng(0), epochs=1)
        assert seen[-1] == expected
    assert GenerativePolicy(pretrained="smollm2").sft_micro_batch == 16
    assert GenerativePolicy(pretrained="smollm2", sft_micro_batch=64).sft_micro_batch == 64
    with pytest.raises(ValueError, match="sft_micro_batch must be >= 1"):
        GenerativePolicy(sft_micro_batch=0)


def test_a_policy_observes_the_platform_view_not_the_world(small_overrides):
    """``Policy.update`` gets an Observation: observable columns, read-only; the true vectors and
    qualities the users' utility reads are not reachable from it."""
    from agorasim.config import build_config
    from agorasim.env.market import Market
    from agorasim.scenarios import load_scenario

    seen = []

    class Spy(PopularityPolicy):
        def update(self, obs, rng):
            seen.append(obs)
            return super().update(obs, rng)

    market = Market(build_config(load_scenario("cold-start"), small_overrides + ["policy.name=popularity"]))
    market.policy = Spy(refit_every=1)
    market.step()
    obs = seen[-1]
    cat = market.world.catalogue
    assert obs.round == 0 and obs.catalogue.n == cat.n
    for hidden in ("embedding", "quality", "first_exposure"):
        with pytest.raises(AttributeError, match="not observable"):
            getattr(obs.catalogue, hidden)
    assert np.array_equal(obs.catalogue.content, cat.content[: cat.n])
    with pytest.raises(ValueError, match="read-only"):
        obs.catalogue.interactions[0] = 1e9
    assert not hasattr(obs.log, "chunks")
    users, items, rounds = obs.log.clicks()
    assert len(items) == int(cat.interactions[: cat.n].sum()) and (rounds == 0).all()


def test_every_policy_documents_its_parameters_in_a_typed_model():
    """``policy.params`` is checked by each policy's ``Params`` model: one field per constructor
    argument, the same defaults, a description on every field; bad values are named."""
    import inspect

    for name, cls in POLICIES.items():
        model = cls.Params
        signature = inspect.signature(cls.__init__)
        ctor = {p.name: p.default for p in list(signature.parameters.values())[1:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        base = next((b for b in cls.__mro__[1:] if b in POLICIES.values()), None)
        if base is not None and any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            ctor = {**{f: i.default for f, i in base.Params.model_fields.items()}, **ctor}  # the rest goes to its base
        assert {f: i.default for f, i in model.model_fields.items()} == ctor, name
        assert all(info.description for info in model.model_fields.values()), name
    with pytest.raises(ValueError, match=r"policy 'bpr': dim: Input should be greater than or equal to 1 \(got 0\)"):
        make_policy("bpr", dim=0)
    with pytest.raises(ValueError, match="policy 'sasrec': unknown parameter.s. depth; allowed: refit_every"):
        make_policy("sasrec", depth=3)
    with pytest.raises(ValueError, match="policy 'generative': arch: Input should be 'qwen2' or 'llama'"):
        make_policy("generative", arch="gpt2")
    assert make_policy("bpr", dim="8").dim == 8  # validated and coerced by the model


def test_no_policy_module_imports_the_world():
    """Policies see an Observation, never the world's true state: nothing in policy/ imports env/."""
    import ast
    from pathlib import Path

    import agorasim.policy

    folder = Path(agorasim.policy.__file__).parent
    offenders = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("agorasim.env")]
    assert len(list(folder.glob("*.py"))) > 5 and offenders == []
