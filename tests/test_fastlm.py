"""The lean inference forward of the trie decoders (policy/fastlm.py) against transformers' own."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from agorasim.policy import fastlm

VOCAB = 40


def model_of(kind: str, layers: int = 2):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # q/k/v with biases


def left_padded(batch: int = 4, width: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    for b in range(batch):
        mask[b, :2 * b] = 0  # row b: 2b padding tokens
    return ids.masked_fill(mask == 0, 0), mask


def positions_of(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("layers", [1, 2])
def test_prompt_then_steps_equal_transformers(kind, layers):
    """A left-padded prompt pass (last position's logits only), then two one-token steps through
    a cache whose rows are reordered in between, equal transformers' forward on the whole sequences."""
    model = model_of(kind, layers)
    ids, mask = left_padded()
    pos = positions_of(mask)
    with torch.no_grad():
        assert fastlm.supports(model)
        cache = fastlm.KVCache(model, 4, ids.shape[1] + 2, torch.device("cpu"))
        first = fastlm.forward(model, cache, ids, pos, fastlm.prompt_mask(mask), keep=1)
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
        torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
        order = torch.tensor([2, 0, 0, 3])  # rows moved and one repeated, as beams are
        cache.reorder_cache(order)
        ids, mask, pos = ids[order], mask[order], pos[order]
        for step in range(2):
            token = torch.full((4, 1), 5 + step)
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            ids = torch.cat([ids, token], 1)
            got = fastlm.forward(model, cache, token, pos[:, -1:], mask.bool()[:, None, None, :])
            want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert cache.length == ids.shape[1] == cache.capacity


def test_repeated_rows_and_a_tree_mask_see_only_their_own_columns():
    """Two continuations appended to one cache row, each seeing the prompt and itself only, equal
    each continuation run on its own; batch_repeat_interleave copies rows in order."""
    model = model_of("qwen2")
    ids, mask = left_padded(batch=2)
    pos = positions_of(mask)
    width = ids.shape[1]
    with torch.no_grad():
        cache = fastlm.KVCache(model, 2, width + 2, torch.device("cpu"))
        fastlm.forward(model, cache, ids, pos, fastlm.prompt_mask(mask), keep=1)
        tokens = torch.tensor([[7, 9], [8, 10]])
        visible = torch.zeros(2, 2, width + 2, dtype=torch.bool)
        visible[:, :, :width] = mask.bool()[:, None, :]
        visible[:, 0, width], visible[:, 1, width + 1] = True, True
        got = fastlm.forward(model, cache, tokens, (pos[:, -1:] + 1).expand(2, 2), visible[:, None])
        for j in range(2):
            full = torch.cat([ids, tokens[:, j:j + 1]], 1)
            full_mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            want = model(input_ids=full, attention_mask=full_mask, position_ids=positions_of(full_mask)).logits[:, -1]
            torch.testing.assert_close(got[:, j], want, rtol=1e-5, atol=1e-5)
        keys = cache.keys[0].clone()
        cache.batch_repeat_interleave(3)
        assert cache.keys[0].shape[0] == 6 and torch.equal(cache.keys[0][3], keys[1])


def test_used_only_where_it_is_exact():
    model = model_of("qwen2")
    assert not fastlm.supports(model)  # gradients on: training goes through transformers
    with torch.no_grad():
        assert fastlm.supports(model)
        model.config.layer_types = ["full_attention", "sliding_attention"]
        assert not fastlm.supports(model)

        class Other(torch.nn.Module):
            config = model.config
        assert not fastlm.supports(Other())
        cache = fastlm.KVCache(model_of("qwen2"), 1, 3, torch.device("cpu"))
        ids = torch.tensor([[3, 4, 5, 6]])
        with pytest.raises(ValueError, match="4 cache columns needed, 3 allocated"):
            fastlm.forward(model_of("qwen2"), cache, ids, positions_of(torch.ones_like(ids)),
                           fastlm.prompt_mask(torch.ones_like(ids)))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("group", [1, 3])
def test_the_loss_pass_equals_transformers_in_values_and_gradients(kind, group, monkeypatch):
    """token_logprobs through fastlm without a cache (a prompt and its group's paths as one tree
    sequence; one prompt + path per row when group is 1) gives transformers' log-probs, entropies
    and parameter gradients, with left padding and dropout-free training mode."""
    from agorasim.policy import trie

    model = model_of(kind).train()
    ids, mask = left_padded(batch=3)
    g = torch.Generator().manual_seed(4)
    paths = torch.randint(3, VOCAB, (3 * group, 4), generator=g)
    weights = torch.randn(3 * group, 4, generator=g)

    def run():
        model.zero_grad()
        logp, entropy = trie.token_logprobs(model, ids, mask, paths, return_entropy=True)
        (logp * weights).sum().backward()
        return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}

    assert fastlm.trains(model)
    calls = []
    real = fastlm.forward
    monkeypatch.setattr(fastlm, "forward", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    fast = run()
    assert calls == [None]  # one cache-less call: the tree (or the plain rows) in one pass
    monkeypatch.setattr(fastlm, "trains", lambda model: False)
    slow = run()
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)
    assert fast[2].keys() == slow[2].keys()
    for name in fast[2]:  # float rounding, at the scale of each gradient (the embeddings' reach ~35)
        scale = float(slow[2][name].abs().max())
        torch.testing.assert_close(fast[2][name], slow[2][name], rtol=1e-4, atol=1e-5 * max(1.0, scale), msg=name)


