"""PUMA: user selection by hand, the adapter, soft prompts in serving, upgrades in the market,
determinism and exact resume across an upgrade, bad values."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from agorasim.config import build_config
from agorasim.env.market import Market
from agorasim.errors import UserInputError
from agorasim.policy.puma import (
    Adapter,
    Ratings,
    apply_adapters,
    bin_quota,
    kmeans,
    random_users,
    select_users,
    variance_bins,
)
from agorasim.run import checkpoint
from agorasim.scenarios import load_scenario


def test_bin_quota_hand_value():
    # weights exp(-x^2/2) + 0.1 at x = -2..2: 50 x [.0789, .2368, .3687, .2368, .0789] floored
    # = [3, 11, 18, 11, 3], and the remainder 4 goes to the last bin (ALGORITHMS.md section 9)
    assert bin_quota(50, 5).tolist() == [3, 11, 18, 11, 7]
    assert bin_quota(7, 1).tolist() == [7] and bin_quota(200, 5).sum() == 200


def test_selection_of_one_cluster_takes_the_hand_counts_per_variance_bin():
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(500, 4))
    variance = rng.random(500)
    picked = select_users(prompts, variance, budget=50, clusters=1, bins=5, min_per_cluster=50, seed=3)
    bins = variance_bins(variance, 5)
    assert len(picked) == 50 and len(np.unique(picked)) == 50
    assert np.bincount(bins[picked], minlength=5).tolist() == [3, 11, 18, 11, 7]


def test_selection_covers_every_cluster_and_spends_the_budget():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=10, size=(3, 2))
    prompts = np.concatenate([c + rng.normal(size=(n, 2)) for c, n in zip(centres, (300, 60, 40))])
    labels = kmeans(prompts, 3, np.random.default_rng(0))
    assert len(np.unique(labels)) == 3
    picked = select_users(prompts, rng.random(400), budget=90, clusters=3, bins=5, min_per_cluster=20, seed=0)
    assert len(picked) == 90
    assert all(np.isin(np.flatnonzero(labels == c), picked).sum() >= 20 for c in range(3))
    assert len(random_users(400, 90, seed=0)) == 90 and select_users(prompts, np.zeros(400), 500).tolist() == list(range(400))


def test_adapter_shapes_and_it_learns_a_fixed_mapping():
    torch.manual_seed(0)
    adapter = Adapter(8, 16, hidden=32, dropout=0.1)
    x = torch.randn(256, 8)
    target = torch.tanh(x @ torch.randn(8, 16))
    assert adapter(x).shape == (256, 16)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(adapter(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
    chained = apply_adapters([adapter, Adapter(16, 24, hidden=8)], x)
    assert chained.shape == (256, 24)


def test_ratings_keep_the_last_per_user():
    ratings = Ratings(per_user=3, holdout=0.0)
    rng = np.random.default_rng(0)
    ratings.add(np.array([2, 0, 2, 2, 2]), np.array([10, 11, 12, 13, 14]), np.arange(1.0, 6.0), rng)
    users, items, stars = ratings.rows(np.array([2]))
    assert sorted(items.tolist()) == [12, 13, 14] and sorted(stars.tolist()) == [3.0, 4.0, 5.0]
    assert ratings.variance(np.array([0, 1, 2])).tolist() == [0.0, 0.0, pytest.approx(2 / 3)]


TINY = ("policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, hidden: 32, layers: 1, heads: 2, "
        "prompt_items: 4, beams: 12, sft_epochs: 2, puma: {enabled: true, prompt_epochs: 2, adapter_epochs: 2, "
        "budget: 30, clusters: 3, min_per_cluster: 5, arm: ARM, upgrades: UPGRADES}}")
ONE = "[{round: 4, hidden: 48, layers: 2, seed: 5}]"
TWO = "[{round: 4, hidden: 48, layers: 2, seed: 5}, {round: 5, hidden: 64, layers: 2, seed: 6}]"


def tiny_market(arm="puma", upgrades=ONE, *extra):
    overrides = ["market.n_users=150", "market.n_items=100", "market.n_providers=10", "agents.users.activity=0.4",
                 "run.progress=false", "policy.name=generative", "rl.method=none", "run.eval_users=16",
                 "platform.reranker=none", TINY.replace("ARM", arm).replace("UPGRADES", upgrades)]
    return Market(build_config(load_scenario("policy-upgrade"), overrides + list(extra)))


def test_soft_prompts_change_the_served_ranking():
    market = tiny_market("puma", "[]")
    for _ in range(3):
        market.step()
    policy = market.policy
    assert policy.soft_prompts is not None and policy.soft_prompts.ready.any()
    users = np.flatnonzero(policy.soft_prompts.ready)[:20]
    history = market.world.population.history[users]
    items, scores = policy.beam_search(history, 12)
    served, _ = policy.personalise(users, items, scores)
    assert sorted(served[0].tolist()) == sorted(items[0].tolist())  # the same beams, re-ordered
    assert (served[:, :5] != items[:, :5]).any()
    policy.soft_prompts.table[torch.from_numpy(users)] *= -3  # other prompts, another order
    again, _ = policy.personalise(users, items, scores)
    assert (again != served).any()


@pytest.mark.parametrize("arm", ["cold", "retrain", "puma", "puma-random"])
def test_an_upgrade_runs_each_arm_and_changes_the_model(arm):
    market = tiny_market(arm)
    for _ in range(4):
        market.step()
    policy = market.policy
    row = market.rows[3]  # the policy learned after round 3: the upgrade (round 4 is B's first)
    assert row["puma/upgrade"] == 1 and row["puma/hidden"] == 48
    assert policy.model.get_input_embeddings().weight.shape[1] == 48 and policy.model.config.num_hidden_layers == 2
    assert policy.soft_prompts.table.shape[1] == 48
    assert "time/puma_seconds" in market.train_rows[-1] and "time/puma_seconds" not in row
    ready = policy.soft_prompts.ready
    if arm == "cold":
        assert row["puma/steps"] == 0 and row["puma/users"] == 0
    else:
        assert row["puma/steps"] > 0 and ready.any()
    if arm in ("puma", "puma-random"):
        assert row["puma/users"] == 30
    assert np.isfinite(market.rows[-1]["users/utility"])


def test_chained_upgrades_reach_the_third_model():
    market = tiny_market("puma", TWO)
    for _ in range(5):
        market.step()
    assert [r.get("puma/hidden") for r in market.rows[3:5]] == [48, 64]
    assert market.policy.soft_prompts.table.shape[1] == 64


def test_upgrade_run_is_deterministic_and_resumes_exactly_across_the_upgrade():
    straight = tiny_market("puma", TWO)
    for _ in range(6):
        straight.step()
    again = tiny_market("puma", TWO)
    for _ in range(6):
        again.step()
    assert json.dumps(again.rows) == json.dumps(straight.rows)
    first = tiny_market("puma", TWO)
    for _ in range(3):  # stopped just before the first upgrade
        first.step()
    resumed = checkpoint.loads(checkpoint.dumps(first))
    for _ in range(3):
        resumed.step()
    assert json.dumps(resumed.rows) == json.dumps(straight.rows)


@pytest.mark.parametrize("override, field", [
    ("policy.params.puma.arm=warm", "arm"),
    ("policy.params.puma.budget=0", "budget"),
    ("policy.params.puma.upgrades=[{round: 1, hidden: 32, layers: 1, seed: 0}]", "warm-up"),
    ("policy.params.puma.upgrades=[{round: 9, hidden: 30, layers: 1, heads: 4, seed: 0}]", "multiple of heads"),
    ("policy.params.puma.upgrades=[{round: 9, hidden: 32, layers: 1, seed: 0}, "
     "{round: 8, hidden: 32, layers: 1, seed: 1}]", "strictly increasing"),
])
def test_bad_puma_values_are_one_line_errors(override, field):
    with pytest.raises(UserInputError) as error:
        build_config(load_scenario("policy-upgrade"), [override])
    assert field in str(error.value) and "\n" not in str(error.value)


def test_bad_puma_value_exits_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agorasim.cli", "run", "--scenario", "policy-upgrade", "--out",
                           str(tmp_path), "--set", "policy.params.puma.arm=warm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "arm" in proc.stderr
    assert "Traceback" not in proc.stderr
