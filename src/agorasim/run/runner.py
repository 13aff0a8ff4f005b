"""Run loop and run folder: ``runs/<scenario>__<label>__<seed>__<timestamp>/``.

Files (DESIGN section 10): ``config.yaml`` (resolved config + versions and git sha),
``metrics.csv`` (one row per round, no wall-clock values, so the same seed gives a byte-identical
file), ``train.csv`` (policy training rows), ``timings.csv`` (seconds per round), ``lorenz.csv``,
``groups.csv`` (exposure share of each popularity group and its target, per round),
``events.jsonl`` (grounded judgements of a few users per round, with the promotions shown), ``checkpoints/`` and, at the end,
``plots/*.png`` and ``summary.md``. Checkpoints (``run/checkpoint.py``) hold the whole market with
a digest, written atomically and read back through an allow-list unpickler; the last two are kept,
and a damaged newest one falls back to the one before. ``resume`` checks ``config.yaml`` against
the checkpoint (only ``run.rounds`` and ``run.progress`` may change), truncates the files to the
checkpoint and continues, giving the same ``metrics.csv`` as an uninterrupted run. An interrupt
(Ctrl-C, SIGTERM) finishes the current round, writes a checkpoint and stops.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from agorasim.config import Config, dump_config, flatten, load_yaml, validate
from agorasim.errors import UserInputError
from agorasim.metrics import exposure
from agorasim.run import checkpoint as ckpt
from agorasim.run.tracking import make_tracker

CHECKPOINT_GLOB = "round_*.ckpt"
# What ``--resume`` may change: everything else would change the trajectory.
RESUMABLE_KEYS = ("run.rounds", "run.progress", "run.executor", "run.workers", "run.ray_address")


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
    return {"created": datetime.now(UTC).isoformat(timespec="seconds"), "git_sha": sha,
            "python": sys.version.split()[0], "versions": versions, "lock": lock_digest()}


LOCK_FILE = Path(__file__).resolve().parents[3] / "locks" / "cpu.txt"


def lock_digest(path: Path = LOCK_FILE) -> str | None:
    """SHA-256 of the checkout's lock file (``locks/cpu.txt``, what ``make setup`` installs), or
    None for an agorasim installed without one."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def safe_part(text: str, empty: str = "run") -> str:
    """``text`` as one folder-name part: runs of unsafe characters (path separators among them)
    become '-', and leading/trailing dots and dashes go, so no part can climb out of ``run.out``."""
    return re.sub(r"[^A-Za-z0-9_.+=@-]+", "-", text).strip("-.") or empty


def new_run_dir(config: Config) -> Path:
    """A fresh run folder (never an existing one), always directly inside ``run.out``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{safe_part(config.scenario, 'custom')}__{safe_part(config.label)}__{config.run.seed}__{stamp}"
    base = Path(config.run.out) / name
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


class Recorder:
    """Writes a market's rounds into its run folder, after each step (``run_round``)."""

    def __init__(self, run_dir: Path, config: Config, timings: list[dict] | None = None,
                 lorenz: list[dict] | None = None, events_lines: int = 0, log_saved: int = 0):
        self.run_dir = run_dir
        self.config = config
        self.metrics = CsvTable(run_dir / "metrics.csv")
        self.train = CsvTable(run_dir / "train.csv")
        self.timing_table = CsvTable(run_dir / "timings.csv")
        self.lorenz_table = CsvTable(run_dir / "lorenz.csv")
        self.group_table = CsvTable(run_dir / "groups.csv")
        self.timings = timings or []
        self.lorenz = lorenz or []
        self.events_lines = events_lines
        self.log_saved = log_saved  # interaction-log chunks already in checkpoints/log/
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        self.tracker = make_tracker(config.run.track, run_dir)
        self._round_started = time.perf_counter()

    def run_round(self, market) -> None:
        """One round of the market, then its rows and files into the run folder."""
        self._round_started = time.perf_counter()
        market.step()
        self.on_round(market)

    def on_round(self, market) -> None:
        """Write the round the market just ran (``market.last_round``): metrics, training rows,
        Lorenz points, events and timings."""
        cfg = self.config.run
        last = market.last_round
        row, users, slates, feedback = last["row"], last["users"], last["slates"], last["feedback"]
        alive, window = last["alive"], last["window"]
        rnd = int(row["round"])
        self.metrics.sync(market.rows)
        self.train.sync(market.train_rows)
        self.group_table.sync(getattr(market, "group_rows", []))
        if self.tracker is not None:
            self.tracker.sync(market.rows, market.train_rows)
        if rnd % cfg.lorenz_every == 0 or rnd == cfg.rounds - 1:
            _, shares = exposure.lorenz(window[alive], points=21)
            self.lorenz.append({"round": rnd, **{f"p{i}": float(s) for i, s in enumerate(shares)}})
            self.lorenz_table.sync(self.lorenz)
        if cfg.events_users and len(users):
            rows = np.arange(min(cfg.events_users, len(users)))
            with open(self.run_dir / "events.jsonl", "a") as f:
                for record in feedback.records(users, slates, rnd, rows, last.get("shown"), last.get("explained"),
                                               getattr(getattr(market, "explainer", None), "names", ())):
                    f.write(record.model_dump_json() + "\n")
                    self.events_lines += 1
        self.timings.append({"round": rnd, "seconds": time.perf_counter() - self._round_started,
                             **market.last_timings})
        self.timing_table.sync(self.timings)

    def checkpoint(self, market) -> Path:
        """Write the market between rounds (and the files' row counts) atomically; keep the
        newest ``run.keep_checkpoints``. The file is named by the number of completed rounds."""
        folder = self.run_dir / "checkpoints"
        path = folder / f"round_{market.world.round:05d}.ckpt"
        log = market.world.log
        n_chunks = len(log.chunks)
        if n_chunks > self.log_saved:  # the log's new rounds go to a segment of their own, once
            ckpt.write_log_segment(folder / "log", self.log_saved, n_chunks, log.segment(self.log_saved))
        payload = {"market": market, "timings": self.timings, "lorenz": self.lorenz,
                   "events_lines": self.events_lines, "log_chunks": n_chunks}
        chunks, log.chunks = log.chunks, []  # the checkpoint holds the market without its log
        try:
            ckpt.write(path, payload)
        finally:
            log.chunks = chunks
        self.log_saved = n_chunks
        for old in checkpoints(self.run_dir)[:-self.config.run.keep_checkpoints]:
            old.unlink()
        return path


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(folder.glob(CHECKPOINT_GLOB)) if folder.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _truncate_lines(path: Path, keep: int) -> None:
    if not path.exists():
        return
    with open(path) as f:
        lines = f.readlines()[:keep]
    ckpt.write_atomic(path, "".join(lines))


