"""MindRec: the hand trace of ALGORITHMS.md section 7, non-items under the paper's decoder, the
masked objective, the Policy contract, the market (slates, GRPO over the trajectory, resume)."""

import json
import math

import numpy as np
import pytest
import torch

from agorasim.cli import main
from agorasim.config import build_config
from agorasim.env.conformance import check_policy
from agorasim.env.market import Market
from agorasim.errors import UserInputError
from agorasim.policy import parse_policy_params, threads
from agorasim.policy.mindrec import (
    MASK,
    PAD,
    ItemSpace,
    MindRecPolicy,
    build_encoder,
    child_index_codes,
    diffusion_beam_search,
    masked_diffusion_loss,
)
from agorasim.run import checkpoint
from agorasim.scenarios import load_scenario

X, Y, U, V = 4, 5, 6, 7  # vocabulary ids of the hand example (0-3 are PAD, BOS, SEP, MASK)


def table_model(p1: dict, p2: dict):
    """A fake denoiser with fixed per-position probabilities, whatever the partial span."""
    table = torch.full((2, 8), -1e9)
    for token, p in p1.items():
        table[0, token] = math.log(p)
    for token, p in p2.items():
        table[1, token] = math.log(p)
    return lambda partial: table[None, None].expand(partial.shape[0], partial.shape[1], -1, -1)


HAND = table_model({X: .6, Y: .4}, {U: .9, V: .1})


def test_hand_trace_of_section_7():
    # one beam, no category, SID p1 = {x: .6, y: .4}, p2 = {u: .9, v: .1}, B = 2
    space = ItemSpace(np.array([[X, U], [X, V], [Y, U], [Y, V]]), 0, 8)
    decoded = diffusion_beam_search(HAND, 1, space, beams=2)
    assert decoded.sequences[0].tolist() == [[X, U], [Y, U]]
    assert np.allclose(np.exp(decoded.scores[0]), [.54, .36])
    # step 1 kept [_, u] (.9) and [x, _] (.6): both final beams had position 2 filled first
    # ([x, u] is reached both ways; the copy through [_, u] comes first in the ranked candidates)
    assert decoded.first_position[0].tolist() == [1, 1]
    assert decoded.fill_order[0, 1].tolist() == [1, 0]
    assert decoded.items[0].tolist() == [0, 2] and not decoded.invalid.any()


def test_step_one_keeps_u_then_x():
    space = ItemSpace(np.array([[X, U], [X, V], [Y, U], [Y, V]]), 0, 8)
    seen = []

    def model(partial):
        seen.append(partial.clone())
        return HAND(partial)

    diffusion_beam_search(model, 1, space, beams=2)
    assert seen[1][0].tolist() == [[-1, U], [X, -1]]  # the state after step 1, best first


def test_overlap_penalty_changes_the_kept_beams():
    # p1 = {x: .5, y: .45}, p2 = {u: .4, v: .35}: step 1 keeps [x,_] and [y,_]; by raw score
    # [x,u] .2 and [y,u] .18; with the penalty [y,u] (shares u with [x,u]: .18 (1 - log 1.5) = .107)
    # loses to [y,v] .1575 (shares nothing)
    model = table_model({X: .5, Y: .45}, {U: .4, V: .35})
    space = ItemSpace(np.array([[X, U], [X, V], [Y, U], [Y, V]]), 0, 8)
    plain = diffusion_beam_search(model, 1, space, beams=2, penalty=False)
    penalised = diffusion_beam_search(model, 1, space, beams=2)
    assert plain.sequences[0].tolist() == [[X, U], [Y, U]]
    assert penalised.sequences[0].tolist() == [[X, U], [Y, V]]
    assert np.allclose(np.exp(penalised.scores[0]), [.2, .1575])  # the raw scores are kept


def test_paper_decoder_produces_a_non_item_and_trie_consistent_never_does():
    space = ItemSpace(np.array([[X, U], [Y, V]]), 0, 8)  # [y, u] is not an item
    faithful = diffusion_beam_search(HAND, 1, space, beams=2, mode="faithful")
    assert faithful.sequences[0].tolist() == [[X, U], [Y, U]]
    assert faithful.items[0].tolist() == [0, -1] and faithful.invalid.sum() == 1
    trie = diffusion_beam_search(HAND, 1, space, beams=2, mode="trie")
    # step 1 keeps [_,u] and [x,_]; both can only become [x,u]: one beam, no non-item
    assert trie.items[0].tolist() == [0, -1] and not trie.invalid.any()
    assert np.allclose(np.exp(trie.scores[0]), [.54, 0.0])


