"""A 6-arm sweep one arm after another against the same sweep as Ray tasks, 2 workers, on this machine.

Both runs are the same command (``experiments/run.py``, three policies x two seeds of the
cold-start world by default), each in a fresh process and a temporary folder; the Ray run adds
``--workers 2`` and so includes starting and stopping its local Ray. The baseline is the
sequential run: ``speedup`` is its wall time over Ray's. ``identical`` says whether every arm's
``metrics.csv`` and the comparison report are byte-identical between the two.

    python benchmarks/sweep.py
    python benchmarks/sweep.py --rounds 20 --workers 2

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(out: Path, args, workers: int | None) -> float:
    command = [sys.executable, str(ROOT / "experiments" / "run.py"), "--scenario", args.scenario,
               "--policy", args.policies, "--seeds", args.seeds, "--rounds", str(args.rounds),
               "--out", str(out), "--no-progress"]
    for override in args.overrides:
        command += ["--set", override]
    if workers:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def experiment_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if (p / "plan.yaml").exists()]
    return folder


def same_files(a: Path, b: Path) -> bool:
    arms = sorted(p.name for p in (a / "arms").iterdir())
    if arms != sorted(p.name for p in (b / "arms").iterdir()):
        return False
    files = [Path("arms") / arm / "metrics.csv" for arm in arms] + [Path("compare") / "summary.md"]
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="cold-start")
    parser.add_argument("--policies", default="popularity,bpr,random")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    arms = len(args.policies.split(",")) * len(args.seeds.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        seq_s = sweep(Path(tmp) / "seq", args, None)
        print(f"sequential: {seq_s:.1f} s", file=sys.stderr, flush=True)
        ray_s = sweep(Path(tmp) / "ray", args, args.workers)
        print(f"ray, {args.workers} workers: {ray_s:.1f} s", file=sys.stderr, flush=True)
        identical = same_files(experiment_folder(Path(tmp) / "seq"), experiment_folder(Path(tmp) / "ray"))
    print(json.dumps({"benchmark": "sweep", "scenario": args.scenario, "arms": arms, "rounds": args.rounds,
                      "workers": args.workers, "cpus": os.cpu_count(), "sequential_s": round(seq_s, 1),
                      "ray_s": round(ray_s, 1), "speedup": round(seq_s / ray_s, 2), "identical": identical}))


if __name__ == "__main__":
    main()
