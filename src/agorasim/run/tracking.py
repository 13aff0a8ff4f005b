"""An optional tracking sink beside the run folder: ``run.track=tensorboard``.

The run folder stays the source of truth; the sink only mirrors it for the tools researchers
already watch runs with. Every metrics row is written as scalars at step = round (tag = the
column, e.g. ``exposure/gini``), every training row under ``train_rows/<column>`` at step = its
index, to ``<run folder>/tensorboard/`` (``tensorboard --logdir runs/``). TensorBoard comes with
the ``track`` extra and is imported only when asked for; preflight refuses ``run.track`` without
it, on one line, before the run folder is made. A resumed run appends a new event file from the
checkpoint's round, so rounds run after the last checkpoint of the interrupted sitting appear
twice, with the same values (same seed).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from agorasim.errors import UserInputError

TRACKERS = ("none", "tensorboard")


def check_tracker(name: str) -> None:
    """One line unless the tracker ``name`` can be used here."""
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserInputError("config run.track=tensorboard: tensorboard is not installed "
                             "(pip install 'agorasim[track]'), or set run.track=none")


class TensorBoardSink:
    """Mirrors the market's metrics and training rows into a TensorBoard event file."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.rows = 0  # metrics rows already written
        self.train_rows = 0

    def skip(self, rows: int, train_rows: int) -> None:
        """Start after the rows a checkpoint already holds (resume)."""
        self.rows, self.train_rows = rows, train_rows

    def sync(self, rows: list[dict], train_rows: list[dict]) -> None:
        for row in rows[self.rows:]:
            self._scalars(row, "", int(row["round"]))
        for i, row in enumerate(train_rows[self.train_rows:], start=self.train_rows):
            self._scalars(row, "train_rows/", i)
        self.rows, self.train_rows = len(rows), len(train_rows)
        self.writer.flush()

    def _scalars(self, row: dict, prefix: str, step: int) -> None:
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(prefix + key, float(value), step)

    def close(self) -> None:
        self.writer.close()


def make_tracker(name: str, run_dir: Path) -> TensorBoardSink | None:
    """The sink of ``run.track`` for a run folder (None for ``none``)."""
    check_tracker(name)
    return TensorBoardSink(run_dir) if name == "tensorboard" else None