def test_trie_mode_never_emits_a_non_item_on_random_models():
    rng = np.random.default_rng(0)
    cats, _ = child_index_codes(rng.integers(0, 3, (40, 2)))
    sid = rng.permutation(np.array([[a, b] for a in range(6) for b in range(7)]))[:40]
    tokens = np.concatenate([cats + [[4, 7]], sid + [[10, 16]]], 1)
    space = ItemSpace(tokens, 2, 23, alive=rng.random(40) < .7)
    for seed in range(3):
        logits = torch.randn(5, 1, 4, 23, generator=torch.Generator().manual_seed(seed))
        model = lambda partial, z=logits: torch.log_softmax(z, -1).expand(-1, partial.shape[1], -1, -1)  # noqa: E731
        trie = diffusion_beam_search(model, 5, space, beams=6, mode="trie")
        real = np.isfinite(trie.scores)
        assert (trie.items[real] >= 0).all() and space.alive[trie.items[real]].all()
        faithful = diffusion_beam_search(model, 5, space, beams=6, mode="faithful")
        assert faithful.invalid.sum() == (np.isfinite(faithful.scores) & (faithful.items < 0)).sum()


def test_category_tree_codes_are_child_indices():
    codes, sizes = child_index_codes(np.array([[5, 50], [5, 51], [7, 50], [5, 50], [7, 70]]))
    assert codes.tolist() == [[0, 0], [0, 1], [1, 0], [0, 0], [1, 1]] and sizes == [2, 2]


def test_masked_objective_at_full_mask_is_the_mean_cross_entropy():
    model = build_encoder(12, 16, 1, 2, 16, seed=0)
    prompt = torch.tensor([[0, 1, 5, 6, 2], [1, 7, 8, 9, 2]])
    target = torch.tensor([[4, 10, 11], [5, 10, 6]])
    loss = masked_diffusion_loss(model, prompt, target, eps=1.0, generator=torch.Generator().manual_seed(0))
    logits = model(torch.cat([prompt, torch.full_like(target, MASK)], 1))[:, -3:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(6, -1), target.reshape(-1))
    assert torch.allclose(loss, expected)


def test_bad_values_are_one_line_errors():
    with pytest.raises(ValueError, match="mode"):
        parse_policy_params("mindrec", {"mode": "beam"})
    with pytest.raises(ValueError, match="history_attention"):
        parse_policy_params("mindrec", {"history_attention": "causal"})
    with pytest.raises(UserInputError, match="history_attention"):
        MindRecPolicy(history_attention="causal")
    with pytest.raises(ValueError, match="rl.method must be none or grpo"):
        MindRecPolicy(rl={"method": "ugr"})


def test_cli_exit_status_2_on_a_bad_mode(tmp_path, capsys):
    code = main(["run", "--scenario", "cold-start", "--out", str(tmp_path), "--set", "policy.name=mindrec",
                 "--set", "policy.params={mode: beam}"])
    err = capsys.readouterr().err
    assert code == 2 and "mode" in err and err.count("\n") == 1 and "Traceback" not in err


TINY = dict(warmup_rounds=2, levels=2, codebook_size=8, hidden=32, layers=1, heads=2, prompt_items=4, beams=6,
            sft_epochs=2, sft_batch=64)


@pytest.mark.parametrize("mode, method, attention", [("faithful", "grpo", "full"), ("trie", "none", "full"),
                                                     ("trie", "grpo", "prefix")])
def test_mindrec_passes_the_policy_contract(mode, method, attention):
    metrics = check_policy(MindRecPolicy(**TINY, mode=mode, history_attention=attention,
                                         rl={"method": method, "group_size": 4, "users_per_step": 8}),
                           rounds=3, from_candidates=False)
    assert "train/sft_loss" in metrics[1]
    assert ("train/loss" in metrics[2]) == (method == "grpo")
    assert "train/mindrec/invalid_share" in metrics[2]


def prefix_reference(model, ids: torch.Tensor, span: int) -> torch.Tensor:
    """Span logits of full rows under prefix attention, through ``nn.MultiheadAttention`` with a mask:
    a prompt position sees the prompt's real tokens only, a span position every real token."""
    t = ids.shape[1]
    blocked = torch.zeros(len(ids), t, t, dtype=torch.bool)
    blocked[:, : t - span, t - span:] = True  # the prompt does not see the span
    blocked |= (ids == PAD)[:, None, :]  # padding keys
    heads = model.blocks[0].attention.num_heads
    x = model.tokens(ids) + model.positions.weight[:t][None]
    for block in model.blocks:
        h = block.norm1(x)
        x = x + block.attention(h, h, h, attn_mask=blocked.repeat_interleave(heads, 0), need_weights=False)[0]
        x = x + block.ffn(block.norm2(x))
    return model.norm(x[:, -span:]) @ model.tokens.weight.T


