"""One in-loop training step of the default generative policy (GRPO or a seed method): generation, reward, update.

Runs the cold-start market with the generative policy through its warm-up and SFT, then times
the GRPO steps of the following rounds (``time/generate``, ``time/score``, ``time/update`` that the
policy logs to train.csv). Reports seconds per step, the share of each phase, tokens per second
of the update (the tokens its loss pass computes: each prompt once for its group, then the
completions' tokens, forward and backward) and, on a GPU, an estimate of the model FLOPs
utilisation (6 x parameters x tokens per second / peak FLOP/s; the reference model's forward
and the optimiser are not counted, so it is a lower bound).

    python benchmarks/grpo_step.py [--method grpo|ugr|flexrec|flame|blade|flower] [--steps 5]
                                   [--device cpu|cuda] [--peak-tflops 989]

Every method's step must stay under 1 s on this CPU for the default policy (DESIGN section 11).
The baseline in the same run (``loss_pass_*``): the loss's forward and backward on a batch of the
step's shape with the prompt shared by its group of paths, against the same batch as full copies.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from agorasim.config import build_config
from agorasim.env.market import Market
from agorasim.run import allocator
from agorasim.scenarios import load_scenario


def loss_pass(policy, prompts: int, group: int, prompt_tokens: int, depth: int, repeats: int = 3) -> dict:
    """The baseline in the same run: the loss's teacher-forced forward and backward on a batch of
    the step's shape (``prompts`` x ``group`` paths), with each prompt run once and its KV cache
    shared by its group (what the trainer does) against ``prompts * group`` full copies (before).
    Best of ``repeats``; the two must give the same log-probs up to float rounding."""
    import time

    from agorasim.policy.threads import torch_threads
    from agorasim.policy.trie import token_logprobs

    model = policy.model
    generator = torch.Generator().manual_seed(0)
    low = int(policy.first_code)
    ids = torch.randint(low, low + 64, (prompts, prompt_tokens), generator=generator)
    mask = torch.ones_like(ids)
    paths = torch.randint(low, low + 64, (prompts * group, depth), generator=generator)
    seconds, values = {}, {}
    model.train()
    with torch_threads(policy.threads):
        for name, shared in (("shared", True), ("expanded", False)):
            best = float("inf")
            for _ in range(repeats):
                model.zero_grad()
                started = time.perf_counter()
                logp = token_logprobs(model, ids, mask, paths, shared_prompt=shared)
                logp.sum().backward()
                best = min(best, time.perf_counter() - started)
            seconds[name], values[name] = best, logp.detach()
    model.zero_grad()
    return {"loss_pass_seconds": round(seconds["shared"], 4),
            "loss_pass_expanded_seconds": round(seconds["expanded"], 4),
            "loss_pass_speedup": round(seconds["expanded"] / seconds["shared"], 2),
            "loss_pass_max_logp_diff": float((values["shared"] - values["expanded"]).abs().max())}


def main() -> None:
    allocator.tune()  # as the command line runs (run/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="grpo", help="rl.method to time (default grpo)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=4, help="rounds before SFT")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the policy's model device)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (for MFU), e.g. 989 for H100 bf16")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    config = build_config(load_scenario("cold-start"), [
        "policy.name=generative", "run.progress=false", f"rl.method={args.method}",
        f"policy.params={{warmup_rounds: {args.warmup}, sft_epochs: 2, device: {args.device}}}",
        *args.overrides])
    market = Market(config)
    for _ in range(args.warmup + 1):  # warm-up rounds, SFT, and a first (untimed) GRPO step
        market.step()
    policy = market.policy
    first = len(market.train_rows)
    for _ in range(args.steps):
        market.step()
    rows = [r for r in market.train_rows[first:] if "time/update" in r]
    seconds = np.array([r["time/seconds"] for r in rows])
    phases = {p: np.array([r[f"time/{p}"] for r in rows]) for p in ("generate", "score", "update")}
    rl = config.rl
    n_params = sum(p.numel() for p in policy.model.parameters())
    depth = policy.levels + 1
    # items per completion and prompt suffix tokens of each method (its rollout's shape)
    items, suffix = {"flexrec": (rl.flexrec.list_size, 1), "blade": (rl.blade.slate_size, 0),
                     "flame": (rl.flame.edits, 1 + depth * (10 - rl.flame.edits if rl.flame.task == "add"
                                                             else 10 + rl.flame.edits))}.get(args.method, (1, 0))
    group = {"flower": rl.flower.samples, "flexrec": rl.flexrec.group_size, "flame": rl.flame.group_size,
             "blade": rl.blade.group_size}.get(args.method, rl.group_size)
    prompt_tokens = policy.prompt_items * depth + 2 + suffix
    # tokens the loss pass computes: each prompt once for its whole group (the shared-prompt
    # layout the trainer uses), then every completion's tokens; the expanded count (the prompt
    # repeated per completion) overstated FLOPs, and so MFU, by the sharing factor
    tokens = rl.users_per_step * (prompt_tokens + group * items * depth)
    per_step = float(np.median(seconds))
    tokens_per_second = tokens / float(np.median(phases["update"]))
    result = {"benchmark": "grpo_step", "method": args.method, "device": args.device,
              "seconds_per_step": round(per_step, 4),
              "share_generate": round(float(np.median(phases["generate"])) / per_step, 3),
              "share_score": round(float(np.median(phases["score"])) / per_step, 3),
              "share_update": round(float(np.median(phases["update"])) / per_step, 3),
              "update_tokens_per_second": round(tokens_per_second, 1), "parameters": int(n_params)}
    result.update(loss_pass(policy, rl.users_per_step, group, prompt_tokens, items * depth))
    if args.peak_tflops:
        result["mfu"] = round(6 * n_params * tokens_per_second / (args.peak_tflops * 1e12), 6)
    print(f"{args.method} step: {per_step:.3f} s ({rl.users_per_step} prompts x {group}), "
          f"model {n_params} parameters, torch {torch.__version__}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
