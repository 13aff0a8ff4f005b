"""The PUMA experiment scripts run end to end at a toy size (their figures are the README's)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_puma_offline_gives_every_arm_its_error_and_cost(tmp_path, capsys):
    out = tmp_path / "puma.json"
    code = _script("puma_offline").main(["--seeds", "0", "--users", "120", "--ratings", "10", "--budget", "30",
                                          "--epochs", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    (seed,) = json.loads(out.read_text())["seeds"]
    assert {"source A", "retrain", "puma", "puma-random", "chained A->B->C", "retrain on C"} <= set(seed)
    assert all(math.isfinite(arm["rmse"]) and 0 < arm["rmse"] < 4 for arm in seed.values())
    # selection and random users train the same adapter on the same budget: the same steps
    assert seed["puma"]["steps"] == seed["puma-random"]["steps"] > 0 and seed["retrain"]["steps"] > 0
    assert "| puma |" in capsys.readouterr().out
