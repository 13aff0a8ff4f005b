"""Run and comparison reports on tiny hand-made run folders (hand-computed values)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from agorasim.run.report import (
    final_values,
    mean_ci,
    read_lorenz,
    read_metrics,
    write_comparison_report,
    write_run_report,
)

RUN_PNGS = ("gini.png", "lorenz.png", "utility_vs_concentration.png", "new_items.png")


def _write_run(
    run_dir: Path,
    columns: dict[str, list],
    label: str | None = "popularity+trirec",
    seed: int | None = 3,
    scenario: str | None = "cold-start",
    extra_config: dict | None = None,
    lorenz: bool = True,
) -> Path:
    """A run folder as the simulator writes it; None cells become empty CSV cells."""
    run_dir.mkdir(parents=True)
    names = list(columns)
    n = len(columns[names[0]])
    lines = [",".join(names)]
    for i in range(n):
        lines.append(",".join("" if columns[k][i] is None else repr(columns[k][i]) for k in names))
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    config: dict = dict(extra_config or {})
    if scenario is not None:
        config["scenario"] = scenario
    if seed is not None:
        config.setdefault("run", {})["seed"] = seed
    if label is not None:
        config.setdefault("run", {})["label"] = label
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if lorenz:
        shares = np.linspace(0.0, 1.0, 21)
        rows = ["round," + ",".join(f"p{k}" for k in range(21))]
        for r in range(0, n, 5):
            curve = shares ** (1 + r / 5)  # more concentrated as rounds go on
            rows.append(f"{r}," + ",".join(f"{v:.6f}" for v in curve))
        (run_dir / "lorenz.csv").write_text("\n".join(rows) + "\n")
    return run_dir


def _columns(n: int = 20) -> dict[str, list]:
    rounds = list(range(n))
    return {
        "round": rounds,
        "exposure/gini": [r / 20 for r in rounds],
        "exposure/hhi": [0.01] * n,
        "exposure/coverage": [1 - r / 40 for r in rounds],
        "exposure/tail_share": [0.3] * n,
        "items/new_share": [0.05] * n,
        "items/time_to_first_exposure": [None if r % 2 == 0 else 3.0 for r in rounds],
        "users/utility": [2 - r / 10 for r in rounds],
        "users/click_rate": [0.25] * n,
        "accuracy/ndcg@10": [0.4] * n,
        "train/loss": [1.0] * (n - 2) + [0.5, None],
    }


def _constant_run(run_dir: Path, n: int, gini: float, utility: float, label: str, seed: int, **kw) -> Path:
    return _write_run(
        run_dir,
        {
            "round": list(range(n)),
            "exposure/gini": [gini] * n,
            "exposure/coverage": [0.5] * n,
            "users/utility": [utility] * n,
            "accuracy/ndcg@10": [0.1] * n,
        },
        label=label,
        seed=seed,
        lorenz=False,
        **kw,
    )


def test_read_metrics_values_and_nan(tmp_path):
    run = _write_run(tmp_path / "run", _columns())
    metrics = read_metrics(run / "metrics.csv")
    assert metrics["round"].dtype == np.int64
    np.testing.assert_array_equal(metrics["round"], np.arange(20))
    assert metrics["exposure/gini"][7] == pytest.approx(0.35)
    ttfe = metrics["items/time_to_first_exposure"]
    assert np.isnan(ttfe[0]) and ttfe[1] == 3.0
    assert np.isnan(metrics["train/loss"][-1])
    # the folder works as well as the file
    assert set(read_metrics(run)) == set(metrics)


def test_read_lorenz(tmp_path):
    run = _write_run(tmp_path / "run", _columns())
    rounds, population, shares = read_lorenz(run / "lorenz.csv")
    np.testing.assert_array_equal(rounds, [0, 5, 10, 15])
    assert population[1] == pytest.approx(0.05) and population[-1] == 1.0
    assert shares.shape == (4, 21)
    assert read_lorenz(tmp_path / "nowhere.csv") is None


def test_final_values_by_hand(tmp_path):
    metrics = read_metrics(_write_run(tmp_path / "run", _columns()) / "metrics.csv")
    finals = final_values(metrics)  # 10% of 20 rounds = rounds 18 and 19
    assert "round" not in finals
    assert finals["exposure/gini"] == pytest.approx((0.90 + 0.95) / 2)
    assert finals["users/utility"] == pytest.approx((0.2 + 0.1) / 2)
    assert finals["train/loss"] == pytest.approx(0.5)  # the NaN in round 19 is ignored
    assert finals["items/time_to_first_exposure"] == pytest.approx(3.0)
    # at least one round: 5 rounds × 10% → the last round only
    short = {"round": np.arange(5), "x": np.array([1.0, 2, 3, 4, 5])}
    assert final_values(short)["x"] == 5.0
    assert final_values(short, tail_fraction=0.4)["x"] == pytest.approx(4.5)
    assert math.isnan(final_values({"round": np.arange(2), "x": np.array([np.nan, np.nan])})["x"])
    with pytest.raises(ValueError, match="tail_fraction"):
        final_values(short, tail_fraction=0.0)


def test_bootstrap_interval_stays_in_range_and_by_hand():
    from agorasim.run.report import bootstrap_interval, pareto_front

    mean, low, high = bootstrap_interval([0.97, 0.99, 1.0])
    assert mean == pytest.approx(0.986667, abs=1e-6) and 0.97 <= low <= mean <= high <= 1.0
    # 2 seeds: resampled means 0 (1/4), 0.5 (1/2), 1 (1/4) -> percentiles 0 and 1
    assert bootstrap_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)
    assert bootstrap_interval([0.3]) == (0.3, 0.3, 0.3)
    mean, low, high = bootstrap_interval([[0.1, np.nan], [0.3, 2.0]])  # NaN seeds dropped per element
    assert mean.tolist() == pytest.approx([0.2, 2.0]) and high[1] == 2.0
    # (gini, utility): point 1 is beaten by point 0 (lower Gini, higher utility); 0 and 2 trade off
    assert pareto_front([(0.90, 1.2), (0.95, 1.1), (0.97, 1.4)]) == [0, 2]


def test_mean_ci_by_hand():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    # t_{0.975, 2} · s / sqrt(3) with s = 1
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert half == pytest.approx(2.4841, abs=1e-4)
    mean, half = mean_ci([[0.0, 10.0], [2.0, 10.0]])
    np.testing.assert_allclose(mean, [1.0, 10.0])
    np.testing.assert_allclose(half, [12.706205 * math.sqrt(2) / math.sqrt(2), 0.0], rtol=1e-6)
    assert mean_ci([5.0]) == (5.0, 0.0)  # one seed: no interval
    mean, half = mean_ci([[1.0], [np.nan]])  # NaN seeds do not count
    assert mean[0] == 1.0 and half[0] == 0.0


def test_run_report_writes_plots_and_summary(tmp_path):
    run = _write_run(tmp_path / "run", _columns())
    summary = write_run_report(run)
    assert summary == run / "summary.md"
    for name in RUN_PNGS:
        png = run / "plots" / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert f"(plots/{name})" in summary.read_text()
    text = summary.read_text()
    assert text.startswith("# Run report: cold-start / popularity+trirec / seed 3\n")
    assert "| exposure/gini | 0.925 |" in text
    assert "| users/utility | 0.15 |" in text
    assert "| train/loss | 0.5 |" in text
    # Gini start = mean of rounds 0–1 = 0.025, end 0.925, change +0.9 (+3600%)
    assert "Exposure Gini went from 0.025 (rounds 0–1) to 0.925 (rounds 18–19), a change of +0.9 (+3600%)." in text
    assert "User utility went from 1.95 (rounds 0–1) to 0.15" in text
    assert "exposure/dgu" not in text  # absent columns get no row


def test_run_report_is_deterministic(tmp_path):
    run = _write_run(tmp_path / "run", _columns())
    first = write_run_report(run).read_bytes()
    second = write_run_report(run).read_bytes()
    assert first == second


def test_run_report_survives_missing_optional_inputs(tmp_path):
    run = tmp_path / "bare"
    _write_run(run, {"round": [0, 1, 2], "exposure/gini": [0.1, None, 0.3]}, lorenz=False)
    (run / "config.yaml").unlink()
    text = write_run_report(run).read_text()
    assert "unknown scenario / bare / seed ?" in text
    assert "| exposure/gini | 0.3 |" in text
    assert (run / "plots" / "gini.png").is_file()
    for name in RUN_PNGS[1:]:
        assert not (run / "plots" / name).exists()
        assert name not in text
    with pytest.raises(FileNotFoundError, match="metrics"):
        write_run_report(tmp_path / "missing")


def _two_by_two(tmp_path: Path) -> list[Path]:
    runs = tmp_path / "runs"
    weight = {"alpha": 0.0, "beta": 0.5}
    specs = [  # label, seed, rounds, gini, utility
        ("alpha", 0, 20, 0.2, 1.0),
        ("alpha", 1, 15, 0.4, 1.2),
        ("beta", 0, 20, 0.6, 0.5),
        ("beta", 1, 20, 0.6, 0.7),
    ]
    return [
        _constant_run(
            runs / f"cold-start__{label}__{seed}", n, gini, utility, label, seed,
            extra_config={"platform": {"fairness_weight": weight[label]}},
        )
        for label, seed, n, gini, utility in specs
    ]


def test_comparison_report(tmp_path):
    run_dirs = _two_by_two(tmp_path)
    out = tmp_path / "report"
    summary = write_comparison_report(run_dirs, out, x_key="platform.fairness_weight")
    assert summary == out / "summary.md"
    for name in ("compare.png", "tradeoff.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000
    text = summary.read_text()
    # alpha: gini 0.2 and 0.4 -> mean 0.3; a bootstrap resample of 2 seeds has mean 0.2, 0.3 or 0.4
    # with probabilities 1/4, 1/2, 1/4, so its 2.5% and 97.5% percentiles are 0.2 and 0.4 (a
    # Student-t interval would be 0.3 +- 1.271, reaching below 0 and above 1)
    assert "| alpha | 2 | 0 | 0.3 [0.2, 0.4] | 0.5 [0.5, 0.5] | — | — | 1.1 [1, 1.2] | — | — | 0.1 [0.1, 0.1] |" in text
    assert "| beta | 2 | 0.5 | 0.6 [0.6, 0.6] | 0.5 [0.5, 0.5] | — | — | 0.6 [0.5, 0.7] | — | — | 0.1 [0.1, 0.1] |" in text
    assert text.index("| alpha |") < text.index("| beta |")
    assert "platform.fairness_weight" in text
    assert "(../runs/cold-start__alpha__0)" in text and "(../runs/cold-start__beta__1)" in text


def test_comparison_report_is_deterministic_and_order_free(tmp_path):
    run_dirs = _two_by_two(tmp_path)
    out = tmp_path / "report"
    first = write_comparison_report(run_dirs, out).read_bytes()
    second = write_comparison_report(list(reversed(run_dirs)), out).read_bytes()
    assert first == second


def test_comparison_report_skips_runs_without_metrics(tmp_path):
    run_dirs = _two_by_two(tmp_path)
    empty = tmp_path / "runs" / "crashed"
    empty.mkdir()
    text = write_comparison_report(run_dirs + [empty], tmp_path / "report").read_text()
    assert "skipped (no metrics.csv): `../runs/crashed`" in text
    assert "4 runs in 2 labels" in text


def test_runs_that_differ_in_more_than_the_seed_are_not_pooled():
    """Two seeds of one setting pool; a run with the same label but another config is its own
    group, named by what differs (issue: a 2-round fairness-weight-4 run appeared as a seed)."""
    from agorasim.run.report import _Run, group_runs

    def run(seed, rounds=5, weight=1.0):
        config = {"scenario": "s", "run": {"seed": seed, "rounds": rounds, "label": "pop", "out": f"o{seed}"},
                  "platform": {"fairness_weight": weight}, "meta": {"created": str(seed)}}
        return _Run(path=Path(f"r{seed}{rounds}"), scenario="s", label="pop", seed=seed, config=config)

    groups = group_runs([run(0), run(1), run(0, rounds=2, weight=4.0)])
    assert [(label, [r.seed for r in members]) for label, members in groups] == [
        ("pop [fairness_weight=1.0, rounds=5]", [0, 1]), ("pop [fairness_weight=4.0, rounds=2]", [0])]
    assert [label for label, _ in group_runs([run(0), run(1)])] == ["pop"]


def test_short_runs_get_whole_round_ticks(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agorasim.run.report import _save

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0.1, 0.2, 0.3])
    ax.set_xlabel("round")
    assert any(t != int(t) for t in ax.get_xticks())  # matplotlib alone puts ticks at 0.25, 0.5, ...
    _save(fig, tmp_path / "p.png")
    assert all(t == int(t) for t in ax.get_xticks())
    plt.close(fig)


def _paired_world(tmp_path: Path) -> list[Path]:
    """A control ran seeds 0-2, a treatment seeds 0, 1 and 3: only seeds 0 and 1 pair."""
    runs = tmp_path / "runs"
    specs = [  # label, seed, gini, utility
        ("base", 0, 0.5, 1.0), ("base", 1, 0.5, 2.0), ("base", 2, 0.5, 3.0),
        ("treat", 0, 0.4, 1.5), ("treat", 1, 0.4, 2.1), ("treat", 3, 0.4, 9.0),
    ]
    return [_constant_run(runs / f"{label}__{seed}", 10, gini, utility, label, seed)
            for label, seed, gini, utility in specs]


def test_paired_table_differences_by_seed(tmp_path):
    run_dirs = _paired_world(tmp_path)
    text = write_comparison_report(run_dirs, tmp_path / "report", control="base").read_text()
    paired = text[text.index("## Paired against base"):text.index("## Plots")]
    # seed 0: 1.5 - 1.0 = 0.5, seed 1: 2.1 - 2.0 = 0.1 -> mean 0.3; a bootstrap resample of two
    # differences has mean 0.1, 0.3 or 0.5 (1/4, 1/2, 1/4), so its 95% interval is [0.1, 0.5].
    # Unpaired, the means would differ by (1.5 + 2.1 + 9.0) / 3 - 2.0 = 2.2.
    row = next(line for line in paired.splitlines() if line.startswith("| treat |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in paired.splitlines()[4].strip("|").split("|")]
    by_name = dict(zip(header, cells))
    assert by_name["paired seeds"] == "2"
    assert by_name["utility − base"] == "+0.3 [+0.1, +0.5]"
    assert by_name["gini − base"] == "-0.1 [-0.1, -0.1]"
    assert by_name["coverage − base"] == "0 [0, 0]"
    assert by_name["click_rate − base"] == "—"  # neither measured it
    assert "| base |" not in paired  # the control is not compared with itself
    assert "## Paired" not in write_comparison_report(run_dirs, tmp_path / "plain").read_text()


def test_paired_table_without_a_finished_control(tmp_path):
    text = write_comparison_report(_paired_world(tmp_path), tmp_path / "report", control="sft-only").read_text()
    assert "No finished run has the label sft-only yet: no paired differences." in text


def test_report_control_must_be_a_label(tmp_path, capsys):
    from agorasim.cli import main

    run_dirs = _paired_world(tmp_path)
    out = tmp_path / "report"
    assert main(["report", *map(str, run_dirs), "--out", str(out), "--control", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--control nope: no run has that label (labels: base, treat)" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["report", *map(str, run_dirs), "--out", str(out), "--control", "treat"]) == 0
    assert "## Paired against treat" in (out / "summary.md").read_text()
