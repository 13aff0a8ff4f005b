"""Does a round get slower as the run ages? Seconds per round at rounds 1, 100, 500 and 1,000 of one run.

One run of a scenario (default cold-start with the popularity policy) goes through the runner's
own pieces (``start_run``, the recorder's per-round files and its checkpoints every
``run.checkpoint_every`` rounds), in a temporary folder. Each reported figure is the median of the
rounds in a window of 11 around the named round (a checkpoint round is timed apart), so one slow
round does not decide it. The baseline is the same run's early rounds: ``slowdown`` is the
seconds per round at the last named round over those at round 1.

    python benchmarks/horizon.py                        # popularity, 1,000 rounds
    python benchmarks/horizon.py --policy generative    # the default policy of cold-start

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agorasim.config import build_config
from agorasim.run import allocator, runner
from agorasim.scenarios import load_scenario

AT = (1, 100, 500, 1000)
WINDOW = 5  # rounds either side of a named round


def main() -> None:
    allocator.tune()  # as the command line runs (run/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="cold-start")
    parser.add_argument("--policy", default="popularity")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    at = [r for r in AT if r <= args.rounds] or [args.rounds]
    config = build_config(load_scenario(args.scenario), [
        f"policy.name={args.policy}", f"run.rounds={args.rounds}", "run.progress=false", *args.overrides])
    step_seconds, checkpoint_seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        market, recorder, run_dir = runner.start_run(config, Path(tmp) / "run")
        while market.world.round < args.rounds:
            t0 = time.perf_counter()
            recorder.run_round(market)
            step_seconds.append(time.perf_counter() - t0)
            if market.world.round % config.run.checkpoint_every == 0 or market.world.round == args.rounds:
                t0 = time.perf_counter()
                path = recorder.checkpoint(market)
                checkpoint_seconds.append(time.perf_counter() - t0)
            if market.world.round % 100 == 0:
                print(f"round {market.world.round}: {step_seconds[-1]:.3f} s", file=sys.stderr, flush=True)
        total = time.perf_counter() - started
        checkpoint_mib = path.stat().st_size / 2**20
        log_mib = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "log").glob("*")) / 2**20
    steps = np.asarray(step_seconds)
    seconds_at = {r: float(np.median(steps[max(r - 1 - WINDOW, 0): r + WINDOW])) for r in at}
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # the world grows with its arrivals: say how big it was, so growth is not read as a leak
    size_at = {r: {k: int(market.rows[r - 1][f"{k}"]) for k in ("items/alive", "users/active", "users/visits")}
               for r in at}
    for r in at:
        size = size_at[r]
        print(f"round {r:5d}: {seconds_at[r]:.4f} s per round (median of the rounds around it); "
              f"{size['items/alive']} items alive, {size['users/active']} users active, {size['users/visits']} visits")
    print(f"{args.rounds} rounds in {total:.1f} s; checkpoints {np.sum(checkpoint_seconds):.1f} s in all, "
          f"the last {checkpoint_mib:.1f} MiB (+ {log_mib:.1f} MiB of log segments); peak memory {peak_gib:.2f} GiB")
    print(json.dumps({"benchmark": "horizon", "scenario": args.scenario, "policy": args.policy, "rounds": args.rounds,
                      "seconds_at": {str(r): round(s, 5) for r, s in seconds_at.items()},
                      "size_at": {str(r): v for r, v in size_at.items()},
                      "slowdown": round(seconds_at[at[-1]] / seconds_at[at[0]], 3), "total_seconds": round(total, 2),
                      "checkpoint_seconds": round(float(np.sum(checkpoint_seconds)), 2),
                      "checkpoint_mib": round(checkpoint_mib, 2), "log_mib": round(log_mib, 2),
                      "peak_gib": round(peak_gib, 3)}))


if __name__ == "__main__":
    main()
