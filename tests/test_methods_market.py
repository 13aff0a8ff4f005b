"""The seed methods on the trainer, inside the market: every method trains every parameter, is
deterministic and resumes exactly, and serves only listed items in a world where items leave."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agorasim.rl.flame import Flame
from agorasim.rl.flower import path_log_flows, trie_path_log_flows
from agorasim.rl.methods import METHODS
from agorasim.rl.rollouts import merge_ranked
from agorasim.run import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_generative import tiny_market  # noqa: E402

METHOD_NAMES = sorted(METHODS)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_step_of_every_method_changes_every_parameter(method):
    market = tiny_market(f"rl.method={method}")
    for _ in range(2):  # warm-up, then SFT at the end of round 1
        market.step()
    policy = market.policy
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    market.step()  # the method's first step
    row = market.rows[-1]
    assert np.isfinite(row["train/loss"]) and row["train/step"] == 1
    changed = [name for name, p in policy.model.named_parameters() if not torch.equal(p, before[name])]
    assert sorted(changed) == sorted(before)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_is_deterministic_and_resumes_exactly(method):
    straight = tiny_market(f"rl.method={method}")
    for _ in range(5):
        straight.step()
    first = tiny_market(f"rl.method={method}")
    for _ in range(3):
        first.step()
    resumed = checkpoint.loads(checkpoint.dumps(first))
    for _ in range(2):
        resumed.step()
    assert json.dumps(resumed.rows) == json.dumps(straight.rows)
    assert resumed.train_rows[-1]["train/loss"] == straight.train_rows[-1]["train/loss"]


def test_sft_only_arm_never_steps_and_refits_on_schedule():
    market = tiny_market("rl.method=none", "policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, "
                         "hidden: 32, layers: 1, heads: 2, prompt_items: 4, beams: 12, sft_epochs: 3, sft_every: 2}")
    for _ in range(6):
        market.step()
    assert market.policy.trainer is None
    sft_rounds = [r["round"] for r in market.rows if "train/sft_loss" in r]
    # the warm start after round 1, then a refit every 2 rounds: (round + 1 - 2) % 2 == 0
    assert sft_rounds == [1, 3, 5]
    assert not any("train/loss" in r for r in market.rows)


@pytest.mark.parametrize("method", ["grpo", "flexrec", "flame", "blade"])
def test_only_listed_items_are_shown_after_items_leave(method):
    # providers whose exposure stays under the threshold for 1 round leave: items die from round 1
    market = tiny_market(f"rl.method={method}", "agents.items.exit_window=1", "agents.items.exit_threshold=0.9",
                         "agents.items.min_providers=2")
    seen = []
    for _ in range(6):
        market.step()
        seen.append((market.last_round["slates"].copy(), market.last_round["alive"].copy()))
    cat = market.world.catalogue
    dead = np.flatnonzero(~cat.alive[: cat.n])
    assert len(dead) > 0  # the case this test names: items have left the market
    # the policy served after the exits: its trie knows they are gone
    assert market.policy.ready and not market.policy.trie.alive[dead[dead < len(market.policy.trie.alive)]].any()
    assert len(seen) == 6
    for shown, alive in seen:
        assert (shown >= 0).any() and np.isin(shown[shown >= 0], alive).all()


def test_merge_ranked_keeps_the_head_then_new_tail_items():
    head = np.array([[3, 5, -1], [1, 2, 3]])
    tail = np.array([[5, 7, 3, 8], [3, 9, 1, 4]])
    # row 0: 3, 5, then 7 and 8 (5 and 3 repeat), padded; row 1: 1, 2, 3, then 9, 4
    np.testing.assert_array_equal(merge_ranked(head, tail, 5), [[3, 5, 7, 8, -1], [1, 2, 3, 9, 4]])


def test_trie_flows_equal_the_code_path_flows():
    from agorasim.policy.trie import CatalogueTrie

    codes = np.array([[1, 2], [1, 3], [4, 0], [0, 1]])
    trie = CatalogueTrie(codes, [5, 5], first_token=3, alive=np.array([True, True, True, False]))
    reward = np.array([6.0, 2.0, 2.0, 100.0])  # the dead item's reward must not count
    items = np.array([[0, 1], [2, 0]])
    got = trie_path_log_flows(trie, reward, items)
    want = path_log_flows(codes[:3], reward[:3], items.reshape(-1)).reshape(2, 2, 3)
    np.testing.assert_allclose(got, want)
    # A = (1, 2): log F = log 10, log 8 (prefix 1: A + B), log 6
    np.testing.assert_allclose(np.exp(got[0, 0]), [10.0, 8.0, 6.0])


def test_flame_lists_by_hand():
    class Cfg:
        class flame:
            task, edits = "add", 2

    method = Flame.__new__(Flame)
    method.config = Cfg
    base = np.array([[10, 11, 12, 13, 14, 15, 16, 17]])
    edits = np.array([[[20, 21]]])
    lists = method.lists(base, edits)
    assert lists.shape == (1, 1, 3, 10)
    assert lists[0, 0, 0].tolist() == [10, 11, 12, 13, 14, 15, 16, 17, -1, -1]
    assert lists[0, 0, 2].tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 20, 21]
    Cfg.flame.task = "remove"
    base = np.arange(12)[None]
    lists = method.lists(base, np.array([[[3, 0]]]))
    assert lists[0, 0, 1].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # 3 removed, 10 moves up
    assert lists[0, 0, 2].tolist() == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]


TINY_EXCLUDE = ("policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, hidden: 32, layers: 1, heads: 2, "
                "prompt_items: 4, beams: 12, sft_epochs: 3, exclude_history: true}")


@pytest.mark.parametrize("method", ["grpo", "flexrec", "flame"])
def test_exclude_history_never_serves_or_rolls_out_a_consumed_item(method):
    market = tiny_market(f"rl.method={method}", TINY_EXCLUDE, "rl.rollout=mixed")
    served = []
    original = market.policy.recommend

    def spy(request, rng):
        items, scores = original(request, rng)
        served.append((request.history.copy(), items.copy()))
        return items, scores

    market.policy.recommend = spy
    for _ in range(5):
        market.step()
    repeats = [((items[:, :, None] == history[:, None, :]) & (items[:, :, None] >= 0)).any() for history, items in served]
    assert market.policy.ready and not any(repeats[2:])  # rounds served by the model
    assert any((h >= 0).any() for h, _ in served[2:])  # users had histories to exclude
    # the same world without the exclusion does serve consumed items (the test can fail)
    plain = tiny_market(f"rl.method={method}", "rl.rollout=mixed")
    served.clear()
    original = plain.policy.recommend
    plain.policy.recommend = spy
    for _ in range(5):
        plain.step()
    assert any(((items[:, :, None] == history[:, None, :]) & (items[:, :, None] >= 0)).any() for history, items in served[2:])


def test_flexrec_need_switches_mid_run():
    market = tiny_market("rl.method=flexrec", "rl.flexrec.need=rel", "rl.flexrec.need_switch_round=4",
                         "rl.flexrec.need_after=niche")
    for _ in range(6):
        market.step()
    needs = {int(r["round"]): r["train/flexrec/need"] for r in market.train_rows if "train/flexrec/need" in r}
    # NEEDS = (rel, explore, trend, niche): rel (0) before round 4, niche (3) from it
    assert needs == {2: 0.0, 3: 0.0, 4: 3.0, 5: 3.0}
    policy = market.policy
    assert policy.method.suffix(policy, 1, 3)[0, 0] == policy.special_token("<rel>")
    assert policy.method.suffix(policy, 1, 4)[0, 0] == policy.special_token("<niche>")


def test_mixed_group_is_the_top_beams_then_samples_from_outside_them():
    from agorasim.rl.rollouts import item_rollout
    from agorasim.rl.trainer import Prompts

    market = tiny_market("rl.rollout=mixed", "rl.group_size=6")
    for _ in range(3):
        market.step()
    policy = market.policy
    users, history = np.arange(8), market.world.population.history[:8]
    prompts = Prompts(users, history, np.full(8, -1))
    rollout = item_rollout(policy.trainer, prompts, torch.Generator().manual_seed(0), 6, "mixed")
    beams, _ = policy.beam_search(history, 3)
    np.testing.assert_array_equal(rollout.items[:, :3], beams)  # the first half: the top beams, in order
    drawn = rollout.items[:, 3:]
    assert not (drawn[:, :, None] == beams[:, None, :]).any()  # the rest never repeats a top beam
    assert (drawn >= 0).all() and policy.trie.alive[drawn].all()
