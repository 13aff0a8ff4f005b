"""Constrained decoding over the catalogue trie against a plain reference and transformers' generate."""

import pickle

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from agorasim.policy.semantic_ids import SemanticIds
from agorasim.policy.trie import CatalogueTrie, reference_beam_search, token_logprobs

FIRST = 3  # tokens 0..2: pad, bos, sep
SIZES = [4, 4, 4]  # two levels of 4 codes + a de-duplication level of 4


def catalogue(n_items: int = 40, seed: int = 0) -> np.ndarray:
    """``n_items`` distinct paths of the 4x4x4 grid, in shuffled item order (ragged branching)."""
    rng = np.random.default_rng(seed)
    grid = np.array([(a, b, c) for a in range(4) for b in range(4) for c in range(4)])
    return grid[rng.choice(len(grid), n_items, replace=False)]


def tiny_model(kind: str = "qwen2", vocab: int = FIRST + sum(SIZES), seed: int = 0):
    torch.manual_seed(seed)
    # initializer_range 0.3: a peaked next-token distribution, so no two beams are within float noise
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind.startswith("qwen2"):
        config = Qwen2Config(**common)
        # eager attention takes the tree mask in additive form, sdpa (the default) in boolean form
        config._attn_implementation = "eager" if kind == "qwen2-eager" else "sdpa"
        return Qwen2ForCausalLM(config).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def prompts(batch: int = 4, width: int = 10, vocab: int = FIRST + sum(SIZES), seed: int = 0):
    """Left-padded random prompts; row b has ``2 * b`` padding tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(FIRST, vocab, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    for b in range(batch):
        mask[b, :min(2 * b, width - 1)] = 0
    return input_ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from a second intra-op thread, and on a busy 2-core machine
    OpenMP's spinning threads slow them down 20x; results do not depend on the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2")


def walk(trie: CatalogueTrie, path) -> int:
    """Follow ``path`` from the root through the child tables; -1 if it leaves the trie."""
    prefix = torch.zeros(1, dtype=torch.long)
    for level, code in enumerate(path):
        prefix = trie.children(level, prefix)[:, code]
    return int(prefix)


# ---------------------------------------------------------------- tables

@pytest.mark.parametrize("dense_limit", [0, 1 << 20])
def test_tables_reach_exactly_the_alive_items(dense_limit):
    codes = catalogue()
    alive = np.random.default_rng(1).random(len(codes)) < 0.7
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=dense_limit)
    assert all(trie.is_dense(level) == (dense_limit > 0) for level in range(3))
    for item, path in enumerate(codes):
        assert walk(trie, path) == (item if alive[item] else -1)
    assert trie.n_prefixes[0] == 1
    assert trie.n_prefixes[1] == len(np.unique(codes[alive, :1], axis=0))
    assert trie.n_prefixes[2] == len(np.unique(codes[alive, :2], axis=0))
    assert (trie.children(1, torch.tensor([-1])) == -1).all()  # a dead beam has no children


def test_dense_and_csr_tables_agree():
    codes = catalogue(50, seed=2)
    dense, csr = CatalogueTrie(codes, SIZES, FIRST), CatalogueTrie(codes, SIZES, FIRST, dense_limit=0)
    for level in range(3):
        prefixes = torch.arange(-1, dense.n_prefixes[level])
        torch.testing.assert_close(dense.children(level, prefixes), csr.children(level, prefixes))


def test_bad_catalogues_are_explained():
    codes = catalogue()
    with pytest.raises(ValueError, match="unique"):
        CatalogueTrie(np.concatenate([codes, codes[:1]]), SIZES, FIRST)
    with pytest.raises(ValueError, match="level_sizes"):
        CatalogueTrie(codes + 4, SIZES, FIRST)
    trie = CatalogueTrie(codes, SIZES, FIRST)
    input_ids, mask = prompts()
    right_padded = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        trie.beam_search(tiny_model(), input_ids, right_padded, 3)


# ---------------------------------------------------------------- beam search

@pytest.mark.parametrize("kind", ["qwen2", "qwen2-eager", "llama"])
@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("beams", [1, 5, 12])
def test_beam_search_equals_reference(kind, shared_prompt, beams):
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=0 if beams == 5 else 1 << 20)
    model = tiny_model(kind)
    input_ids, mask = prompts()
    items, scores = trie.beam_search(model, input_ids, mask, beams, shared_prompt=shared_prompt)
    ref_items, ref_scores = reference_beam_search(model, input_ids, mask, trie, beams)
    torch.testing.assert_close(items, ref_items)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert alive[items.numpy()].all() and (items >= 0).all()
    assert all(len(set(row)) == beams for row in items.tolist())  # distinct items per prompt
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


def test_beam_search_on_semantic_ids_equals_reference(qwen):
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    ids = SemanticIds(levels=2, codebook_size=8)
    codes = ids.fit(x, seed=0)
    model = tiny_model(vocab=FIRST + sum(ids.level_sizes))
    trie = CatalogueTrie(codes, ids.level_sizes, FIRST)
    input_ids, mask = prompts(vocab=FIRST + sum(ids.level_sizes))
    items, scores = trie.beam_search(model, input_ids, mask, 6)
    ref_items, ref_scores = reference_beam_search(model, input_ids, mask, trie, 6)
    torch.testing.assert_close(items, ref_items)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_fewer_items_than_beams_are_padded(qwen):
    codes = catalogue()
    alive = np.zeros(len(codes), bool)
    alive[[3, 17, 30]] = True
    trie = CatalogueTrie(codes, SIZES, FIRST, alive)
    input_ids, mask = prompts()
    items, scores = trie.beam_search(qwen, input_ids, mask, 5)
    assert (items[:, 3:] == -1).all() and torch.isneginf(scores[:, 3:]).all()
    assert all(sorted(row[:3]) == [3, 17, 30] for row in items.tolist())
    ref_items, ref_scores = reference_beam_search(qwen, input_ids, mask, trie, 5)
    torch.testing.assert_close(items, ref_items)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    trie.update_alive(np.zeros(len(codes), bool))  # an empty market: only padding
    items, scores = trie.beam_search(qwen, input_ids, mask, 2)
    assert (items == -1).all() and torch.isneginf(scores).all()


def test_dead_items_are_never_produced_after_update_alive(qwen):
    codes = catalogue()
    trie = CatalogueTrie(codes, SIZES, FIRST)
    input_ids, mask = prompts()
    before, _ = trie.beam_search(qwen, input_ids, mask, 8)
    alive = np.ones(len(codes), bool)
    alive[np.unique(before[:, :4].numpy())] = False  # the favourites leave the market
    trie.update_alive(alive)
    after, _ = trie.beam_search(qwen, input_ids, mask, 8)
    assert alive[after.numpy()].all()
    items, _, _ = trie.sample(qwen, input_ids, mask, 200, 1.5, torch.Generator().manual_seed(0))
    assert alive[items.numpy()].all()


def test_equals_transformers_generate_with_prefix_allowed_tokens_fn(qwen):
    # G <= 4 codes at level 0: with more beams than first codes, transformers keeps extra copies
    # of the prompt beam at score -1e9 instead of dead beams, so only the valid part would compare
    hf_logging.set_verbosity_error()
    codes = catalogue()
    alive = np.random.default_rng(4).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive)
    input_ids, mask = prompts(batch=5, seed=1)
    beams, width = 4, input_ids.shape[1]
    out = qwen.generate(input_ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams,
                        do_sample=False, max_new_tokens=trie.depth,
                        prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(width),
                        length_penalty=0.0, early_stopping=True, output_scores=True,
                        return_dict_in_generate=True, pad_token_id=0, eos_token_id=2)
    item_of = {tuple(p): i for i, p in enumerate(trie.item_tokens(np.arange(len(codes))).tolist())}
    hf_items = torch.tensor([item_of[tuple(p)] for p in out.sequences[:, width:].tolist()]).view(5, beams)
    items, scores = trie.beam_search(qwen, input_ids, mask, beams)
    torch.testing.assert_close(items, hf_items)  # same items, same order
    torch.testing.assert_close(scores, out.sequences_scores.view(5, beams), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- teacher forcing

def test_token_logprobs_sum_to_beam_scores_and_carry_gradients(qwen):
    codes = catalogue()
    trie = CatalogueTrie(codes, SIZES, FIRST)
    input_ids, mask = prompts()
    items, scores = trie.beam_search(qwen, input_ids, mask, 6)
    paths = torch.from_numpy(trie.item_tokens(items.numpy())).reshape(-1, 3)
    logp = token_logprobs(qwen, input_ids, mask, paths)  # (B, T) prompts shared by groups of 6 paths
    assert logp.shape == (24, 3) and (logp <= 0).all()
    torch.testing.assert_close(logp.sum(1).view(4, 6), scores, rtol=1e-5, atol=1e-5)
    same, entropy = trie.token_logprobs(qwen, input_ids.repeat_interleave(6, 0), mask.repeat_interleave(6, 0),
                                        paths, return_entropy=True)
    torch.testing.assert_close(same, logp)
    assert entropy.shape == (24, 3) and (entropy > 0).all()
    qwen.zero_grad()
    (-logp.mean()).backward()
    assert all(p.grad is not None for p in qwen.parameters())
    qwen.zero_grad()


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-eager", "llama"])
@pytest.mark.parametrize("depth", [1, 3])
def test_a_group_of_paths_shares_its_prompt_with_the_same_values_and_gradients(kind, depth):
    """The prompt runs once per group (its KV cache repeated for the group's paths): the
    log-probs, entropies and every parameter's gradient equal those of N expanded copies."""
    model = tiny_model(kind).train()
    input_ids, mask = prompts()
    paths = torch.from_numpy(catalogue(24, seed=1)[:, :depth] + FIRST + np.arange(depth) * 4)  # 6 paths a prompt

    def run(ids, m, **kwargs):
        model.zero_grad()
        logp, entropy = token_logprobs(model, ids, m, paths, return_entropy=True, **kwargs)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().add(entropy.mean()).backward()
        return logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]

    shared = run(input_ids, mask)
    expanded = run(input_ids.repeat_interleave(6, 0), mask.repeat_interleave(6, 0))
    unshared = run(input_ids, mask, shared_prompt=False)
    for x, y in zip([unshared[0], unshared[1], *unshared[2]], [expanded[0], expanded[1], *expanded[2]]):
        assert torch.equal(x, y)  # the reference layout is the expanded copies exactly
    torch.testing.assert_close(shared[0], expanded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], expanded[1], rtol=1e-5, atol=1e-5)
    assert any(g.abs().max() > 0 for g in expanded[2])
    for a, b in zip(shared[2], expanded[2]):  # float32 sums in another order: close to each tensor's scale
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


