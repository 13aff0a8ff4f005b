"""The generative policy: contract, prompts, SFT, GRPO inside the market, determinism."""

import json

import numpy as np
import pytest
import torch

from agorasim.config import build_config
from agorasim.env.conformance import check_policy
from agorasim.env.market import Market
from agorasim.policy.generative import BOS, PAD, SEP, GenerativePolicy
from agorasim.run import checkpoint
from agorasim.scenarios import load_scenario

TINY = dict(warmup_rounds=2, levels=2, codebook_size=8, hidden=32, layers=1, heads=2, prompt_items=4, beams=8,
            sft_epochs=2, sft_batch=64)


def test_generative_policy_passes_the_policy_contract():
    metrics = check_policy(GenerativePolicy(**TINY), rounds=3, from_candidates=False)
    # round 1: SFT; round 2: a GRPO step on the stub oracle's rewards
    assert "train/sft_loss" in metrics[1] and "train/loss" in metrics[2]


@pytest.mark.parametrize("method", ["none", "ugr", "flexrec", "flame", "blade", "flower"])
def test_every_method_passes_the_policy_contract(method):
    metrics = check_policy(GenerativePolicy(**TINY, rl={"method": method, "group_size": 4, "users_per_step": 8}),
                           rounds=3, from_candidates=False)
    assert ("train/loss" in metrics[2]) == (method != "none")


def test_prompts_are_left_padded_code_sequences():
    policy = GenerativePolicy(**TINY)
    policy.tokens = np.array([[3, 11, 19], [4, 12, 20], [5, 13, 21]])
    policy.levels = 2
    ids, mask = policy.prompts(np.array([[-1, -1, 0, 2], [-1, -1, -1, -1]]))
    # 4 items x 3 tokens + BOS + SEP = 14 positions
    assert ids.tolist()[0] == [PAD] * 6 + [BOS, 3, 11, 19, 5, 13, 21, SEP]
    assert ids.tolist()[1] == [PAD] * 12 + [BOS, SEP]
    assert mask.tolist()[0] == [0] * 6 + [1] * 8 and mask.tolist()[1] == [0] * 12 + [1, 1]


def tiny_market(*extra):
    overrides = ["market.n_users=200", "market.n_items=120", "market.n_providers=10", "agents.users.activity=0.4",
                 "market.new_items_per_round=2", "market.new_users_per_round=2", "run.progress=false",
                 "policy.name=generative", "rl.users_per_step=16", "rl.group_size=4", "run.eval_users=16",
                 "policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, hidden: 32, layers: 1, "
                 "heads: 2, prompt_items: 4, beams: 12, sft_epochs: 3}"]
    return Market(build_config(load_scenario("cold-start"), overrides + list(extra)))


def test_grpo_step_changes_every_parameter_and_logs_training():
    market = tiny_market()
    for _ in range(2):  # warm-up, then SFT at the end of round 1
        market.step()
    policy = market.policy
    assert policy.ready and "train/sft_loss" in market.rows[-1]
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    market.step()  # first GRPO step
    row = market.rows[-1]
    for key in ("train/loss", "train/reward", "train/kl", "train/entropy", "train/clip_fraction",
                "train/grad_norm", "train/hit_rate", "train/reward/rating_mean", "train/reward/rating_std"):
        assert key in row, key
    assert not any(k.startswith("time/") for k in row)  # wall clock stays out of metrics.csv
    assert "time/seconds" in market.train_rows[-1]
    changed = [name for name, p in policy.model.named_parameters() if not torch.equal(p, before[name])]
    assert sorted(changed) == sorted(before)  # every trainable parameter moved


def test_generative_serves_only_alive_catalogue_items():
    # providers leave after 1 round under the threshold: the policy serves from a shrinking trie
    market = tiny_market("agents.items.exit_window=1", "agents.items.exit_threshold=0.9",
                         "agents.items.min_providers=2")
    slates = []
    for _ in range(5):
        market.step()
        slates.append((market.last_round["slates"].copy(), market.last_round["alive"].copy()))
    cat = market.world.catalogue
    assert not cat.alive[: cat.n].all()  # items left the market while the model served
    assert len(slates) == 5
    for shown, alive in slates:
        assert (shown >= 0).any() and np.isin(shown[shown >= 0], alive).all()


def test_generative_run_is_deterministic_and_resumable():
    straight = tiny_market()
    for _ in range(5):
        straight.step()
    first = tiny_market()
    for _ in range(3):
        first.step()
    resumed = checkpoint.loads(checkpoint.dumps(first))
    for _ in range(2):
        resumed.step()
    assert json.dumps(resumed.rows) == json.dumps(straight.rows)