def test_prefix_attention_caches_the_history_exactly():
    model = build_encoder(14, 16, 2, 2, 16, seed=3, prefix_attention=True)
    prompt = torch.tensor([[0, 0, 1, 5, 6, 2], [1, 7, 8, 9, 12, 2]])
    spans = torch.tensor([[[4, MASK, 11], [MASK, MASK, MASK]], [[5, 10, 6], [13, MASK, 6]]])  # (R=2, K=2, S=3)
    cached = model.span_logits(model.encode_prefix(prompt), spans)
    rows = torch.cat([prompt.repeat_interleave(2, 0), spans.reshape(4, 3)], 1)
    reference = prefix_reference(model, rows, 3).view(2, 2, 3, -1)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(rows, span=3), reference.reshape(4, 3, -1), atol=1e-5, rtol=1e-5)
    # the history does not see the span: changing a span leaves the other beam's logits alone
    other = spans.clone()
    other[0, 1] = torch.tensor([4, 4, 4])
    again = model.span_logits(model.encode_prefix(prompt), other)
    torch.testing.assert_close(again[0, 0], cached[0, 0])
    assert not torch.allclose(again[0, 1], cached[0, 1])
    # full attention differs (the history attends to the span there)
    full = build_encoder(14, 16, 2, 2, 16, seed=3)
    assert not torch.allclose(full(rows, span=3), reference.reshape(4, 3, -1), atol=1e-4)
    torch.testing.assert_close(full(rows, span=3), full(rows)[:, -3:])


@pytest.mark.parametrize("attention", ["full", "prefix"])
def test_trajectory_logprobs_sum_to_the_beam_score(attention):
    policy = MindRecPolicy(**TINY, history_attention=attention)
    rng = np.random.default_rng(0)
    ids_codes = np.array([[a, b, 0] for a in range(5) for b in range(6)])
    from agorasim.policy.semantic_ids import SemanticIds

    ids = SemanticIds(levels=2, codebook_size=8)
    ids.level_sizes = [8, 8, 1]
    ids.codes = ids_codes
    policy.setup(rng.integers(0, 3, (30, 2)), [3, 3], ids, ids_codes, None, seed=0)
    history = rng.integers(-1, 30, (4, 4))
    decoded = policy.decode(history, 3, mode="trie")
    prompt = policy.prompts(history)
    assert policy.model.prefix_attention == (attention == "prefix")
    logp = policy.trajectory_logprobs(policy.model, prompt, torch.as_tensor(decoded.sequences.reshape(12, -1)),
                                      torch.as_tensor(decoded.fill_order.reshape(12, -1)))
    assert np.allclose(logp.sum(1).detach().numpy(), decoded.scores.reshape(-1), atol=1e-4)


def tiny_market(*extra):
    overrides = ["market.n_users=200", "market.n_items=120", "market.n_providers=10", "agents.users.activity=0.4",
                 "market.new_items_per_round=2", "market.new_users_per_round=2", "run.progress=false",
                 "policy.name=mindrec", "rl.users_per_step=16", "rl.group_size=4", "run.eval_users=16",
                 "policy.params={warmup_rounds: 2, levels: 2, codebook_size: 16, hidden: 32, layers: 1, "
                 "heads: 2, prompt_items: 4, beams: 8, sft_epochs: 3}"]
    return Market(build_config(load_scenario("cold-start"), overrides + list(extra)))