# ---------------------------------------------------------------- sampling

def exact_item_probabilities(model, prompt: torch.Tensor, trie: CatalogueTrie, temperature: float):
    """P(item) under constrained ancestral sampling: per level, softmax(logp / T) over allowed codes."""
    probs = {}
    alive_paths = {tuple(trie.codes[i]): i for i in np.flatnonzero(trie.alive)}

    def visit(path, p):
        if len(path) == trie.depth:
            probs[alive_paths[path]] = p
            return
        allowed = sorted({q[len(path)] for q in alive_paths if q[:len(path)] == path})
        tokens = torch.tensor([int(trie.offsets[lv]) + c for lv, c in enumerate(path)], dtype=torch.long)
        logits = model(input_ids=torch.cat([prompt, tokens])[None]).logits[0, -1]
        logp = torch.log_softmax(logits.double(), -1)[[int(trie.offsets[len(path)]) + c for c in allowed]]
        for code, q in zip(allowed, torch.softmax(logp / temperature, 0).tolist()):
            visit(path + (code,), p * q)

    with torch.no_grad():
        visit((), 1.0)
    return probs


def test_sampling_follows_the_constrained_distribution(qwen):
    codes = catalogue()
    alive = np.random.default_rng(5).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive)
    input_ids, mask = prompts(batch=2)
    n, temperature = 4000, 1.5
    items, logprobs, tokens = trie.sample(qwen, input_ids, mask, n, temperature, torch.Generator().manual_seed(0))
    assert alive[items.numpy()].all()
    np.testing.assert_array_equal(tokens.numpy(), trie.item_tokens(items.numpy()))
    exact = exact_item_probabilities(qwen, input_ids[1][mask[1].bool()], trie, temperature)
    counts = np.bincount(items[1].numpy(), minlength=len(codes)) / n
    total_variation = 0.5 * sum(abs(counts[i] - exact.get(i, 0.0)) for i in range(len(codes)))
    assert total_variation < 0.05
    # log-probs are the model's (temperature 1, full vocabulary), as token_logprobs computes them
    some = tokens[:, :100].reshape(-1, 3)
    logp = token_logprobs(qwen, input_ids, mask, some).sum(1).view(2, 100)
    torch.testing.assert_close(logprobs[:, :100], logp.detach(), rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_from_the_generator(qwen):
    trie = CatalogueTrie(catalogue(), SIZES, FIRST)
    input_ids, mask = prompts()
    draw = [trie.sample(qwen, input_ids, mask, 30, 1.0, torch.Generator().manual_seed(11), shared_prompt=s)
            for s in (True, True, False)]
    torch.testing.assert_close(draw[0][0], draw[1][0])
    torch.testing.assert_close(draw[0][0], draw[2][0])  # both layouts draw the same noise in the same order
    with pytest.raises(ValueError, match="temperature"):
        trie.sample(qwen, input_ids, mask, 3, 0.0)


def test_trie_pickles(qwen):
    trie = CatalogueTrie(catalogue(), SIZES, FIRST, dense_limit=16)
    clone = pickle.loads(pickle.dumps(trie))
    input_ids, mask = prompts()
    torch.testing.assert_close(trie.beam_search(qwen, input_ids, mask, 3), clone.beam_search(qwen, input_ids, mask, 3))


# ---------------------------------------------------------------- per-prompt item masks

def random_item_mask(n_prompts: int, n_items: int, p: float = 0.5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n_prompts, n_items)) < p)


