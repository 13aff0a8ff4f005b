"""Chunks of a batch on Python threads (policy/threads.py) and the chunked loss pass (trie.token_logprobs)."""

import threading

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from agorasim.policy.threads import chunk_bounds, map_chunks, resolve_workers
from agorasim.policy.trie import token_logprobs
from agorasim.rl.rollouts import chunk_generators


def test_chunk_bounds_by_hand():
    assert chunk_bounds(7, 2) == [(0, 3), (3, 7)]
    assert chunk_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert chunk_bounds(5, 2, max_size=2) == [(0, 1), (1, 2), (2, 3), (3, 5)]  # 4 = 2 x 2: none over 2 rows
    assert chunk_bounds(721, 2, max_size=256) == [(0, 180), (180, 360), (360, 540), (540, 721)]
    assert chunk_bounds(1, 2) == [(0, 1)]  # fewer rows than chunks
    assert chunk_bounds(0, 2) == []
    assert chunk_bounds(600, 1, max_size=256) == [(0, 200), (200, 400), (400, 600)]


def test_resolve_workers():
    assert resolve_workers(3, 2) == 2  # never more threads than chunks
    assert resolve_workers(1, 4) == 1
    assert 1 <= resolve_workers(None, 2) <= 2


def test_map_chunks_keeps_order_and_the_callers_autograd_mode():
    seen = []

    def fn(start, stop):
        seen.append((threading.current_thread().name, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return list(range(start, stop))

    bounds = chunk_bounds(10, 4)
    with torch.no_grad():
        out = map_chunks(fn, bounds, workers=2)
    assert sum(out, []) == list(range(10))
    assert all(not grad and not inference for _, grad, inference in seen)
    assert any(name.startswith("agorasim-chunk") for name, _, _ in seen)  # it did run on the pool
    seen.clear()
    with torch.inference_mode():
        map_chunks(fn, bounds, workers=2)
    assert all(inference for _, _, inference in seen)
    seen.clear()
    map_chunks(fn, bounds, workers=2)
    assert all(grad for _, grad, _ in seen)


def test_map_chunks_inside_a_chunk_runs_in_place():
    """A chunk that maps chunks of its own must not wait on the pool it is running on."""
    def inner(start, stop):
        return threading.current_thread().name

    def outer(start, stop):
        return map_chunks(inner, [(0, 1), (1, 2)], workers=2)

    names = map_chunks(outer, [(0, 1), (1, 2)], workers=2)
    for pair in names:
        assert pair[0] == pair[1]  # both inner chunks on the outer chunk's own thread


def tiny_model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).train()


def batch(prompts=7, width=9, group=4, depth=3):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (prompts, width), generator=generator)
    mask = torch.ones(prompts, width, dtype=torch.long)
    mask[:3, :2] = 0  # left padding on a few rows
    ids[mask == 0] = 0
    paths = torch.randint(3, 50, (prompts * group, depth), generator=generator)
    return ids, mask, paths


def gradients(model, chunks, workers):
    """Log-probs, entropies and parameter gradients of a loss that couples rows across chunks
    (a position-weighted mean plus the standard deviation over all tokens)."""
    ids, mask, paths = batch()
    model.zero_grad(set_to_none=True)
    logp, entropy = token_logprobs(model, ids, mask, paths, return_entropy=True, chunks=chunks, workers=workers)
    weights = torch.linspace(0, 1, logp.numel()).view_as(logp)
    loss = -(logp * weights).mean() + logp.std()
    loss.backward()
    return logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]


def test_chunked_loss_pass_equals_one_pass():
    model = tiny_model()
    one = gradients(model, 1, 1)
    two = gradients(model, 2, 2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # values: each row computed alone
    for a, b in zip(one[2], two[2]):  # gradients: summed chunk by chunk, so only rounding differs
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not two[1].requires_grad  # the entropy is a statistic


def test_chunked_gradients_do_not_depend_on_the_threads():
    model = tiny_model()
    serial, threaded = gradients(model, 3, 1), gradients(model, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(serial[2], threaded[2]))


def test_chunked_pass_with_the_log_softmax_and_without_gradients():
    model = tiny_model()
    ids, mask, paths = batch()
    model.zero_grad(set_to_none=True)
    logp, full = token_logprobs(model, ids, mask, paths, return_log_softmax=True, chunks=2, workers=2)
    (full[..., 5].sum() + logp.sum()).backward()  # gradient through both outputs
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logp1, full1 = token_logprobs(model, ids, mask, paths, return_log_softmax=True)
    (full1[..., 5].sum() + logp1.sum()).backward()
    for a, b in zip(chunked, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(token_logprobs(model, ids, mask, paths, chunks=2, workers=2), logp1.detach())


def test_chunk_generators():
    g = torch.Generator().manual_seed(3)
    assert chunk_generators(g, 1) == [g]  # one chunk: the step's own stream, as before chunks
    first = [c.initial_seed() for c in chunk_generators(torch.Generator().manual_seed(3), 2)]
    again = [c.initial_seed() for c in chunk_generators(torch.Generator().manual_seed(3), 2)]
    assert first == again and first[0] != first[1]
    draws = [torch.rand(2, generator=c) for c in chunk_generators(torch.Generator().manual_seed(3), 2)]
    assert not torch.equal(draws[0], draws[1])


@pytest.fixture(scope="module")
def served_policy():
    """The cold-start market's generative policy after its warm-up and SFT (small world)."""
    from agorasim.config import build_config
    from agorasim.env.market import Market
    from agorasim.scenarios import load_scenario

    config = build_config(load_scenario("cold-start"), [
        "market.n_users=300", "market.n_items=200", "market.n_providers=20", "market.new_users_per_round=0",
        "policy.params={warmup_rounds: 2, sft_epochs: 1}", "rl.method=none", "run.progress=false"])
    market = Market(config)
    for _ in range(3):
        market.step()
    return market.policy, market.world.catalogue.alive_ids()


def test_chunked_serving_gives_each_prompt_its_own_beams(served_policy):
    policy, alive = served_policy
    history = np.random.default_rng(0).choice(alive, (9, 10))
    history[:3, :4] = -1
    chunks, workers = policy.chunks, policy.chunk_workers
    try:
        policy.chunks, policy.chunk_workers = 1, 1
        one_items, one_scores = policy.beam_search(history, 6)
        policy.chunks, policy.chunk_workers = 3, 2
        items, scores = policy.beam_search(history, 6)
    finally:
        policy.chunks, policy.chunk_workers = chunks, workers
    assert np.array_equal(items, one_items)
    np.testing.assert_allclose(scores, one_scores, rtol=1e-6)
