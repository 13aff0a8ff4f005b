"""GRC with EGRS (ALGORITHMS.md section 6): hand values, the correction's constraints, reflection
"none", the supervised and RL stages, the policy contract, the market, resume and the offline arm."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agorasim.config import build_config
from agorasim.env.conformance import check_policy
from agorasim.env.market import Market
from agorasim.errors import UserInputError
from agorasim.policy import make_policy
from agorasim.policy.grc import GRCPolicy, GRCSettings, supervised_stage
from agorasim.policy.trie import CatalogueTrie
from agorasim.rl import grc as grc_rl
from agorasim.rl.advantages import group_advantages
from agorasim.rl.grc import (
    apply_corrections,
    correct,
    correction_mask,
    egrs_decode,
    egrs_select,
    first_wrong,
    grc_reward,
    loc_ids,
    prefix_match,
    reflection_entropy,
    reflection_logprobs,
    segment_advantages,
    triple_tokens,
)
from agorasim.rl.judges import TargetJudge
from agorasim.rl.trainer import Prompts
from agorasim.run import checkpoint
from agorasim.scenarios import load_scenario

TINY = dict(warmup_rounds=2, levels=2, codebook_size=8, hidden=32, layers=1, heads=2, prompt_items=4, beams=8,
            sft_epochs=2, sft_batch=64)

# the hand catalogue: 3 codes + a de-duplication code per item (D = 4), 10 codes per level.
# a1 b2 c3 d4 is item 0 (the draft), a1 b2 c9 d1 item 1 (the target)
CODES = np.array([
    [1, 2, 3, 4],  # 0: the draft
    [1, 2, 9, 1],  # 1: the target
    [1, 2, 5, 0],  # 2: same a1 b2, another c
    [1, 2, 3, 5],  # 3: same a1 b2 c3 (a correction at position 3 must change c3: not allowed)
    [1, 7, 3, 4],  # 4: another b
    [0, 2, 3, 4],  # 5: another a
])


def hand_policy(seed: int = 0) -> GRCPolicy:
    """A GRC policy over the hand catalogue with an untrained tiny LM (levels = 3, D = 4)."""
    policy = GRCPolicy(**{**TINY, "levels": 3})
    policy.ids = SimpleNamespace(level_sizes=[10, 10, 10, 10])
    offsets = policy.first_code + np.arange(4) * 10
    policy.tokens = CODES + offsets
    policy.trie = CatalogueTrie(CODES, [10, 10, 10, 10], policy.first_code)
    policy.build_lm([policy.grc], seed=seed)
    policy.ready = True
    return policy


def test_first_wrong_position_of_the_hand_example():
    assert first_wrong(CODES[0], CODES[1]) == 3  # [a1,b2,c3,d4] vs [a1,b2,c9,d1]
    assert first_wrong(CODES[0], CODES[0]) == 5  # D + 1: reflection "none"
    assert first_wrong(CODES[0], CODES[5]) == 1
    np.testing.assert_array_equal(first_wrong(CODES, CODES[1]), [3, 5, 3, 3, 2, 1])
    assert prefix_match(CODES[0], CODES[1]) == pytest.approx(2 / 4)


def test_correction_mask_keeps_the_prefix_and_changes_the_reflected_position():
    mask = correction_mask(CODES, CODES[[0, 0, 0, 0]], np.array([3, 2, 1, 5]))
    np.testing.assert_array_equal(np.flatnonzero(mask[0]), [1, 2])  # a1 b2 kept, c3 changed (not item 3)
    np.testing.assert_array_equal(np.flatnonzero(mask[1]), [4])
    np.testing.assert_array_equal(np.flatnonzero(mask[2]), [5])
    assert not mask[3].any()  # none: nothing to correct


def test_the_correction_of_the_hand_example_keeps_a1_b2():
    policy = hand_policy()
    ids, mask = policy.prompts(np.array([[5, 4], [5, 4]]))
    draft = policy.tokens[[0, 0]]
    items, tokens = correct(policy, ids, mask, draft, np.array([3, 3]), greedy=False,
                            generator=torch.Generator().manual_seed(0))
    assert set(items) <= {1, 2} and (items >= 0).all()
    np.testing.assert_array_equal(tokens[:, :2], draft[:, :2])  # the correct prefix is copied
    assert (tokens[:, 2] != draft[:, 2]).all()
    np.testing.assert_array_equal(tokens, policy.tokens[items])
    # reflection none: no correction, the draft's tokens come back
    items, tokens = correct(policy, ids, mask, draft, np.array([5, 5]))
    np.testing.assert_array_equal(items, [-1, -1])
    np.testing.assert_array_equal(tokens, draft)


def test_trajectory_reward_by_hand():
    r = grc_reward(final=np.array([1.0, 0.5, 0.25]), draft=np.array([0.5, 0.5, 0.5]), loc_hat=np.array([3, 5, 2]),
                   loc_star=np.array([3, 3, 2]), has_target=np.array([True, True, False]))
    # 1 + 0.5 * 1 + 0.5 * (1 - 0.5); 0.5 + 0 + 0; 0.25 + 0 (no target: no localisation) + 0.5 * (-0.25)
    np.testing.assert_allclose(r["total"], [1.75, 0.5, 0.125])
    np.testing.assert_allclose(r["localisation"], [1, 0, 0])
    np.testing.assert_allclose(r["improvement"], [0.5, 0.0, -0.25])


def test_segment_credit_by_hand():
    # R(draft) = [1, 0], r = [0.5, 1.5]; the std of two values a, b is |a - b| / sqrt(2), plus eps 1e-4
    a = 0.5 / (np.sqrt(0.5) + 1e-4)
    valid = np.ones((1, 2), bool)
    segment = segment_advantages(np.array([[1.0, 0.0]]), np.array([[0.5, 1.5]]), valid, depth=2)
    np.testing.assert_allclose(segment[0], [[a, a, -a, -a, -a], [-a, -a, a, a, a]])
    literal = segment_advantages(np.array([[1.0, 0.0]]), np.array([[0.5, 1.5]]), valid, depth=2, credit="trajectory")
    np.testing.assert_allclose(literal[0], [[-a] * 5, [a] * 5])
    # a missing draft gets nothing, and its zero reward joins its group's statistics
    gone = segment_advantages(np.array([[1.0, 0.0, 0.4]]), np.array([[2.0, 1.0, 0.4]]),
                              np.array([[True, True, False]]), depth=1)
    np.testing.assert_array_equal(gone[0, 2], 0.0)
    np.testing.assert_allclose(gone[0, :2, 0], [1.0 / (np.std([1, 0, 0], ddof=1) + 1e-4) * v for v in (2 / 3, -1 / 3)])
    with pytest.raises(ValueError, match="credit"):
        segment_advantages(np.zeros((1, 2)), np.zeros((1, 2)), valid, 2, credit="token")


def test_egrs_picks_the_highest_entropy_drafts():
    uniform = np.log(np.full(5, 0.2))
    sure = np.log(np.array([1 - 4e-6, 1e-6, 1e-6, 1e-6, 1e-6]))
    assert reflection_entropy(uniform) == pytest.approx(np.log(5))
    assert reflection_entropy(sure) < 1e-4
    entropy = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, -np.inf, 0.2, 0.1]])
    np.testing.assert_array_equal(egrs_select(entropy, 2), [[1, 3], [0, 2]])  # ties to the better rank


def test_apply_corrections_replaces_in_place_and_deduplicates():
    drafts = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    columns = np.array([[2, 0], [1, 3]])
    corrected = np.array([[11, -1], [30, 31]])  # 11 repeats rank 1: the corrected slot is dropped
    np.testing.assert_array_equal(apply_corrections(drafts, columns, corrected), [[10, 11, 13, -1], [20, 30, 22, 31]])


def test_triples_train_the_reflection_and_the_suffix_only():
    policy = hand_policy()
    path, train = triple_tokens(policy, np.array([[0, 1, -1]]), np.array([1]))
    loc = loc_ids(policy)
    # draft a1 b2 c3 d4 -> <loc_3> -> a1 b2 c9 d1; the target itself -> <loc_5> (none)
    np.testing.assert_array_equal(path[0], np.r_[policy.tokens[0], loc[2], policy.tokens[1]])
    np.testing.assert_array_equal(train[0], [0, 0, 0, 0, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(path[1, 4], loc[4])
    np.testing.assert_array_equal(train[1], [0, 0, 0, 0, 1, 0, 0, 0, 0])
    assert not train[2].any()  # a missing draft trains nothing


def forced_reflection(position: int):
    """A stand-in for ``reflection_logprobs`` that is sure of ``position`` for every draft."""
    def fake(policy, ids, mask, draft_tokens):
        log_p = torch.full((len(draft_tokens), policy.levels + 2), -30.0)
        log_p[:, position - 1] = 0.0
        return torch.log_softmax(log_p, -1)
    return fake


def test_reflection_none_leaves_every_beam_untouched(monkeypatch):
    policy = hand_policy()
    history = np.array([[5, 4], [2, 3]])
    monkeypatch.setattr(grc_rl, "reflection_logprobs", forced_reflection(5))
    result = egrs_decode(policy, history, beams=4, draft_beams=4, budget=3)
    assert (result.loc == 5).all() and (result.corrected == -1).all()
    np.testing.assert_array_equal(result.ranked, result.drafts)


def test_a_wrong_suffix_is_corrected_under_the_kept_prefix(monkeypatch):
    policy = hand_policy()
    history = np.array([[5, 4], [2, 3]])
    monkeypatch.setattr(grc_rl, "reflection_logprobs", forced_reflection(3))
    result = egrs_decode(policy, history, beams=4, draft_beams=4, budget=2)
    chosen = np.take_along_axis(result.drafts, result.columns, 1)
    for row, col in zip(*np.nonzero(result.corrected >= 0), strict=True):
        before, after = CODES[chosen[row, col]], CODES[result.corrected[row, col]]
        assert (after[:2] == before[:2]).all() and after[2] != before[2]  # prefix kept, position 3 changed
        assert result.corrected[row, col] in result.ranked[row]
    # items with an alternative under their a b prefix were corrected (item 4's a1 b7 has none)
    correctable = np.isin(chosen, [0, 1, 2, 3])
    np.testing.assert_array_equal(result.corrected >= 0, correctable)


def test_reflection_distribution_is_over_the_loc_tokens():
    policy = hand_policy()
    ids, mask = policy.prompts(np.array([[5, 4]]))
    log_p = reflection_logprobs(policy, ids, mask, policy.tokens[[0, 1, 2]])
    assert log_p.shape == (3, 5)
    np.testing.assert_allclose(log_p.detach().exp().sum(-1).numpy(), 1.0, rtol=1e-5)


def test_supervised_stage_learns_the_reflection_and_changes_the_parameters():
    policy = hand_policy(seed=1)
    history = np.tile(np.array([[5, 4], [2, 3], [4, 5]]), (20, 1))
    targets = np.tile(np.array([1, 0, 2]), 20)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    settings = GRCSettings(triple_beams=3, grc_sft_epochs=1, grc_sft_lr=1e-2)
    first = supervised_stage(policy, history, targets, settings, 16, np.random.default_rng(0))
    last = supervised_stage(policy, history, targets, settings.model_copy(update={"grc_sft_epochs": 15}), 16,
                            np.random.default_rng(1))
    assert last["train/grc_rc_loss"] < first["train/grc_rc_loss"]
    assert last["train/grc_reflection_accuracy"] > 0.9
    assert all(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters())


def test_triple_epoch_in_micro_batches_gives_the_whole_batch_step():
    """Micro-batches (the pretrained policy's gradient accumulation) give the whole batch's
    parameters and losses: the MLE term weighted by each part's share of the pairs, the
    correction term over the whole batch's trained tokens (which differ per draft)."""
    history = np.tile(np.array([[5, 4], [2, 3], [4, 5]]), (4, 1))
    targets = np.tile(np.array([1, 0, 2]), 4)
    results = []
    for micro in (None, 5):
        policy = hand_policy(seed=3)
        drafts = grc_rl.triples(policy, history, 3)
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.1)
        losses = grc_rl.triple_epoch(policy, optimizer, history, targets, drafts, 12,
                                     torch.Generator().manual_seed(0), 0.5, micro_batch=micro)
        results.append((losses, [p.detach().clone() for p in policy.model.parameters()]))
    (whole, whole_params), (split, split_params) = results
    assert grc_rl.triple_tokens(policy, drafts, targets)[1].sum(1).std() > 0  # parts train unequal token counts
    for key in ("loss", "mle", "rc"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5)
    for a, b in zip(whole_params, split_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_rl_step_rewards_the_trajectory_and_trains():
    from agorasim.config import RLConfig
    from agorasim.rl.trainer import Trainer

    policy = hand_policy(seed=2)
    rl = RLConfig(group_size=4, users_per_step=4, rollout="beam", lr=1e-2)
    method = grc_rl.GRCMethod(rl, GRCSettings(task_reward="prefix"), 4)
    trainer = Trainer(policy, rl, method)
    prompts = Prompts(np.full(3, -1), np.array([[5, 4], [2, 3], [4, 5]]), np.array([1, 0, 2]))
    generator = torch.Generator().manual_seed(0)
    rollout = method.rollout(trainer, prompts, generator)
    assert rollout.completions.shape == (12, 9)
    # a corrected trajectory's final item keeps its draft's prefix before l_hat
    for b, g in zip(*np.nonzero(rollout.extra["corrected"]), strict=True):
        loc = rollout.extra["loc"][b, g]
        draft, final = CODES[rollout.extra["draft"][b, g]], CODES[rollout.items[b, g]]
        assert (draft[:loc - 1] == final[:loc - 1]).all() and draft[loc - 1] != final[loc - 1]
    scored = method.score(trainer, prompts, rollout, TargetJudge())
    task = prefix_match(policy.tokens[rollout.items], policy.tokens[prompts.target][:, None])
    np.testing.assert_allclose(scored.rewards["task"], task)
    # segment credit (the default): the draft's tokens are credited with the draft's own task reward
    r_draft = prefix_match(policy.tokens[rollout.extra["draft"]], policy.tokens[prompts.target][:, None])
    assert scored.advantages.shape == (3, 4, 9)
    np.testing.assert_allclose(scored.advantages[:, :, :4], np.repeat(group_advantages(r_draft)[:, :, None], 4, 2))
    np.testing.assert_allclose(scored.advantages[:, :, 4:],
                               np.repeat(group_advantages(scored.total)[:, :, None], 5, 2))
    assert not np.allclose(scored.advantages[:, :, 0], scored.advantages[:, :, 4])
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    row = trainer.step(prompts, TargetJudge(), generator)
    assert np.isfinite(row["train/loss"]) and "train/grc/loc_accuracy" in row
    assert any(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters())


@pytest.mark.parametrize("rl", [{"method": "grpo"}, {"method": "none"}])
def test_grc_policy_passes_the_policy_contract(rl):
    policy = GRCPolicy(**TINY, rl={**rl, "group_size": 4, "users_per_step": 8})
    metrics = check_policy(policy, rounds=3, from_candidates=False)
    assert "train/grc_rc_loss" in metrics[1]
    assert ("train/loss" in metrics[2]) == (rl["method"] == "grpo")


def test_draft_decoding_serves_the_plain_beams():
    policy = hand_policy()
    policy.settings = policy.grc.settings = GRCSettings(decoding="draft")
    history = np.array([[5, 4]])
    items, scores = policy.grc.serve(policy, history, 4, 0)
    np.testing.assert_array_equal(items, policy.beam_search(history, 4)[0])
    assert (np.diff(scores[0]) < 0).all()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="correct_top"):
        make_policy("grc", correct_top=11, draft_beams=10)
    with pytest.raises(ValueError, match="task_reward"):
        make_policy("grc", task_reward="ctr")
    with pytest.raises(ValueError, match="credit"):
        make_policy("grc", credit="token")
    with pytest.raises(UserInputError, match="rl.method must be grpo"):
        GRCPolicy(**TINY, rl={"method": "ugr"})