def edge_case_mask(alive: np.ndarray, n_prompts: int = 4) -> tuple[torch.Tensor, list[int]]:
    """Row 0 allows nothing, row 1 two alive items, row 2 only dead items, the others half the catalogue."""
    mask = random_item_mask(n_prompts, len(alive), seed=6)
    mask[0] = False
    two = [int(i) for i in np.flatnonzero(alive)[[2, 9]]]
    mask[1] = False
    mask[1, two] = True
    mask[2] = torch.from_numpy(~alive)
    return mask, two


@pytest.mark.parametrize("dense_limit", [0, 1 << 20])
@pytest.mark.parametrize("shared_prompt", [True, False])
def test_item_mask_restricts_beams_and_samples(qwen, dense_limit, shared_prompt):
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=dense_limit)
    assert all(trie.is_dense(level) == (dense_limit > 0) for level in range(3))
    input_ids, mask = prompts()
    item_mask = random_item_mask(4, len(codes), p=0.4)
    allowed = item_mask.numpy() & alive
    items, scores = trie.beam_search(qwen, input_ids, mask, 6, shared_prompt=shared_prompt, item_mask=item_mask)
    assert (items >= 0).all() and torch.isfinite(scores).all()
    assert all(allowed[b, items[b].numpy()].all() for b in range(4))
    items, logprobs, tokens = trie.sample(qwen, input_ids, mask, 50, 1.5, torch.Generator().manual_seed(0),
                                          shared_prompt=shared_prompt, item_mask=item_mask)
    assert (items >= 0).all() and torch.isfinite(logprobs).all()
    assert all(allowed[b, items[b].numpy()].all() for b in range(4))
    np.testing.assert_array_equal(tokens.numpy(), trie.item_tokens(items.numpy()))