def test_metrics_do_not_depend_on_the_chunk_threads():
    """Serving, rollouts (beams and samples) and the SFT and GRPO loss passes run in 2 chunks; on
    one thread or two, the run is the same to the last digit. One chunk is the unchunked pass."""
    runs = {}
    for name, params in (("serial", "chunk_workers: 1"), ("threaded", "chunk_workers: 2"), ("one", "chunks: 1")):
        market = tiny_market("policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, hidden: 32, layers: 1, "
                             f"heads: 2, prompt_items: 4, beams: 12, sft_epochs: 3, {params}}}")
        for _ in range(5):
            market.step()
        assert market.policy.chunks == (1 if name == "one" else 2)
        runs[name] = json.dumps(market.rows)
    assert runs["serial"] == runs["threaded"]
    assert runs["one"] != runs["serial"]  # two chunks: other sample streams and gradient rounding


@pytest.mark.parametrize("loss", ["bnpo", "dr_grpo", "dapo", "gspo"])
def test_every_loss_trains_in_the_loop(loss):
    market = tiny_market(f"rl.loss={loss}", "rl.updates_per_batch=2", "rl.beta=0.05", "rl.ref_sync_every=1",
                         "rl.rewards={rating: 1.0, exposure: 0.5, rere_rank: 0.5}", "rl.rollout=sample")
    for _ in range(3):
        market.step()
    row = market.rows[-1]
    assert np.isfinite(row["train/loss"]) and row["train/kl"] >= 0
    assert "train/reward/exposure_mean" in row and row["train/reward/exposure_mean"] <= 0


def test_served_only_mode_rewards_served_items_and_a_critic_for_the_rest():
    market = tiny_market("rl.mode=served-only")

    def forbidden(*args, **kwargs):
        raise AssertionError("served-only mode must not query the user model")

    market.judge = forbidden
    for _ in range(4):
        market.step()
    row = market.rows[-1]
    assert np.isfinite(row["train/critic_mse"]) and 0 < row["train/served_share"] <= 1
    assert np.isfinite(row["train/loss"])


def test_critic_by_hand():
    from agorasim.env.state import Catalogue, InteractionLog
    from agorasim.policy.generative import ServedCritic

    cat = Catalogue.empty(dim=2, depth=1)
    cat.add(["a", "b"], embedding=np.eye(2, dtype=np.float32), content=np.eye(2, dtype=np.float32),
            quality=np.zeros(2), provider=np.zeros(2), category=np.zeros((2, 1)), brand=np.zeros(2),
            price_band=np.zeros(2), features=np.zeros(2), born=np.zeros(2), alive=np.ones(2, bool),
            interactions=np.zeros(2), first_exposure=np.zeros(2))
    log = InteractionLog()
    # user 0 clicked item 0 with 5 stars (outcome 10) and skipped item 1 (outcome 0)
    log.append(round=np.array([3, 3]), user=np.array([0, 0]), item=np.array([0, 1]), position=np.array([0, 1]),
               click=np.array([1, 0], np.int8), rating=np.array([5.0, np.nan], np.float32))
    critic = ServedCritic(window=5, ridge=1e-6)
    judged = critic.judge(log, cat, 3, np.array([0]), np.array([[0]]), np.array([[0, 1, -1]]))
    # both candidates were served: observed outcomes, not predictions
    np.testing.assert_allclose(judged["rating"], [[10.0, 0.0, 0.0]])
    np.testing.assert_allclose(judged["click"], [[1.0, 0.0, 0.0]])
    assert critic.served_share == 1.0


def test_ugr_reads_its_loss_and_confidence_from_one_pass_with_the_two_pass_values():
    """UGR's loss runs [prompt, item, <conf_query>, <conf_pos>] once; its value and gradients equal
    the plain policy-gradient loss plus the confidence loss of a separate confidence pass."""
    from agorasim.rl.trainer import Method
    from agorasim.rl.ugr import confidence_loss

    market = tiny_market("rl.method=ugr", "rl.group_size=8")
    method = None
    captured = []
    for _ in range(12):
        market.step()
        policy = market.policy
        if policy.ready and method is None:
            method = policy.trainer.method
            plain = method.loss
            method.loss = lambda *args, plain=plain: captured.append(args[1:3]) or plain(*args)
        if any(r.extra["hit"].any() for r, _ in captured):
            break
    rollout, scored = next((r, s) for r, s in captured if r.extra["hit"].any())  # the case: a group with a hit
    trainer, model, cfg = policy.trainer, policy.model, policy.rl.ugr

    def value_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one, one_grads = value_and_grads(lambda: type(method).loss(method, trainer, rollout, scored, None, None)[0])
    two, two_grads = value_and_grads(lambda: Method.loss(method, trainer, rollout, scored, None, None)[0]
                                     + confidence_loss(method.confidence(policy, rollout), rollout.extra["hit"],
                                                       rollout.extra["partial"], cfg.lambda_partial, cfg.lambda_wrong))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    assert len(one_grads) == len(two_grads) > 0
    for a, b in zip(one_grads, two_grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7
