"""A lean inference forward for Llama-family causal LMs (Llama, Qwen2, SmolLM2), for the trie decoders.

Why: the policy's language models are tiny (2 layers of width 64), so a decoding step through
transformers' generic forward costs more in per-call work (attention-mask construction, cache
bookkeeping, output capture, repeated keys for grouped-query attention) than in arithmetic: at
16 prompts x 16 beams the prompt pass took 8 ms, its matrix products about 1.6 ms. This forward
applies the model's own layers (embeddings, norms, projections, MLP, rotary embedding) in the same
order on the same weights, as functional calls on their parameters (``F.linear``, torch's
``rms_norm``, the default RoPE's factors computed as transformers does: bit-identical, without the
modules' call overhead), with:

- a preallocated KV cache, ``(rows, kv heads, capacity, head dim)`` per layer, written in place
  (no concatenation per step); it has the two methods of transformers' caches the decoders use
  (``reorder_cache``, ``batch_repeat_interleave``);
- boolean attention masks given by the caller (True = attend), and grouped-query attention
  without repeating the keys per head: on a GPU inside ``scaled_dot_product_attention``
  (``enable_gqa``); on a CPU as two batched matrix products around a softmax, the heads that
  share a key head stacked as one matrix and the mask turned into an additive bias once per call
  for every layer (``_cpu_attention``: at the policy's shapes, 16-20 queries of 16 dimensions
  against 40-100 keys, 1.2-2.3x faster than the fused CPU kernel, whose per-call cost dominates);
- at the prompt pass, the last layer's attention output and MLP only for the positions whose
  logits are wanted (``keep``); the other positions only feed the cache.

Without a cache (``cache=None``) the same forward is differentiable: the trainer's loss pass
(``trie.token_logprobs``) runs each prompt and its group's paths as one *tree* sequence (the
prompt, then every path's tokens, each path seeing the prompt and its own earlier tokens), so the
prompt's keys are neither copied per path nor repeated per head (their backward was a third of
the loss pass through transformers' forward).

The logits equal transformers' forward up to float rounding (tests compare logits, beams,
samples, log-probs and gradients against it). It is used only for the architectures it knows
(``supports``: decoding, ``trains``: the loss pass); anything else goes through transformers'
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def _known(model) -> bool:
    """A known architecture with full attention in every layer."""
    if type(model).__name__ not in ARCHITECTURES:
        return False
    config = model.config
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or ())):
        return False
    return not getattr(config, "use_sliding_window", False)


def supports(model) -> bool:
    """Whether decoding with a ``KVCache`` computes what ``model`` does: ``_known`` and no
    gradient wanted."""
    return _known(model) and not torch.is_grad_enabled()


def trains(model) -> bool:
    """Whether the cache-less ``forward`` computes what ``model`` does in its current mode, with
    gradients: ``_known``, and no attention dropout while training (this forward has none)."""
    return _known(model) and not (model.training and getattr(model.config, "attention_dropout", 0.0))


class KVCache:
    """Keys and values of ``rows`` sequences, ``capacity`` columns preallocated, ``length`` filled."""

    def __init__(self, model, rows: int, capacity: int, device: torch.device):
        attention = model.model.layers[0].self_attn
        shape = (rows, model.config.num_key_value_heads, capacity, attention.head_dim)
        dtype = model.lm_head.weight.dtype
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in model.model.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in model.model.layers]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]`` (rows may be repeated or dropped)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def batch_repeat_interleave(self, n: int) -> None:
        """Each row repeated ``n`` times in place (row r -> rows r*n .. r*n + n-1)."""
        self.keys = [k.repeat_interleave(n, 0) for k in self.keys]
        self.values = [v.repeat_interleave(n, 0) for v in self.values]


def prompt_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` boolean mask of left-padded prompts: causal, padding keys excluded. A
    padding query sees itself (its output is never used, and a row with no key would be NaN)."""
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril_()
    mask = causal & attention_mask.bool()[:, None, :]
    return (mask | torch.eye(width, dtype=torch.bool, device=attention_mask.device))[:, None]


def _rotary(rotary, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, signed sin)`` of shape ``(R, L, 1, D)`` for ``position_ids`` ``(R, L)`` (one factor for
    every head: the rotation is applied before the heads are transposed, on contiguous rows).

    The default RoPE computes what transformers' rotary module does (positions times ``inv_freq``
    in float32, the angles twice, cosine and sine times ``attention_scaling``), without the
    module's call and autocast overhead; other RoPE types (scaled, dynamic) call the module. The
    sine's first half is negated, so that ``x * cos + swap(x) * sin`` (``swap``: the halves
    exchanged) is transformers' ``x * cos + rotate_half(x) * sin`` bit for bit (negating a
    factor is exact)."""
    if getattr(rotary, "rope_type", "default") == "default":
        freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
        cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    else:
        cos, sin = rotary(x, position_ids)
        cos, sin = cos[:, :, None], sin[:, :, None]
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of ``x`` ``(R, L, H, D)`` with ``_rotary``'s factors."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (Llama/Qwen2 RMSNorm) applied as transformers does: in float32, weight after.
    torch's ``rms_norm`` computes the same float32 steps in one call (bit-identical values and
    gradients, tests/test_fastlm.py); the float32 detour is only taken for other dtypes."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without the module call (its hooks machinery costs as much as the product at
    these sizes)."""
    return F.linear(x, layer.weight, layer.bias)