def test_market_slates_are_listed_items_and_grpo_moves_every_parameter():
    market = tiny_market("agents.items.exit_window=1", "agents.items.exit_threshold=0.9",
                         "agents.items.min_providers=2")
    for _ in range(2):
        market.step()
    policy = market.policy
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    for _ in range(2):
        market.step()
        shown, alive = market.last_round["slates"], market.last_round["alive"]
        assert (shown >= 0).any() and np.isin(shown[shown >= 0], alive).all()
    row = market.rows[-1]
    assert "train/loss" in row and "train/mindrec/invalid_share" in row and "train/mindrec/first_filled_1" in row
    changed = [n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(before)


def test_invalid_outputs_are_replaced_by_listed_items_not_in_the_row():
    policy = MindRecPolicy(**TINY)
    policy.space = ItemSpace(np.array([[X, U], [Y, V], [X, V]]), 0, 8, alive=np.array([True, True, False]))
    decoded = diffusion_beam_search(HAND, 1, policy.space, beams=2)
    assert decoded.items[0].tolist() == [0, -1]  # [y, u]: not an item
    items, scores = policy.valid_slate(decoded)
    assert items[0].tolist() == [0, 1] and np.isfinite(scores).all()  # [y, v] shares y; [x, v] is unlisted


def test_market_run_is_deterministic_and_resumable():
    straight = tiny_market("policy.params.mode=trie")
    assert straight.policy.mode == "trie"
    for _ in range(4):
        straight.step()
    first = tiny_market("policy.params.mode=trie")
    for _ in range(3):
        first.step()
    resumed = checkpoint.loads(checkpoint.dumps(first))
    resumed.step()
    assert json.dumps(resumed.rows) == json.dumps(straight.rows)


@pytest.mark.slow  # title embeddings (cached after the first run), then tiny models
def test_offline_eval_reports_the_mindrec_arms_deterministically(tmp_path):
    from agorasim.run.offline import evaluate

    tiny = dict(quick=True, progress=False, valid_rows=30, test_rows=30, train_users=100, methods=[], mindrec=True,
                beams=10)
    a = evaluate(out_dir=tmp_path / "a", seed=1, **tiny)
    b = evaluate(out_dir=tmp_path / "b", seed=1, **tiny)
    for arm in ("mindrec_faithful", "mindrec_trie", "mindrec_l2r"):
        assert 0 <= a[f"{arm}/test/hr@1"] <= a[f"{arm}/test/hr@10"] <= 1
        assert f"info/{arm}/test_ndcg@10_gain_se" in a
    assert a["info/mindrec_trie/invalid_share"] == 0 and a["info/mindrec_l2r/invalid_share"] == 0
    assert 0 <= a["info/mindrec_faithful/invalid_share"] <= 1
    assert "mindrec_faithful" in (tmp_path / "a" / "offline.md").read_text()
    drop = {"info/time/seconds"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    # prefix attention, 3 epochs scored every 2: epochs 2 and 3 are the candidates, a model of its own
    c = evaluate(out_dir=tmp_path / "c", seed=1, mindrec_attention="prefix", mindrec_epochs=3, mindrec_eval_every=2,
                 **tiny)
    assert c["info/mindrec/epoch"] in (2.0, 3.0)
    assert c["info/mindrec_faithful/invalid_share"] != a["info/mindrec_faithful/invalid_share"] or any(
        c[f"mindrec_trie/test/{m}"] != a[f"mindrec_trie/test/{m}"] for m in ("hr@10", "ndcg@10"))
    assert "mindrec_attention=prefix" in (tmp_path / "c" / "offline.md").read_text()


@pytest.mark.parametrize("attention", ["full", "prefix"])
def test_chunked_decoding_equals_one_pass(attention):
    """The diffusion beam search of a trained policy gives every prompt the same beams, scores and
    fill orders whether its batch is decoded in one pass, in three chunks on two threads, or in
    chunks of 7 prompts; a checkpoint from before the setting decodes in one pass; chunks and
    chunk_workers below 1 are one-line errors."""
    market = tiny_market(f"policy.params.history_attention={attention}")
    for _ in range(3):
        market.step()
    policy = market.policy
    assert policy.ready and policy.chunking() == {"chunks": 2, "workers": min(2, threads.available_cpus())}
    history = np.random.default_rng(0).choice(market.world.catalogue.alive_ids(), (29, 4))
    decoded = {}
    for chunks, workers, size in [(1, 1, 128), (3, 2, 128), (2, 2, 7)]:
        policy.chunks, policy.chunk_workers = chunks, workers
        decoded[(chunks, size)] = policy.decode(history, 8, chunk=size)
    one = decoded[(1, 128)]
    assert np.isfinite(one.scores).all() and len({tuple(r) for r in one.items.tolist()}) > 1
    for other in decoded.values():
        for field in ("sequences", "scores", "items", "fill_order", "first_position"):
            np.testing.assert_array_equal(getattr(other, field), getattr(one, field))
    state = {k: v for k, v in policy.__getstate__().items() if k not in ("chunks", "chunk_workers")}
    old = MindRecPolicy.__new__(MindRecPolicy)  # a checkpoint written before the setting existed
    old.__dict__.update(state)
    assert old.chunking() == {"chunks": 1, "workers": 1}
    for name in ("chunks", "chunk_workers"):
        with pytest.raises(ValueError, match=name):
            parse_policy_params("mindrec", {name: 0})
        with pytest.raises(UserInputError, match=name):
            MindRecPolicy(**{name: 0})
