"""Constrained beam search over the catalogue trie against transformers' ``prefix_allowed_tokens_fn``.

Same tiny model (Qwen2, 2 layers, hidden 64, built from a config with random weights), same
left-padded prompts (``[BOS] codes(h_1) ... codes(h_P) [SEP]``, 6-10 history items of 4 tokens),
same catalogue (3,686 items, random unit embeddings, semantic ids 3x256 + de-duplication):

- ours: ``CatalogueTrie.beam_search`` (prompts run once, KV cache expanded to the beams, masks
  gathered from the trie tables, one Python iteration per code level);
- baseline: ``model.generate(num_beams=G, prefix_allowed_tokens_fn=...)`` with the trie as a
  dict from generated prefix to allowed tokens (transformers calls it once per beam per step).

Both are timed in this process, median of 5 alternating runs after a warm-up; ``identical`` checks that every
prompt gets the same items in the same order from both. DESIGN section 11: speedup >= 10.

The weights are drawn with ``initializer_range=0.2`` (transformers' default 0.02 makes an untrained
model's next-token distribution almost uniform, so beams would differ only by float noise; a trained
model is far peakier than either).

    python benchmarks/decode.py            # 64 prompts x 16 beams
    python benchmarks/decode.py --quick    # 16 prompts

``--decoder grc|mindrec`` times the other decoders of the generative recommender against the plain
trie beam search at the same beam width and batch, in one run (the cost of reflection and of
iterative denoising as a ratio). Both policies come from the cold-start market after a short
warm-up and SFT, serving the same random histories of alive items:

- ``grc``: EGRS (``rl.grc.egrs_decode``: drafts, reflection entropy, greedy correction of the
  ``budget`` highest-entropy drafts) at budgets 0, 3 and every beam, against ``beam_search`` of
  the same GRC model;
- ``mindrec``: diffusion beam search (faithful and trie-consistent) of a MindRec policy, with the
  paper's full attention and with prefix attention (``history_attention=prefix``: the history's
  keys and values computed once per prompt), against ``beam_search`` of a plain generative policy
  of the same width and depth, on the same world.

    python benchmarks/decode.py --decoder grc [--prompts 64 --beams 10]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens
from agorasim.policy.trie import CatalogueTrie
from agorasim.run import allocator

PAD, BOS, SEP = 0, 1, 2
FIRST_CODE_TOKEN = 3


def build(n_items: int, n_prompts: int, history: int, seed: int):
    """Catalogue trie, model and left-padded prompts, all from ``seed``."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n_items, 64)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = SemanticIds(levels=3, codebook_size=256)
    codes = ids.fit(embeddings, seed=seed)
    tokens = codes_to_tokens(codes, ids.level_sizes, FIRST_CODE_TOKEN)
    trie = CatalogueTrie(codes, ids.level_sizes, FIRST_CODE_TOKEN)
    vocab = FIRST_CODE_TOKEN + sum(ids.level_sizes)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP)
    model = Qwen2ForCausalLM(config).eval()
    width = history * ids.levels + history + 2  # BOS + history paths + SEP
    input_ids = torch.full((n_prompts, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((n_prompts, width), dtype=torch.long)
    for b in range(n_prompts):  # prompt building is set-up, not timed
        items = rng.choice(n_items, int(rng.integers(history - 4, history + 1)), replace=False)
        row = [BOS, *tokens[items].reshape(-1).tolist(), SEP]
        input_ids[b, width - len(row):] = torch.tensor(row)
        attention_mask[b, width - len(row):] = 1
    return trie, model, input_ids, attention_mask


def hf_beam_search(model, trie: CatalogueTrie, input_ids, attention_mask, beams: int):
    """transformers' beam search with the trie as ``prefix_allowed_tokens_fn``: items, scores (B, G)."""
    out = model.generate(input_ids, attention_mask=attention_mask, num_beams=beams, num_return_sequences=beams,
                         do_sample=False, max_new_tokens=trie.depth,
                         prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(input_ids.shape[1]),
                         length_penalty=0.0, early_stopping=True, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=SEP)
    return out.sequences[:, input_ids.shape[1]:], out.sequences_scores


def paths_to_items(trie: CatalogueTrie, paths: torch.Tensor, shape) -> np.ndarray:
    item_of = {tuple(p): i for i, p in enumerate((trie.codes + trie.offsets).tolist())}
    return np.array([item_of.get(tuple(p), -1) for p in paths.tolist()]).reshape(shape)


def timed(fns, repeats: int) -> tuple[list[float], list[object]]:
    """Median seconds and last result of each function, after one warm-up each. Runs alternate
    (a, b, a, b, ...) so that both see the same background load on a shared machine."""
    results = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


def serving_policy(name: str, threads: int, extra: str = ""):
    """The policy of a cold-start market after a 2-round warm-up and one SFT epoch (no RL);
    ``extra``: more policy parameters (``, key: value``)."""
    from agorasim.config import build_config
    from agorasim.env.market import Market
    from agorasim.scenarios import load_scenario

    extra += ", grc_sft_epochs: 1" if name == "grc" else ""
    params = f"{{warmup_rounds: 2, sft_epochs: 1, threads: {threads or 'null'}{extra}}}"
    config = build_config(load_scenario("cold-start"), [f"policy.name={name}", f"policy.params={params}",
                                                        "rl.method=none", "run.progress=false"])
    market = Market(config)
    for _ in range(3):
        market.step()
    return market.policy, market.world.catalogue.alive_ids()


def decoders(args) -> dict:
    """``--decoder grc|mindrec``: items per second of each decoding against plain beam search."""
    from agorasim.rl.grc import egrs_decode

    if args.decoder == "grc":
        policy, alive = serving_policy("grc", args.threads)
        plain_policy = policy
    else:
        policy, alive = serving_policy("mindrec", args.threads)
        prefix, _ = serving_policy("mindrec", args.threads, ", history_attention: prefix")
        plain_policy, _ = serving_policy("generative", args.threads)
    rng = np.random.default_rng(args.seed)
    history = rng.choice(alive, (args.prompts, args.history))
    k = args.beams
    runs = {"plain": lambda: plain_policy.beam_search(history, k)}
    if args.decoder == "grc":
        draft_beams = policy.settings.draft_beams
        for budget in sorted({0, min(3, draft_beams, k), min(draft_beams, k)}):
            runs[f"egrs_budget_{budget}"] = (lambda b=budget: egrs_decode(policy, history, k, draft_beams, b))
    else:
        runs["diffusion_faithful"] = lambda: policy.decode(history, k, mode="faithful")
        runs["diffusion_trie"] = lambda: policy.decode(history, k, mode="trie")
        runs["diffusion_prefix_faithful"] = lambda: prefix.decode(history, k, mode="faithful")
        runs["diffusion_prefix_trie"] = lambda: prefix.decode(history, k, mode="trie")
    with torch.inference_mode():
        seconds, results = timed(list(runs.values()), args.repeats)
    items = args.prompts * k
    out = {"benchmark": "decode", "decoder": args.decoder, "prompts": args.prompts, "beams": k}
    for (name, _), t in zip(runs.items(), seconds):
        out[f"{name}_items_per_s"] = round(items / t, 1)
        if name != "plain":
            out[f"{name}_cost_ratio"] = round(t / seconds[0], 2)
    if args.decoder == "mindrec":
        for name, decoded in zip(runs, results):
            if name.startswith("diffusion"):
                out[f"{name}_non_item_share"] = round(float(decoded.invalid.mean()), 4)
    lines = [f"{name}: {items / t:,.0f} items/s ({t * 1000:.1f} ms)" for name, t in zip(runs, seconds)]
    print(f"decode --decoder {args.decoder}: {args.prompts} prompts x {k} beams; " + "; ".join(lines))
    return out


def main() -> None:
    allocator.tune()  # as the command line runs (run/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts instead of 64")
    parser.add_argument("--items", type=int, default=3686, help="catalogue size")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per batch")
    parser.add_argument("--history", type=int, default=10, help="most history items per prompt")
    parser.add_argument("--beams", type=int, default=None, help="beams G (default 16; 10 with --decoder)")
    parser.add_argument("--decoder", choices=("trie", "grc", "mindrec"), default="trie",
                        help="trie: against transformers' generate (default); grc, mindrec: against the plain "
                        "trie beam search")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, as the generative policy serves; 0: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    if args.decoder != "trie":
        args.beams = args.beams or 10
        print(json.dumps(decoders(args)))
        return
    args.beams = args.beams or 16
    n_prompts = 16 if args.quick else args.prompts
    trie, model, input_ids, attention_mask = build(args.items, n_prompts, args.history, args.seed)
    with torch.inference_mode():
        (ours_seconds, hf_seconds), ((items, scores), (paths, hf_scores)) = timed(
            [lambda: trie.beam_search(model, input_ids, attention_mask, args.beams),
             lambda: hf_beam_search(model, trie, input_ids, attention_mask, args.beams)], args.repeats)
    hf_items = paths_to_items(trie, paths, (n_prompts, args.beams))
    identical = bool(np.array_equal(items.numpy(), hf_items))
    score_gap = float((scores - hf_scores.view(n_prompts, args.beams)).abs().max())
    speedup = hf_seconds / ours_seconds
    print(f"decode: {n_prompts} prompts x {args.beams} beams over {trie.n_alive} items "
          f"(prompt width {input_ids.shape[1]}): ours {ours_seconds * 1000:.1f} ms, transformers "
          f"prefix_allowed_tokens_fn {hf_seconds * 1000:.1f} ms, speedup {speedup:.1f}x, identical beams "
          f"{identical} (max score gap {score_gap:.1e})")
    print(json.dumps({"benchmark": "decode", "ours_seconds": round(ours_seconds, 5),
                      "hf_seconds": round(hf_seconds, 5), "speedup": round(speedup, 2), "identical": identical}))


if __name__ == "__main__":
    main()