@pytest.mark.parametrize("setting, message", [
    ("policy.params={correct_top: 0, draft_beams: 0}", "draft_beams"),
    ("policy.params={decoding: sample}", "decoding"),
    ("policy.params={credit: tokens}", "credit"),
    ("rl.method=ugr", "rl.method must be grpo"),
])
def test_bad_settings_exit_2_from_the_cli(tmp_path, capsys, setting, message):
    from agorasim.cli import main

    code = main(["run", "--scenario", "cold-start", "--out", str(tmp_path / "runs"), "--no-progress", "--set",
                 "policy.name=grc", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def tiny_market(*extra):
    overrides = ["market.n_users=200", "market.n_items=120", "market.n_providers=10", "agents.users.activity=0.4",
                 "market.new_items_per_round=2", "market.new_users_per_round=2", "run.progress=false",
                 "policy.name=grc", "rl.users_per_step=16", "rl.group_size=4", "run.eval_users=16",
                 "policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, hidden: 32, layers: 1, "
                 "heads: 2, prompt_items: 4, beams: 12, sft_epochs: 3}"]
    return Market(build_config(load_scenario("cold-start"), overrides + list(extra)))


def test_grc_runs_in_the_market_deterministically_and_resumes_exactly():
    straight = tiny_market()
    for _ in range(4):
        straight.step()
    rows = straight.rows
    assert "train/grc_rc_loss" in rows[1] and "train/reward/localisation_mean" in rows[3]
    first = tiny_market()
    for _ in range(2):
        first.step()
    resumed = checkpoint.loads(checkpoint.dumps(first))
    for _ in range(2):
        resumed.step()
    assert json.dumps(resumed.rows) == json.dumps(rows)


def test_offline_grc_arm_reports_drafts_corrections_and_entropy_ranks(tmp_path):
    from agorasim.run.offline import evaluate

    metrics = evaluate(out_dir=tmp_path, quick=True, progress=False, methods=[], grpo_steps=1,
                       grc={"task_reward": "prefix", "grc_sft_epochs": 1})
    for model in ("sft+grc-draft", "sft+grc"):
        assert 0 <= metrics[f"{model}/test/hr@1"] <= metrics[f"{model}/test/hr@10"] <= 1
    report = (tmp_path / "offline.md").read_text()
    assert "## GRC" in report and "| supervised+RL | 3 |" in report


def test_after_placement_keeps_the_drafts():
    drafts = np.array([[10, 11, 12, 13]])
    columns = np.array([[2, 0]])
    corrected = np.array([[30, 11]])  # the correction of slot 0 repeats slot 1: dropped
    np.testing.assert_array_equal(apply_corrections(drafts, columns, corrected, "after"), [[10, 11, 12, 30]])
    np.testing.assert_array_equal(apply_corrections(drafts, columns, np.array([[-1, -1]]), "after"), drafts)


def test_entropy_rank_gains_by_hand():
    from agorasim.rl.grc import EGRSResult
    from agorasim.run.offline_grc import entropy_rank_gains

    tokens = np.array([[3, 13], [3, 14], [4, 13], [4, 14]])  # D = 2
    # row 0: draft 0 (the target) corrected to 1; row 1: draft 2 corrected to 0 (the target, not listed);
    # row 2: draft 3 corrected to 0 (the target, already listed by draft 0: no list gain)
    result = EGRSResult(drafts=np.array([[0, 2], [2, 3], [0, 3]]), entropy=np.ones((3, 2)),
                        columns=np.array([[0], [0], [1]]), loc=np.full((3, 1), 2),
                        corrected=np.array([[1], [0], [0]]), ranked=np.zeros((3, 2), np.int64))
    (row,) = entropy_rank_gains(result, np.array([0, 0, 0]), tokens)
    assert row["hit"] == pytest.approx((-1 + 1 + 1) / 3)
    assert row["list_hit"] == pytest.approx((-1 + 1 + 0) / 3)
    # prefix match / 2: row 0 1 -> 1/2, row 1 0 -> 1, row 2 0 -> 1
    assert row["prefix"] == pytest.approx(((0.5 - 1) + (1 - 0) + (1 - 0)) / 3)
    assert row["draft_hit"] == pytest.approx(1 / 3) and row["changed"] == 1.0