@pytest.mark.parametrize("dense_limit", [0, 1 << 20])
@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("beams", [3, 8])
def test_beam_search_with_item_mask_equals_search_on_the_masked_trie(dense_limit, shared_prompt, beams):
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=dense_limit)
    model = tiny_model("qwen2-eager" if shared_prompt else "llama")
    input_ids, mask = prompts()
    item_mask = random_item_mask(4, len(codes), p=0.3, seed=beams)
    item_mask[3] = False
    item_mask[3, np.flatnonzero(alive)[:5]] = True  # fewer items than 8 beams
    items, scores = trie.beam_search(model, input_ids, mask, beams, shared_prompt=shared_prompt,
                                     item_mask=item_mask)
    for b in range(4):
        masked = CatalogueTrie(codes, SIZES, FIRST, alive & item_mask[b].numpy(), dense_limit=dense_limit)
        # the same batch through the same layout: prompt b's row must match bit for bit
        same_items, same_scores = masked.beam_search(model, input_ids, mask, beams, shared_prompt=shared_prompt)
        assert torch.equal(items[b], same_items[b]) and torch.equal(scores[b], same_scores[b])
        ref_items, ref_scores = reference_beam_search(model, input_ids[b:b + 1], mask[b:b + 1], masked, beams)
        torch.testing.assert_close(items[b], ref_items[0])
        torch.testing.assert_close(scores[b], ref_scores[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_item_mask_allowing_few_or_no_items_pads(qwen, shared_prompt):
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=16)
    input_ids, mask = prompts()
    item_mask, two = edge_case_mask(alive)
    items, scores = trie.beam_search(qwen, input_ids, mask, 4, shared_prompt=shared_prompt, item_mask=item_mask)
    for b in (0, 2):  # nothing allowed, or only dead items: an empty market
        assert (items[b] == -1).all() and torch.isneginf(scores[b]).all()
    assert sorted(items[1, :2].tolist()) == sorted(two) and torch.isfinite(scores[1, :2]).all()
    assert (items[1, 2:] == -1).all() and torch.isneginf(scores[1, 2:]).all()
    assert (items[3] >= 0).all()
    items, logprobs, tokens = trie.sample(qwen, input_ids, mask, 20, 1.0, torch.Generator().manual_seed(0),
                                          shared_prompt=shared_prompt, item_mask=item_mask)
    for b in (0, 2):
        assert (items[b] == -1).all() and torch.isneginf(logprobs[b]).all() and (tokens[b] == -1).all()
    assert set(items[1].tolist()) <= set(two) and torch.isfinite(logprobs[1]).all()
    with pytest.raises(ValueError, match="item_mask"):
        trie.beam_search(qwen, input_ids, mask, 4, item_mask=item_mask[:3])
    with pytest.raises(ValueError, match="item_mask"):
        trie.sample(qwen, input_ids, mask, 4, item_mask=item_mask.int())


@pytest.mark.parametrize("dense_limit", [16, 1 << 20])
def test_all_true_item_mask_changes_nothing(qwen, dense_limit):
    codes = catalogue()
    alive = np.random.default_rng(4).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=dense_limit)
    input_ids, mask = prompts()
    everything = torch.ones(4, len(codes), dtype=torch.bool)
    for shared_prompt in (True, False):
        plain = trie.beam_search(qwen, input_ids, mask, 6, shared_prompt=shared_prompt)
        masked = trie.beam_search(qwen, input_ids, mask, 6, shared_prompt=shared_prompt, item_mask=everything)
        assert all(torch.equal(a, b) for a, b in zip(plain, masked))
        plain = trie.sample(qwen, input_ids, mask, 30, 1.2, torch.Generator().manual_seed(2),
                            shared_prompt=shared_prompt)
        masked = trie.sample(qwen, input_ids, mask, 30, 1.2, torch.Generator().manual_seed(2),
                             shared_prompt=shared_prompt, item_mask=everything)
        assert all(torch.equal(a, b) for a, b in zip(plain, masked))


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_sample_with_item_mask_equals_sampling_on_the_masked_trie(qwen, shared_prompt):
    codes = catalogue()
    alive = np.random.default_rng(5).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=16)
    input_ids, mask = prompts()
    item_mask = random_item_mask(4, len(codes), p=0.3, seed=7)
    drawn = trie.sample(qwen, input_ids, mask, 40, 1.3, torch.Generator().manual_seed(3),
                        shared_prompt=shared_prompt, item_mask=item_mask)
    for b in range(4):
        masked = CatalogueTrie(codes, SIZES, FIRST, alive & item_mask[b].numpy(), dense_limit=16)
        # same noise (its shape does not depend on the alive set), same allowed codes: same draws
        same = masked.sample(qwen, input_ids, mask, 40, 1.3, torch.Generator().manual_seed(3),
                             shared_prompt=shared_prompt)
        assert all(torch.equal(x[b], y[b]) for x, y in zip(drawn, same))