def read_run_config(run_dir: Path) -> tuple[Config, dict]:
    """(config, meta) of a run folder's ``config.yaml``; one line if it is unreadable or invalid."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserInputError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserInputError(f"{path}: not valid YAML ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a mapping of config sections")
    meta = data.pop("meta", None) or {}
    try:
        return validate(data), meta
    except UserInputError as error:
        raise UserInputError(f"{path}: {error}") from None


def _load_checkpoint(run_dir: Path, note) -> dict:
    """The newest intact checkpoint's payload; a damaged newer one is reported and skipped."""
    found = checkpoints(run_dir)
    if not found:
        legacy = sorted((Path(run_dir) / "checkpoints").glob("round_*.pkl"))
        if legacy:
            raise UserInputError(f"--resume {run_dir}: {legacy[-1].name} was written by an older agorasim as a "
                                 "plain pickle, which this version does not load (a pickle can run code)")
        raise UserInputError(f"--resume {run_dir}: no checkpoint in {Path(run_dir) / 'checkpoints'}")
    problems = []
    for path in reversed(found):
        try:
            payload = ckpt.read(path)
            log = payload["market"].world.log
            for segment in ckpt.read_log(Path(run_dir) / "checkpoints" / "log", payload["log_chunks"]):
                log.extend_from_segment(segment)
            log.recompact()  # segments hold rounds as they were when written, some since compacted
        except ckpt.CheckpointError as error:
            problems.append(f"{path.name}: {error}")
            continue
        if problems:
            note(f"agorasim: {'; '.join(problems)}; resuming from {path.name} instead")
        return payload
    raise UserInputError(f"--resume {run_dir}: no usable checkpoint ({'; '.join(problems)})")


