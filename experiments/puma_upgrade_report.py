"""The ``policy-upgrade`` experiment, read per arm around each model upgrade.

``python experiments/puma_upgrade_report.py runs/policy-upgrade__experiment__<stamp>``

For every arm (label) and seed: users' utility and accuracy (``accuracy/ndcg@10``) in the rounds
before the upgrade (mean of the ``--before`` rounds up to it) and in the first round the new model
serves; the dip between them; the rounds until recovery (the first round from the upgrade on whose
utility is back within one standard deviation of the rounds before it; 0: no dip beyond that
noise; NaN: not recovered before the run or the next upgrade ended); the prequential rating RMSE of
the prompts on the first round's ratings (``puma/rmse``); utility and accuracy over the rounds
after the upgrade (up to the next one), also as the paired difference with the cold arm of the
same seed (every arm of a seed is the same run until the upgrade, and gets the same new model);
and the migration's compute (seconds from
``train.csv``, optimiser steps ``puma/steps``). Means over seeds [95% percentile-bootstrap interval
over seeds], as the other studies of the README.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from agorasim.run.report import bootstrap_interval


def upgrade_rounds(run_dir: Path) -> list[int]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return [int(u["round"]) for u in config["policy"]["params"]["puma"]["upgrades"]]


def around(metrics: pd.DataFrame, train: pd.DataFrame, upgrade: int, end: int, before: int) -> dict[str, float]:
    """The figures of one upgrade (first round served by the new model: ``upgrade``)."""
    by_round = metrics.set_index("round")
    out = {}
    for key, name in (("users/utility", "utility"), ("accuracy/ndcg@10", "ndcg")):
        pre = by_round.loc[upgrade - before:upgrade - 1, key].to_numpy(np.float64)
        post = by_round.loc[upgrade:end - 1, key].to_numpy(np.float64)
        out[f"{name} before"], out[f"{name} at"] = float(pre.mean()), float(post[0])
        out[f"{name} dip"] = float(pre.mean() - post[0])
        out[f"{name} after"] = float(post.mean())
        out[f"{name} window"] = (upgrade, end)
        if name == "utility":
            back = np.flatnonzero(post >= pre.mean() - pre.std())
            out["rounds to recovery"] = float(back[0]) if len(back) else float("nan")
    out["rating RMSE at"] = float(by_round.loc[upgrade].get("puma/rmse", np.nan))
    out["rating RMSE after"] = float(by_round.loc[upgrade:end - 1, "puma/rmse"].mean())
    out["rating RMSE before"] = float(by_round.loc[upgrade - before:upgrade - 1, "puma/rmse"].mean())
    row = by_round.loc[upgrade - 1]  # the policy learned (upgraded) after this round
    out["steps"] = float(row.get("puma/steps", np.nan))
    seconds = train.loc[train["round"] == upgrade - 1, "time/puma_seconds"] if "time/puma_seconds" in train else []
    out["seconds"] = float(seconds.iloc[0]) if len(seconds) else float("nan")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", type=Path, nargs="+", help="experiment folders (their arms are pooled)")
    parser.add_argument("--before", type=int, default=3, help="rounds before the upgrade averaged")
    args = parser.parse_args(argv)
    arms: dict[tuple[str, int], dict[int, dict[str, float]]] = {}
    run_dirs = sorted(d for e in args.experiments for d in (e / "arms").glob("*__*") if (d / "summary.md").is_file())
    scheduled = next((upgrade_rounds(d)[:1] for d in run_dirs if upgrade_rounds(d)), [])
    series: dict[tuple[str, int], pd.DataFrame] = {}
    for run_dir in run_dirs:
        label, seed = run_dir.name.rsplit("__", 1)
        metrics = pd.read_csv(run_dir / "metrics.csv")
        series[(label, int(seed))] = metrics.set_index("round")
        train = pd.read_csv(run_dir / "train.csv") if (run_dir / "train.csv").is_file() else pd.DataFrame()
        rounds = upgrade_rounds(run_dir) or scheduled  # a control without upgrades: read at the first one's round
        ends = rounds[1:] + [int(metrics["round"].max()) + 1]
        for n, (upgrade, end) in enumerate(zip(rounds, ends)):
            arms.setdefault((label, n), {})[int(seed)] = around(metrics, train, upgrade, end, args.before)
    # every arm of a seed is the same run until its first upgrade (same world, same new model): the
    # arms' differences after it are the migration's alone, so they are also read paired with the
    # cold arm and the no-upgrade control of the same seed
    for (_label, n), seeds in arms.items():
        for against in ("cold", "no-upgrade"):
            for seed, row in seeds.items():
                for key, name in (("users/utility", "utility"), ("accuracy/ndcg@10", "ndcg")):
                    control = series.get((against, seed))
                    start, end = row[f"{name} window"]
                    base = np.nan if control is None or n > 0 else float(control.loc[start:end - 1, key].mean())
                    row[f"{name} after - {against}"] = row[f"{name} after"] - base
    keys = ["utility before", "utility at", "utility dip", "rounds to recovery", "utility after",
            "utility after - cold", "utility after - no-upgrade", "ndcg before", "ndcg at", "ndcg after - cold",
            "ndcg after - no-upgrade", "rating RMSE before", "rating RMSE at", "rating RMSE after", "seconds",
            "steps"]
    print("| arm | upgrade | seeds | " + " | ".join(keys) + " |")
    print("|---|---|---:|" + "---:|" * len(keys))
    for (label, n), by_seed in sorted(arms.items(), key=lambda a: (a[0][1], a[0][0])):
        rows = list(by_seed.values())
        cells = []
        for key in keys:
            values = np.array([r[key] for r in rows])
            if np.isnan(values).all():
                cells.append("—")
                continue
            mean, low, high = bootstrap_interval(values)
            digits = 1 if key in ("seconds", "steps", "rounds to recovery") else 3
            cells.append(f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
                         + (f" ({int(np.isnan(values).sum())} not)" if np.isnan(values).any() else ""))
        print(f"| {label} | {'AB'[n]}->{'BC'[n]} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
