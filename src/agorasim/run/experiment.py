"""Experiment folders: many arms (policies, variants, sweep points x seeds) that resume arm by arm.

``runs/<scenario>__experiment__<timestamp>/``::

    plan.yaml          the scenario as loaded and the overrides given: the experiment is rebuilt
                       from it (the same arms, in the same order) when it is resumed
    arms/<arm>/        one run folder per arm and seed, named ``<label>__<seed>`` (``error.txt`` in
                       it when the arm failed: the error and its traceback)
    compare/           the comparison of every finished arm, rewritten at the end of each sitting

The arms run one after another in this process, or as Ray tasks (``run.executor=ray``,
``run/parallel.py``); either way each arm's folder is the same, and one failing arm is reported
while the others go on. ``--resume EXPERIMENT_DIR`` keeps finished arms (their ``summary.md``
exists and their last metrics row is the last round), continues unfinished ones from their last
checkpoint, and runs the missing ones; an arm folder without a checkpoint is started again.
``agorasim report EXPERIMENT_DIR`` rebuilds the comparison from whatever has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from agorasim.config import Config, build_config, load_yaml
from agorasim.errors import UserInputError
from agorasim.run.checkpoint import write_atomic
from agorasim.run.runner import safe_part

PLAN = "plan.yaml"


def arm_name(config: Config) -> str:
    """``<label>__<seed>`` with characters that are unsafe in a folder name replaced."""
    return f"{safe_part(config.label, 'arm')}__{config.run.seed}"


def is_experiment(path: Path) -> bool:
    return (Path(path) / PLAN).is_file()


def new_experiment(out: Path, scenario: str, base: dict, overrides: list[str]) -> Path:
    """A fresh experiment folder holding the plan."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = safe_part(scenario, "custom")
    path, n = Path(out) / f"{safe}__experiment__{stamp}", 1
    while path.exists():
        path, n = Path(out) / f"{safe}__experiment__{stamp}-{n}", n + 1
    (path / "arms").mkdir(parents=True)
    (path / PLAN).write_text(yaml.safe_dump({"base": base, "overrides": list(overrides)}, sort_keys=False))
    return path


def read_plan(path: Path) -> tuple[dict, list[str]]:
    """(scenario dict, overrides) of an experiment folder."""
    try:
        plan = load_yaml((Path(path) / PLAN).read_text())
        return plan["base"], list(plan["overrides"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise UserInputError(f"--resume {path}: {PLAN} is unreadable ({type(error).__name__})") from None


def set_rounds(path: Path, rounds: int) -> list[str]:
    """Record ``run.rounds=<rounds>`` in the plan (``--resume EXPERIMENT --rounds N``); returns the
    new overrides. Arms that already ran more rounds than that are refused, not cut."""
    base, overrides = read_plan(path)
    for arm in (Path(path) / "arms").glob("*"):
        if _rounds_written(arm) > rounds:
            raise UserInputError(f"--rounds {rounds}: arm {arm.name} already has {_rounds_written(arm)} rounds")
    overrides = [o for o in overrides if not o.replace(" ", "").startswith("run.rounds=")] + [f"run.rounds={rounds}"]
    write_atomic(Path(path) / PLAN, yaml.safe_dump({"base": base, "overrides": overrides}, sort_keys=False))
    return overrides


def arm_state(run_dir: Path, rounds: int) -> str:
    """``done``, ``resume`` (a checkpoint to continue from) or ``start`` (nothing usable)."""
    from agorasim.run.runner import latest_checkpoint

    if (run_dir / "summary.md").is_file() and _rounds_written(run_dir) >= rounds:
        return "done"
    return "resume" if run_dir.is_dir() and latest_checkpoint(run_dir) is not None else "start"


def _rounds_written(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path) as f:
        return max(sum(1 for _ in f) - 1, 0)


@dataclass
class ExperimentResult:
    """What a sitting of an experiment left: its comparison and the arms that failed."""

    summary: Path | None  # compare/summary.md, None when no arm has finished
    failed: list[tuple[str, str]] = field(default_factory=list)  # (arm name, one-line error)


def run_experiment(path: Path, configs: list[Config], x_key: str | None, progress_note=print,
                   executor=None) -> ExperimentResult:
    """Run (or finish) every arm of an experiment folder, then write its comparison.

    Finished arms are kept; the others go to ``executor`` (``parallel.Sequential`` by default,
    or ``parallel.RayArms``). An arm that fails is reported through ``progress_note`` and in
    ``arms/<arm>/error.txt`` while the others go on; the comparison covers the finished arms, in
    the order of ``configs`` whatever order they finished in.
    """
    from agorasim.run.parallel import ArmJob, Sequential
    from agorasim.run.report import write_comparison_report

    executor = executor or Sequential()
    names = [arm_name(c) for c in configs]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise UserInputError(f"experiment: two arms share the name '{duplicate}' (give variants distinct labels)")
    run_dirs, jobs = [], []
    for config, name in zip(configs, names):
        run_dir = Path(path) / "arms" / name
        state = arm_state(run_dir, config.run.rounds)
        if state == "done":
            progress_note(f"arm {name}: finished, kept")
            progress_note(f"run folder: {run_dir}")
        else:
            jobs.append(ArmJob(name, config, run_dir, state))
        run_dirs.append(run_dir)
    failed = []
    for n, outcome in enumerate(executor.run(jobs, progress_note), 1):
        job = outcome.job
        if outcome.error is None:
            progress_note(f"arm {job.name}: finished in {outcome.seconds:.1f} s ({n} of {len(jobs)})")
            progress_note(f"run folder: {job.run_dir}")
        else:
            failed.append((job.name, outcome.error))
            progress_note(f"arm {job.name}: FAILED after {outcome.seconds:.1f} s ({n} of {len(jobs)}): {outcome.error} "
                          f"(details in {job.run_dir / 'error.txt'})")
    finished = [d for d in run_dirs if (d / "summary.md").is_file()]
    control = configs[0].experiment.control if configs else None
    summary = write_comparison_report(finished, Path(path) / "compare", x_key, control=control) if finished else None
    return ExperimentResult(summary, failed)


def plan_control(path: Path) -> str | None:
    """The ``experiment.control`` label of an experiment folder's plan (None when it names none)."""
    base, overrides = read_plan(path)
    return build_config(base, overrides).experiment.control


def finished_arms(path: Path) -> list[Path]:
    """Arm folders of an experiment that have a summary (for ``agorasim report``)."""
    return sorted(p for p in (Path(path) / "arms").glob("*") if (p / "summary.md").is_file())