# ---------------------------------------------------------------- lists

def check_lists(trie, model, input_ids, mask, item_mask, items, logprobs, tokens):
    """Distinct allowed items, -1 only once a list ran out, tokens and log-probs as teacher forcing gives them."""
    batch, lists, length = items.shape
    depth = trie.depth
    allowed = trie.alive & (np.ones((batch, len(trie.codes)), bool) if item_mask is None else item_mask.numpy())
    for b in range(batch):
        for row in items[b].tolist():
            found = [i for i in row if i >= 0]
            assert len(set(found)) == len(found) == min(length, int(allowed[b].sum()))
            assert row[:len(found)] == found  # -1 only at the end
            assert allowed[b, found].all()
    assert torch.equal(torch.isneginf(logprobs), items < 0)
    np.testing.assert_array_equal(tokens.numpy(), trie.item_tokens(items.numpy()).reshape(batch, lists, -1))
    flat_tokens = tokens.reshape(batch * lists, length, depth)
    ids, attention = input_ids.repeat_interleave(lists, 0), mask.repeat_interleave(lists, 0)
    for k in range(length):
        valid = items.reshape(-1, length)[:, k] >= 0
        before = flat_tokens[valid, :k].reshape(int(valid.sum()), k * depth)
        grown = torch.cat([ids[valid], before], 1)
        grown_mask = torch.nn.functional.pad(attention[valid], (0, k * depth), value=1)
        with torch.no_grad():
            expected = token_logprobs(model, grown, grown_mask, flat_tokens[valid, k]).sum(1)
        torch.testing.assert_close(logprobs.reshape(-1, length)[valid, k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense_limit", [16, 1 << 20])
@pytest.mark.parametrize("cached, shared_prompt", [(True, None), (False, True), (False, False), (False, None)])
def test_sample_list_draws_distinct_allowed_items_scored_after_the_earlier_ones(qwen, dense_limit, cached,
                                                                                shared_prompt):
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive, dense_limit=dense_limit)
    input_ids, mask = prompts()
    item_mask, _ = edge_case_mask(alive)
    item_mask[1, np.flatnonzero(alive)[20]] = True  # three allowed items, lists of five
    items, logprobs, tokens = trie.sample_list(qwen, input_ids, mask, 5, num_samples=3, temperature=1.3,
                                               generator=torch.Generator().manual_seed(0), item_mask=item_mask,
                                               shared_prompt=shared_prompt, cached=cached)
    assert items.shape == logprobs.shape == (4, 3, 5) and tokens.shape == (4, 3, 15)
    assert items.dtype == tokens.dtype == torch.long and logprobs.dtype == torch.float32
    check_lists(trie, qwen, input_ids, mask, item_mask, items, logprobs, tokens)
    assert (items[0] == -1).all() and (items[2] == -1).all() and (items[1, :, 3:] == -1).all()
    items, logprobs, tokens = trie.sample_list(qwen, input_ids, mask, 4, num_samples=2,
                                               generator=torch.Generator().manual_seed(1), cached=cached)
    check_lists(trie, qwen, input_ids, mask, None, items, logprobs, tokens)


def test_greedy_sample_list_is_repeated_greedy_decoding(qwen):
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive)
    input_ids, mask = prompts()
    item_mask = random_item_mask(4, len(codes), p=0.6, seed=8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    items, logprobs, tokens = trie.sample_list(qwen, input_ids, mask, 4, num_samples=2, generator=generator,
                                               item_mask=item_mask, greedy=True)
    assert torch.equal(generator.get_state(), state)  # greedy draws no noise
    reference = trie.sample_list(qwen, input_ids, mask, 4, num_samples=2, item_mask=item_mask, greedy=True,
                                 cached=False)
    assert torch.equal(items, reference[0]) and torch.equal(tokens, reference[2])
    assert torch.equal(items[:, 0], items[:, 1])
    for b in range(4):
        used = np.zeros(len(codes), bool)
        prompt, prompt_mask = input_ids[b:b + 1], mask[b:b + 1]
        for k in range(4):
            # greedy decoding = beam search with one beam, here on a trie without the earlier items
            rest = CatalogueTrie(codes, SIZES, FIRST, alive & item_mask[b].numpy() & ~used)
            item, score = reference_beam_search(qwen, prompt, prompt_mask, rest, 1)
            assert int(items[b, 0, k]) == int(item[0, 0])
            torch.testing.assert_close(logprobs[b, 0, k], score[0, 0], rtol=1e-5, atol=1e-5)
            used[int(item[0, 0])] = True
            prompt = torch.cat([prompt, torch.from_numpy(trie.item_tokens(item[0]))], 1)
            prompt_mask = torch.nn.functional.pad(prompt_mask, (0, trie.depth), value=1)


def test_sample_list_is_reproducible_from_the_generator(qwen):
    trie = CatalogueTrie(catalogue(), SIZES, FIRST)
    input_ids, mask = prompts()
    draw = [trie.sample_list(qwen, input_ids, mask, 3, num_samples=4, temperature=1.5,
                             generator=torch.Generator().manual_seed(seed), shared_prompt=shared, cached=cached)
            for seed, shared, cached in ((5, None, True), (5, None, True), (5, True, False), (5, False, False),
                                         (6, None, True))]
    assert all(torch.equal(a, b) for a, b in zip(draw[0], draw[1]))
    for other in draw[2:4]:  # every layout draws the same noise in the same order: the same lists
        assert torch.equal(draw[0][0], other[0]) and torch.equal(draw[0][2], other[2])
        torch.testing.assert_close(draw[0][1], other[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(draw[0][0], draw[4][0])
    with pytest.raises(ValueError, match="length"):
        trie.sample_list(qwen, input_ids, mask, 0)


def test_remove_allowed_equals_rebuilding_the_tables_without_the_items():
    """The in-place update sample_list uses: taking an item out of a row touches L+1 entries and
    leaves exactly the tables (and counts) built from the mask without it. A prefix whose last
    allowed item goes must turn False, one with items left must stay True."""
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive)
    mask = random_item_mask(4, len(codes), p=0.5) & torch.from_numpy(alive)
    tables, counts = trie.allowed_children(mask, 4, torch.device("cpu"), with_counts=True)
    # per row, an allowed item under the row's most populated 1-prefix (that prefix stays True)
    rows, items = [], []
    for b in range(4):
        allowed = np.flatnonzero(mask[b].numpy())
        first = trie.item_prefix[allowed, 1]
        shared = allowed[np.isin(first, first[np.bincount(first).argmax()])][0]
        rows.append(b), items.append(int(shared))
    trie.remove_allowed(tables, counts, torch.tensor(rows), torch.tensor(items))
    expected = mask.clone()
    expected[rows, items] = False
    want_tables, want_counts = trie.allowed_children(expected, 4, torch.device("cpu"), with_counts=True)
    for got, want in zip(tables + counts, want_tables + want_counts):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # remove every allowed item of row 0 one by one: all its tables end all-False
    for item in np.flatnonzero(expected[0].numpy()):
        trie.remove_allowed(tables, counts, torch.tensor([0]), torch.tensor([int(item)]))
    assert not any(t[0].any() for t in tables) and all(int(c[0].sum()) == 0 for c in counts)
    assert tables[-1][1:].equal(want_tables[-1][1:])


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_tied_scores_go_to_the_lower_flat_index(shared_prompt):
    """A model with zero output weights scores every code alike, so every candidate ties: beams
    must then follow (score desc, beam * size + code asc), as the reference does (this is the
    path where topk's own order of equal values cannot be trusted)."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the input embeddings: uniform logits, and inputs all zero
    codes = catalogue()
    alive = np.random.default_rng(3).random(len(codes)) < 0.8
    trie = CatalogueTrie(codes, SIZES, FIRST, alive)
    input_ids, mask = prompts()
    items, scores = trie.beam_search(model, input_ids, mask, 6, shared_prompt=shared_prompt)
    want_items, want_scores = reference_beam_search(model, input_ids, mask, trie, 6)
    assert (scores == scores[:, :1]).all()  # every beam tied
    np.testing.assert_array_equal(items.numpy(), want_items.numpy())
    torch.testing.assert_close(scores, want_scores.float(), rtol=0, atol=1e-5)