def test_attention_dropout_in_training_goes_through_transformers():
    model = model_of("qwen2")
    model.config.attention_dropout = 0.1
    assert fastlm.trains(model.eval()) and not fastlm.trains(model.train())


def test_cpu_attention_equals_the_fused_kernel_with_grouped_heads():
    """The CPU path's two batched products equal scaled_dot_product_attention with enable_gqa
    (the GPU path): 4 query heads on 2 key heads, a random mask with every row seeing a key."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g, requires_grad=True)
    k, v = torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
    mask = torch.rand(3, 1, 5, 7, generator=g) > 0.5
    mask[..., 0] = True
    got = fastlm._cpu_attention(q, k, v, fastlm._bias(mask, 2, 2, q.dtype), 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad_got, = torch.autograd.grad(got.square().sum(), q)
    grad_want, = torch.autograd.grad(want.square().sum(), q)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6)


def test_groups_past_the_tree_limit_keep_the_cache_layout(monkeypatch):
    """Past ``_TREE_LIMIT`` path tokens per prompt the loss pass runs the prompt once and its
    paths from a copied cache (transformers' forward), with the same log-probs."""
    from agorasim.policy import trie

    model = model_of("qwen2").train()
    ids, mask = left_padded(batch=2)
    paths = torch.randint(3, VOCAB, (2 * 3, 4), generator=torch.Generator().manual_seed(5))
    tree = trie.token_logprobs(model, ids, mask, paths).detach()
    monkeypatch.setattr(trie, "_TREE_LIMIT", 8)  # 3 paths x 3 tokens = 9 > 8
    calls = []
    real = fastlm.forward
    monkeypatch.setattr(fastlm, "forward", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cached = trie.token_logprobs(model, ids, mask, paths).detach()
    assert calls == []  # not through the tree
    torch.testing.assert_close(tree, cached, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [754, 40, 768])
def test_padded_lm_head_is_bit_identical_forward_and_backward(vocab):
    """The CPU lm_head pads the weight to a multiple of VOCAB_ALIGN and slices the padding off:
    the logits equal the plain product bit for bit (each is a dot product over the unchanged
    hidden width), both gradients up to float rounding (the input's gradient sums over the padded
    width, and MKL may block that sum differently: bit-identical on an AMD EPYC, 1.8e-7 apart on
    an Intel Xeon), and the width MKL sees is padded only where the vocabulary is not already a
    multiple."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, vocab, bias=False)
    model = type("M", (), {"lm_head": head})()
    h = torch.randn(300, 3, 64, requires_grad=True)
    target = torch.randint(0, vocab, (300, 3))
    grads = []
    for f in (head, lambda x: fastlm.lm_head(model, x)):
        h.grad, head.weight.grad = None, None
        logits = f(h)
        loss = torch.log_softmax(logits, -1).gather(-1, target[..., None]).sum()
        loss.backward()
        grads.append((logits.detach(), h.grad.clone(), head.weight.grad.clone()))
    (logits, h_grad, w_grad), (logits_p, h_grad_p, w_grad_p) = grads
    assert logits.shape == logits_p.shape and torch.equal(logits, logits_p)
    torch.testing.assert_close(h_grad_p, h_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_grad_p, w_grad, rtol=1e-5, atol=1e-6)
    assert (-vocab % fastlm.VOCAB_ALIGN == 0) == (vocab in (768,))


def test_rotary_and_norm_shortcuts_are_transformers_bit_for_bit():
    """The forward's own rotary factors and its torch ``rms_norm`` call compute what
    transformers' modules do, bit for bit: cosine and sine of the rotary module, the rotation of
    ``apply_rotary_pos_emb``, and the RMSNorm's values and both gradients."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model = model_of("qwen2")
    body = model.model
    torch.manual_seed(1)
    positions = torch.randint(0, 60, (5, 7))
    x = torch.randn(5, 7, 32)
    cos, signed_sin = fastlm._rotary(body.rotary_emb, x, positions)
    want_cos, want_sin = body.rotary_emb(x, positions)
    assert torch.equal(cos[:, :, 0], want_cos)
    half = want_sin.shape[-1] // 2
    assert torch.equal(signed_sin[:, :, 0, half:], want_sin[..., half:])
    assert torch.equal(signed_sin[:, :, 0, :half], -want_sin[..., :half])
    q, k = torch.randn(5, 7, 4, 8), torch.randn(5, 7, 2, 8)  # (rows, tokens, heads, head dim)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), want_cos, want_sin)
    assert torch.equal(fastlm._rope(q, cos, signed_sin).transpose(1, 2), want_q)
    assert torch.equal(fastlm._rope(k, cos, signed_sin).transpose(1, 2), want_k)

    norm = body.layers[0].input_layernorm
    h = torch.randn(6, 3, 32, requires_grad=True)
    grad = torch.randn(6, 3, 32)
    got = fastlm._rms_norm(norm, h)
    got_grads = torch.autograd.grad(got, (h, norm.weight), grad)
    want = norm(h)
    want_grads = torch.autograd.grad(want, (h, norm.weight), grad)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


def test_a_scaled_rope_equals_transformers():
    """RoPE types other than the default (here linear scaling) take the rotary module's factors:
    the prompt pass still equals transformers' forward."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    assert model.model.rotary_emb.rope_type == "linear"
    ids, mask = left_padded()
    pos = positions_of(mask)
    with torch.no_grad():
        cache = fastlm.KVCache(model, 4, ids.shape[1], torch.device("cpu"))
        got = fastlm.forward(model, cache, ids, pos, fastlm.prompt_mask(mask), keep=1)
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
