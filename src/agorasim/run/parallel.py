"""Where the arms of an experiment run: one after another here, or as Ray tasks.

``run.executor=ray`` (``--workers N``, ``--ray-address ADDR``) sends every arm that is not
finished to Ray, ``run.workers`` at a time: a local Ray started for the command (``num_cpus`` =
the workers, logs kept out of the terminal, its session files in a temporary folder removed at the
end, an authentication token held in the environment rather than written to ``~/.ray``), or the
cluster at ``run.ray_address``. Ray is imported only here, and only when it is asked for.

A task gets the arm's resolved config as a plain dict (and, to resume, the arm folder packed as a
tar archive), rebuilds everything inside the worker with one torch thread, runs the arm in a
temporary folder of its own and sends the whole folder back; the driver unpacks it into
``arms/<arm>/`` of the experiment folder. No shared filesystem is needed, and the folder is the one
the sequential path writes: same config, same seed, byte-identical ``metrics.csv``.

An arm that fails (an exception, or a run stopped by ``RunStopped``) is reported with its error,
written to ``arms/<arm>/error.txt``, and keeps whatever it wrote (a stopped run keeps its
checkpoint); the other arms go on. ``--resume`` runs the failed and missing arms again.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agorasim.config import Config
from agorasim.errors import UserInputError

RAY_MISSING = "ray is not installed (pip install 'agorasim[ray]')"
ERROR_FILE = "error.txt"
_TOKEN = secrets.token_hex(32)  # one per driver process: Ray's token loader caches the first it reads


@dataclass
class ArmJob:
    """One arm to run: its config, its folder in the experiment and ``start`` or ``resume``."""

    name: str
    config: Config
    run_dir: Path
    state: str


@dataclass
class ArmOutcome:
    """How an arm ended: ``error`` is None when it finished (its ``summary.md`` is written)."""

    job: ArmJob
    seconds: float
    error: str | None = None


def run_arm(config: Config, run_dir: Path, state: str, progress: bool) -> None:
    """Start (or resume from its last checkpoint) one arm in ``run_dir`` and finish it."""
    from agorasim.run.runner import finish_run, load_run, run_market, start_run

    if state == "resume":
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
        market, recorder = load_run(run_dir, config.run.rounds)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        market, recorder, _ = start_run(config, run_dir=run_dir)
    run_market(market, recorder, progress=progress)
    finish_run(run_dir)


def describe_failure(error: BaseException) -> str:
    """One line for an arm's exception (``stopped: <reason>`` for ``RunStopped``)."""
    from agorasim.run.runner import RunStopped

    if isinstance(error, RunStopped):
        return f"stopped after round {error.rounds_done}: {error.reason}"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def record_failure(run_dir: Path, message: str, details: str) -> None:
    """``arms/<arm>/error.txt``: the one-line error and its traceback, beside what the arm wrote."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(f"{message}\n\n{details}".rstrip() + "\n", encoding="utf-8")


class Sequential:
    """Arms one after another in this process, each with its progress bar."""

    name = "sequential"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self) -> None:
        pass

    def run(self, jobs: list[ArmJob], note: Callable[[str], None]) -> Iterator[ArmOutcome]:
        for job in jobs:
            note(f"arm {job.name}: {job.state}")
            started = time.perf_counter()
            try:
                run_arm(job.config, job.run_dir, job.state, progress=job.config.run.progress)
            except Exception as error:  # noqa: BLE001 - one arm's failure must not lose the others
                message = describe_failure(error)
                record_failure(job.run_dir, message, traceback.format_exc())
                yield ArmOutcome(job, time.perf_counter() - started, message)
                continue
            yield ArmOutcome(job, time.perf_counter() - started)


def executor_for(config: Config, arms: int, warn: Callable[[str], None]):
    """The executor ``config.run`` asks for, for an experiment of ``arms`` arms.

    Without ray installed, ``run.executor=ray`` falls back to the sequential path with one line
    through ``warn``; ``run.ray_address`` (a cluster the user meant to use) is refused instead.
    """
    run = config.run
    if run.ray_address and run.executor != "ray":
        raise UserInputError(f"config run.ray_address={run.ray_address!r} joins a Ray cluster: it needs "
                             "run.executor=ray (--ray-address sets both)")
    if run.executor != "ray" or arms < 2:
        return Sequential()
    if importlib.util.find_spec("ray") is None:
        if run.ray_address:
            raise UserInputError(f"--ray-address {run.ray_address}: {RAY_MISSING}")
        warn(f"agorasim: {RAY_MISSING}; running the {arms} arms one after another")
        return Sequential()
    return RayArms(run.workers, run.ray_address)


def _pack(folder: Path) -> bytes:
    """``folder`` as an uncompressed tar archive whose one top-level entry is its name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


