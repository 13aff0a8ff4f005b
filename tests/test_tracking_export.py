"""run.track=tensorboard mirrors the run folder's rows; agorasim report --format writes every
round of every run as one table."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agorasim.cli import main
from agorasim.run import tracking

TINY = ["market.n_users=300", "market.n_items=200", "market.n_providers=20", "market.new_items_per_round=3",
        "market.new_users_per_round=4", "agents.users.activity=0.3", "run.rounds=4", "run.eval_users=32",
        "run.progress=false", "policy.name=popularity"]


def run(out: Path, *extra: str) -> Path:
    args = ["run", "--out", str(out)]
    for override in TINY + list(extra):
        args += ["--set", override]
    assert main(args) == 0
    (folder,) = [p for p in out.iterdir() if (p / "metrics.csv").exists()]
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    tracked = run(base / "tracked", "run.track=tensorboard", "run.label=tracked")
    plain = run(base / "plain", "run.seed=1", "run.label=plain")
    return tracked, plain


def test_tensorboard_holds_every_metrics_row_and_changes_nothing(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracked, _ = runs
    untracked = run(tmp_path, "run.label=tracked")
    assert (tracked / "metrics.csv").read_bytes() == (untracked / "metrics.csv").read_bytes()
    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    metrics = pd.read_csv(tracked / "metrics.csv")
    for tag in ("exposure/gini", "users/utility", "items/alive"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(metrics["round"])
        np.testing.assert_allclose([s.value for s in scalars], metrics[tag], rtol=1e-6)
    assert "round" not in events.Tags()["scalars"]


def test_tensorboard_without_the_package_is_one_line_before_any_folder(tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    args = ["run", "--out", str(tmp_path / "out")]
    for override in TINY + ["run.track=tensorboard"]:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.track=tensorboard: tensorboard is not installed" in err
    assert not (tmp_path / "out").exists()


def test_report_writes_one_table_of_every_round_of_every_run(runs, tmp_path, capsys):
    tracked, plain = runs
    assert main(["report", str(tracked), str(plain), "--out", str(tmp_path / "cmp"), "--format", "csv"]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert list(table.columns[:4]) == ["scenario", "label", "seed", "run"]
    assert len(table) == 8 and list(table["label"]) == ["tracked"] * 4 + ["plain"] * 4
    assert list(table["seed"]) == [0] * 4 + [1] * 4 and set(table["run"]) == {tracked.name, plain.name}
    own = pd.read_csv(plain / "metrics.csv")
    np.testing.assert_array_equal(table.loc[4:, "exposure/gini"].to_numpy(), own["exposure/gini"].to_numpy())

    assert main(["report", str(plain), "--format", "parquet"]) == 0
    parquet = pd.read_parquet(plain / "runs.parquet")
    pd.testing.assert_frame_equal(parquet.drop(columns=["seed"]), table.iloc[4:].reset_index(drop=True).drop(columns=["seed"]),
                                  check_dtype=False)
    capsys.readouterr()
    assert main(["report", str(plain), "--format", "xlsx"]) == 2
    assert "--format xlsx: give one of csv, parquet" in capsys.readouterr().err
    assert not (plain / "runs.xlsx").exists()
