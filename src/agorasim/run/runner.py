"""Run loop and run folder: ``runs/<scenario>__<label>__<seed>__<timestamp>/``.

Files (DESIGN section 10): ``config.yaml`` (resolved config + versions and git sha),
``metrics.csv`` (one row per round, no wall-clock values, so the same seed gives a byte-identical
file), ``train.csv`` (policy training rows), ``timings.csv`` (seconds per round), ``lorenz.csv``,
``events.jsonl`` (grounded judgements of a few users per round), ``checkpoints/`` and, at the end,
``plots/*.png`` and ``summary.md``. Checkpoints are pickles of the whole market written atomically
(temp file + rename); ``resume`` truncates the files to the checkpoint and continues, giving the
same ``metrics.csv`` as an uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from agorasim.config import Config, dump_config, validate
from agorasim.errors import UserInputError
from agorasim.metrics import exposure

CHECKPOINT_PATTERN = re.compile(r"round_(\d+)\.pkl$")


def _cell(value) -> str:
    if value is None:
        return ""
    value = float(value)
    if not np.isfinite(value):
        return "" if np.isnan(value) else repr(value)
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class CsvTable:
    """A CSV file mirrored from a list of dict rows; the header grows when new keys appear."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        self.written = 0

    def sync(self, rows: list[dict]) -> None:
        keys = list(self.columns)
        for row in rows[self.written:]:
            keys += [k for k in row if k not in keys]
        if keys != self.columns or self.written > len(rows):
            self.columns, self.written = keys, 0
            self._write(rows, "w")
        elif len(rows) > self.written:
            self._write(rows[self.written:], "a")
        self.written = len(rows)

    def _write(self, rows: list[dict], mode: str) -> None:
        with open(self.path, mode) as f:
            if mode == "w":
                f.write(",".join(self.columns) + "\n")
            for row in rows:
                f.write(",".join(_cell(row.get(c)) for c in self.columns) + "\n")


def _provenance() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("agorasim", "numpy", "torch", "transformers", "langgraph", "mesa", "faiss-cpu", "networkx", "pydantic"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_sha": sha,
            "python": sys.version.split()[0], "versions": versions}


def new_run_dir(config: Config) -> Path:
    """A fresh run folder (never an existing one)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    label = re.sub(r"[^A-Za-z0-9_.+=@-]+", "-", config.label)
    base = Path(config.run.out) / f"{config.scenario}__{label}__{config.run.seed}__{stamp}"
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


class Recorder:
    """Writes a market's rounds into its run folder (attached as ``market.recorder``)."""

    def __init__(self, run_dir: Path, config: Config, timings: list[dict] | None = None,
                 lorenz: list[dict] | None = None, events_lines: int = 0):
        self.run_dir = run_dir
        self.config = config
        self.metrics = CsvTable(run_dir / "metrics.csv")
        self.train = CsvTable(run_dir / "train.csv")
        self.timing_table = CsvTable(run_dir / "timings.csv")
        self.lorenz_table = CsvTable(run_dir / "lorenz.csv")
        self.timings = timings or []
        self.lorenz = lorenz or []
        self.events_lines = events_lines
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        self._round_started = time.perf_counter()

    def start_round(self) -> None:
        self._round_started = time.perf_counter()

    def on_round(self, market, row, users, slates, feedback, alive, window) -> None:
        cfg = self.config.run
        rnd = int(row["round"])
        self.metrics.sync(market.rows)
        self.train.sync(market.train_rows)
        if rnd % cfg.lorenz_every == 0 or rnd == cfg.rounds - 1:
            _, shares = exposure.lorenz(window[alive], points=21)
            self.lorenz.append({"round": rnd, **{f"p{i}": float(s) for i, s in enumerate(shares)}})
            self.lorenz_table.sync(self.lorenz)
        if cfg.events_users and len(users):
            rows = np.arange(min(cfg.events_users, len(users)))
            with open(self.run_dir / "events.jsonl", "a") as f:
                for record in feedback.records(users, slates, rnd, rows):
                    f.write(record.model_dump_json() + "\n")
                    self.events_lines += 1
        self.timings.append({"round": rnd, "seconds": time.perf_counter() - self._round_started,
                             **market.last_timings})
        self.timing_table.sync(self.timings)

    def checkpoint(self, market) -> Path:
        """Pickle the market between rounds (and the files' row counts) atomically; keep the
        last two. The file is named by the number of completed rounds."""
        folder = self.run_dir / "checkpoints"
        path = folder / f"round_{market.world.round:05d}.pkl"
        payload = {"market": market, "timings": self.timings, "lorenz": self.lorenz,
                   "events_lines": self.events_lines}
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in sorted(folder.glob("round_*.pkl"))[:-2]:
            old.unlink()
        return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("round_*.pkl")) if (run_dir / "checkpoints").is_dir() else []
    return found[-1] if found else None


def _truncate_lines(path: Path, keep: int) -> None:
    if not path.exists():
        return
    with open(path) as f:
        lines = f.readlines()[:keep]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def load_run(run_dir: Path, rounds: int | None = None):
    """(market, recorder) restored from the latest checkpoint of ``run_dir``."""
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserInputError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    if checkpoint is None:
        raise UserInputError(f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    with open(checkpoint, "rb") as f:
        payload = pickle.load(f)
    market = payload["market"]
    if rounds is not None:
        market.config.run.rounds = rounds
    # files may hold rounds written after the checkpoint: rewrite them from the checkpoint
    for name in ("metrics.csv", "train.csv", "timings.csv", "lorenz.csv"):
        (run_dir / name).unlink(missing_ok=True)
    recorder = Recorder(run_dir, market.config, payload["timings"], payload["lorenz"], payload["events_lines"])
    recorder.metrics.sync(market.rows)
    recorder.train.sync(market.train_rows)
    recorder.timing_table.sync(recorder.timings)
    recorder.lorenz_table.sync(recorder.lorenz)
    _truncate_lines(run_dir / "events.jsonl", recorder.events_lines)
    market.recorder = recorder
    market.engines.set_default_path(run_dir / "llm_cache.jsonl")
    return market, recorder


def run_market(market, recorder: Recorder, progress: bool = True) -> None:
    """Run the market's remaining rounds with a progress bar showing Gini and utility."""
    from tqdm import tqdm

    total = market.config.run.rounds
    bar = tqdm(total=total, initial=market.world.round, disable=not progress, desc=market.config.label,
               unit="round", file=sys.stderr, dynamic_ncols=True)
    while market.world.round < total:
        recorder.start_round()
        market.step()
        done = market.world.round
        if done % market.config.run.checkpoint_every == 0 or done == total:
            recorder.checkpoint(market)
        row = market.rows[-1]
        bar.set_postfix(gini=f"{row['exposure/gini']:.3f}", utility=f"{row['users/utility']:.3f}", refresh=False)
        bar.update(1)
    bar.close()


def start_run(config: Config, run_dir: Path | None = None):
    """Build the market (all validation happens here, before any folder is created), then the
    run folder (``run_dir``, or a fresh timestamped one under ``run.out``) and its recorder."""
    from agorasim.env.market import Market

    market = Market(config)
    config.run.label = config.label  # resolved, so reports group runs by it
    if run_dir is None:
        run_dir = new_run_dir(config)
    else:
        run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config, _provenance()))
    recorder = Recorder(run_dir, config)
    market.recorder = recorder
    market.engines.set_default_path(run_dir / "llm_cache.jsonl")
    return market, recorder, run_dir


def finish_run(run_dir: Path) -> Path:
    from agorasim.run.report import write_run_report

    return write_run_report(run_dir)