def load_run(run_dir: Path, rounds: int | None = None, note=None):
    """(market, recorder) restored from the newest intact checkpoint of ``run_dir``.

    ``config.yaml`` must agree with the checkpoint except for ``RESUMABLE_KEYS``; ``rounds`` (or
    an edited ``run.rounds`` in ``config.yaml``) may extend or shorten the run down to the rounds
    already done. ``config.yaml`` is rewritten to say what will run. Every check happens before
    any file of the run folder is touched.
    """
    note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    file_config, meta = read_run_config(run_dir)
    payload = _load_checkpoint(run_dir, note)
    market = payload["market"]
    ran = market.config.model_dump(mode="json")
    ran["run"]["label"] = ran["run"]["label"] or file_config.run.label  # resolved at start
    stated = flatten(file_config.model_dump(mode="json"))
    for key, value in flatten(ran).items():
        if key not in RESUMABLE_KEYS and stated.get(key) != value:
            raise UserInputError(
                f"{run_dir / 'config.yaml'}: {key} is {stated.get(key)!r} but the run's checkpoint has {value!r}; "
                f"resume continues the run as it started (only {', '.join(RESUMABLE_KEYS)} may change): "
                "restore it or start a new run")
    target = file_config.run.rounds if rounds is None else rounds
    done = market.world.round
    if target < max(done, 1):
        raise UserInputError(f"--rounds {target}: the run has {done} rounds done; give at least {max(done, 1)}")
    market.config.run.rounds = target
    market.config.run.progress = file_config.run.progress
    meta = dict(meta)
    meta["resumed"] = list(meta.get("resumed") or []) + [
        {"at": datetime.now(UTC).isoformat(timespec="seconds"), "from_round": done, "rounds": target}]
    ckpt.write_atomic(run_dir / "config.yaml", dump_config(market.config, meta))
    # files may hold rounds written after the checkpoint: rewrite them from the checkpoint
    for name in ("metrics.csv", "train.csv", "timings.csv", "lorenz.csv", "groups.csv"):
        (run_dir / name).unlink(missing_ok=True)
    recorder = Recorder(run_dir, market.config, payload["timings"], payload["lorenz"], payload["events_lines"],
                        log_saved=payload["log_chunks"])
    recorder.metrics.sync(market.rows)
    recorder.train.sync(market.train_rows)
    recorder.group_table.sync(getattr(market, "group_rows", []))
    if recorder.tracker is not None:
        recorder.tracker.skip(len(market.rows), len(market.train_rows))
    recorder.timing_table.sync(recorder.timings)
    recorder.lorenz_table.sync(recorder.lorenz)
    _truncate_lines(run_dir / "events.jsonl", recorder.events_lines)
    (run_dir / "summary.md").unlink(missing_ok=True)  # no longer true once the run goes on
    market.engines.set_default_path(run_dir / "llm_cache.jsonl")
    return market, recorder


class Interrupted(KeyboardInterrupt):
    """Raised by ``run_market`` after an interrupt, once the checkpoint is written."""

    def __init__(self, run_dir: Path, rounds_done: int):
        super().__init__(f"interrupted after round {rounds_done}")
        self.run_dir = run_dir
        self.rounds_done = rounds_done


class RunStopped(RuntimeError):
    """Raised by ``run_market`` when the run cannot go on usefully (the language-model agents fall
    back to the utility model too often), once the checkpoint is written."""

    def __init__(self, run_dir: Path, rounds_done: int, reason: str):
        super().__init__(reason)
        self.run_dir = run_dir
        self.rounds_done = rounds_done
        self.reason = reason


class _StopRequests:
    """SIGINT/SIGTERM set a flag that the run loop reads between rounds; a second SIGINT aborts
    at once (the last checkpoint stays)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nagorasim: stopping after this round (Ctrl-C again to stop now, losing it)", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def run_market(market, recorder: Recorder, progress: bool = True) -> None:
    """Run the market's remaining rounds with a progress bar showing Gini and utility.

    On SIGINT or SIGTERM the round under way is finished, a checkpoint written and ``Interrupted``
    raised, so ``--resume`` continues exactly where the run stopped.
    """
    from tqdm import tqdm

    total = market.config.run.rounds
    bar = tqdm(total=total, initial=market.world.round, disable=not progress, desc=market.config.label,
               unit="round", file=sys.stderr, dynamic_ncols=True)
    llm = market.config.agents.llm
    streak = 0  # rounds in a row with llm/fallback_rate above the limit
    with _StopRequests() as stop:
        while market.world.round < total:
            recorder.run_round(market)
            done = market.world.round
            row = market.rows[-1]
            rate = row.get("llm/fallback_rate")
            streak = streak + 1 if rate is not None and np.isfinite(rate) and rate > llm.fallback_limit else 0
            failing = streak >= llm.fallback_rounds and llm.fallback_limit < 1
            stopping = stop.requested  # read once: a signal arriving later in this iteration waits a round
            if done % market.config.run.checkpoint_every == 0 or done == total or stopping or failing:
                recorder.checkpoint(market)
            bar.set_postfix(gini=f"{row['exposure/gini']:.3f}", utility=f"{row['users/utility']:.3f}", refresh=False)
            bar.update(1)
            if failing and done < total:
                bar.close()
                raise RunStopped(recorder.run_dir, done, (
                    f"the language-model agents fell back to the utility model for more than "
                    f"{llm.fallback_limit:.0%} of their answers in {streak} rounds in a row (last: {rate:.0%})"))
            if stopping and done < total:
                bar.close()
                raise Interrupted(recorder.run_dir, done)
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
    market.engines.set_default_path(run_dir / "llm_cache.jsonl")
    return market, recorder, run_dir


def finish_run(run_dir: Path) -> Path:
    from agorasim.run.report import write_run_report

    return write_run_report(run_dir)