def _unpack(data: bytes, into: Path, name: str) -> Path:
    """Extract an archive made by ``_pack`` of a folder called ``name`` into ``into``; refuses
    anything else (links, absolute paths and ``..`` are refused by tarfile's ``data`` filter)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            if member.name != name and not member.name.startswith(name + "/"):
                raise ValueError(f"arm archive holds {member.name!r}, outside {name}/")
        tar.extractall(into, filter="data")
    return into / name


def _arm_task(config_data: dict, name: str, state: str, packed: bytes | None) -> dict:
    """The Ray task: one arm, run in a temporary folder of the worker, sent back as a tar archive.

    Everything is rebuilt here from ``config_data`` (the arm's resolved config as a plain dict),
    so the task pickles as a reference to this module and nothing else crosses processes.
    """
    import torch

    from agorasim.config import validate
    from agorasim.run import allocator

    allocator.tune()  # the worker's rounds run under the same malloc settings as the command line's
    torch.set_num_threads(1)
    config = validate(config_data)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agorasim-arm-") as tmp:
        run_dir = Path(tmp) / name
        if packed is not None:
            _unpack(packed, Path(tmp), name)
        error = details = None
        try:
            run_arm(config, run_dir, state, progress=False)
        except Exception as failure:  # noqa: BLE001 - reported to the driver with what was written
            error, details = describe_failure(failure), traceback.format_exc()
        files = _pack(run_dir) if run_dir.is_dir() else None
    return {"error": error, "details": details, "files": files, "seconds": time.perf_counter() - started}


def _install(job: ArmJob, files: bytes) -> None:
    """Replace the arm's folder in the experiment by the one the task sent back."""
    incoming = job.run_dir.parent / f".{job.name}.incoming"
    if incoming.exists():
        shutil.rmtree(incoming)
    incoming.mkdir(parents=True)
    try:
        _unpack(files, incoming, job.name)
        if job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        (incoming / job.name).rename(job.run_dir)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


class RayArms:
    """Arms as Ray tasks, ``workers`` at a time, on a local Ray or the cluster at ``address``."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None):
        self.workers = workers
        self.address = address
        self._started = False
        self._temp_dir: str | None = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _set_env(self, key: str, value: str) -> None:
        self._saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def start(self) -> None:
        """Start (or join) Ray; a cluster that cannot be reached is one ``UserInputError`` line."""
        if self._started:
            return
        import ray

        import agorasim

        options = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
        if self.address:
            where = f"--ray-address {self.address}"
            options["address"] = self.address
        else:
            where = "local Ray"
            # the workers import the agorasim this driver runs (a checkout on PYTHONPATH included)
            root = str(Path(agorasim.__file__).resolve().parents[1])
            paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            if root not in paths:
                self._set_env("PYTHONPATH", os.pathsep.join([root, *paths]))
            # a new local cluster gets token authentication, and Ray writes a fresh token to
            # ~/.ray/auth_token unless one exists: hand it one in the environment instead (Ray
            # itself then sets RAY_AUTH_MODE=token here, put back as it was by stop())
            if not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) \
                    and not (Path.home() / ".ray" / "auth_token").is_file():
                self._set_env("RAY_AUTH_TOKEN", _TOKEN)
            for key in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
                self._saved_env.setdefault(key, os.environ.get(key))
            self._temp_dir = tempfile.mkdtemp(prefix="agorasim-ray-")
            options.update(num_cpus=self.workers, num_gpus=0, _temp_dir=self._temp_dir)
        try:
            ray.init(**options)
        except Exception as error:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError...
            self.stop()
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserInputError(f"{where}: Ray did not start ({first})") from None
        self._started = True

    def stop(self) -> None:
        """``ray.shutdown()``, then the local session folder and the environment as they were."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def run(self, jobs: list[ArmJob], note: Callable[[str], None]) -> Iterator[ArmOutcome]:
        """Submit the jobs, ``workers`` in flight at a time; yield each outcome as it arrives,
        once its folder is in the experiment."""
        if not jobs:
            return
        self.start()
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(_arm_task)
        queue, pending = list(jobs), {}
        started: dict[str, float] = {}
        try:
            while queue or pending:
                while queue and len(pending) < self.workers:
                    job = queue.pop(0)
                    packed = _pack(job.run_dir) if job.state == "resume" else None
                    pending[task.remote(job.config.model_dump(mode="json"), job.name, job.state, packed)] = job
                    started[job.name] = time.perf_counter()
                    note(f"arm {job.name}: {job.state} (Ray task)")
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready)
                seconds = time.perf_counter() - started[job.name]
                try:
                    result = ray.get(ready)
                except ray.exceptions.RayError as error:  # the worker died, or the task could not run
                    message = describe_failure(error)
                    record_failure(job.run_dir, message, str(error))
                    yield ArmOutcome(job, seconds, message)
                    continue
                if result["files"] is not None:
                    _install(job, result["files"])
                if result["error"]:
                    record_failure(job.run_dir, result["error"], result["details"] or "")
                yield ArmOutcome(job, seconds, result["error"])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