def _bias(mask: torch.Tensor, kv_heads: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``(R * kv heads, groups * L, K)`` additive attention bias (0 = attend, -inf = not) of a
    ``(R, 1, L, K)`` boolean mask, laid out as ``_cpu_attention`` stacks the query heads."""
    rows, _, width, keys = mask.shape
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, :, None].expand(rows, kv_heads, groups, width, keys).reshape(rows * kv_heads, groups * width, keys)


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention ``(R, H, L, D)`` of queries ``(R, H, L, D)`` on keys and values
    ``(R, H_kv, K, D)``: query head h uses key head ``h // (H / H_kv)`` (transformers' repeat_kv),
    so the ``H / H_kv`` heads of a key head are one ``(groups * L, D)`` matrix against its keys.
    ``bias`` is ``_bias``'s for these shapes. Differentiable."""
    rows, heads, width, dim = q.shape
    kv, keys = k.shape[1], k.shape[2]
    scores = torch.baddbmm(bias, q.reshape(rows * kv, heads // kv * width, dim),
                           k.reshape(rows * kv, keys, dim).transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, -1), v.reshape(rows * kv, keys, dim)).view(rows, heads, width, dim)


def forward(model, cache: KVCache | None, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
            keep: int | None = None) -> torch.Tensor:
    """Logits ``(R, L or keep, V)`` of ``input_ids`` ``(R, L)`` appended to ``cache`` (which grows by L).

    Args:
        model: a model for which ``supports`` holds (with a cache) or ``trains`` (without).
        cache: the rows' cache; columns ``length .. length + L - 1`` are written. None: no cache,
            the tokens see only each other (differentiable; nothing is kept).
        input_ids: the new tokens.
        position_ids: ``(R, L)`` their positions (for the rotary embedding).
        mask: ``(R, 1, L, length + L)`` bool, which cache columns each new token sees (itself included).
        keep: logits only for the last ``keep`` tokens (their last layer only is fully computed).
    """
    body = model.model
    rows, width = input_ids.shape
    start, end = (cache.length, cache.length + width) if cache is not None else (0, width)
    if cache is not None and end > cache.capacity:
        raise ValueError(f"fastlm: {end} cache columns needed, {cache.capacity} allocated")
    embed = body.embed_tokens
    x = F.embedding(input_ids, embed.weight, embed.padding_idx)
    cos, sin = _rotary(body.rotary_emb, x, position_ids)
    last = len(body.layers) - 1
    bias = None  # the CPU attention's additive mask, shared by the layers
    silu = getattr(model.config, "hidden_act", None) == "silu"
    for i, layer in enumerate(body.layers):
        attention = layer.self_attn
        h = _rms_norm(layer.input_layernorm, x)
        q = _rope(_linear(attention.q_proj, h).view(rows, width, -1, attention.head_dim), cos, sin).transpose(1, 2)
        k = _rope(_linear(attention.k_proj, h).view(rows, width, -1, attention.head_dim), cos, sin).transpose(1, 2)
        v = _linear(attention.v_proj, h).view(rows, width, -1, attention.head_dim).transpose(1, 2)
        if cache is not None:
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v
            k, v = cache.keys[i][:, :, :end], cache.values[i][:, :, :end]
        see = mask
        if keep is not None and i == last:  # the other positions' outputs feed nothing
            q, x, see = q[:, :, -keep:], x[:, -keep:], mask[:, :, -keep:]
        if q.device.type == "cpu":
            if bias is None or see is not mask:  # built once; again for the last layer's kept rows
                bias = _bias(see, k.shape[1], q.shape[1] // k.shape[1], q.dtype)
            out = _cpu_attention(q, k, v, bias, attention.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=see, scale=attention.scaling, enable_gqa=True)
        x = x + _linear(attention.o_proj, out.transpose(1, 2).reshape(rows, q.shape[2], -1))
        h = _rms_norm(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        gate = _linear(mlp.gate_proj, h)
        gate = F.silu(gate) if silu else mlp.act_fn(gate)
        x = x + _linear(mlp.down_proj, gate * _linear(mlp.up_proj, h))
    if cache is not None:
        cache.length = end
    return lm_head(model, _rms_norm(body.norm, x))


VOCAB_ALIGN = 16  # output columns of the CPU lm_head product are padded to a multiple of this


def lm_head(model, h: torch.Tensor) -> torch.Tensor:
    """``model.lm_head(h)``, on a CPU with the weight's rows padded to a multiple of ``VOCAB_ALIGN``.

    MKL's single-precision product is about twice as slow when the output width is not a multiple
    of 8: the policy's vocabulary of 754 tokens took 11.1 ms for 4,000 rows against 5.3 ms at 760
    or 768 (the same trick as padding GPT-2's 50,257 tokens to 50,304). The padding rows are zeros
    and their columns are sliced off, so the logits are bit-identical to the unpadded product and
    the gradients that flow back to the weight and to ``h`` equal its gradients up to float
    rounding (``h``'s sums over the padded width, which MKL may block differently on some CPUs;
    tests/test_fastlm.py); the model's vocabulary and parameters are unchanged.
    """
    head = model.lm_head
    weight = head.weight
    vocab = weight.shape[0]
    pad = -vocab % VOCAB_ALIGN
    if pad == 0 or h.device.type != "cpu":
        return head(h)
    padded = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
    bias = None if head.bias is None else torch.cat([head.bias, head.bias.new_zeros(pad)])
    return F.linear(h, padded, bias)[..., :vocab]
