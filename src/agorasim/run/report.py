"""Reports on run folders: plots and a short markdown summary.

A run folder (DESIGN.md section 10) holds ``metrics.csv`` (one row per round, namespaced columns),
``lorenz.csv`` (cumulative exposure shares every few rounds) and ``config.yaml`` (the resolved
config). This module turns one folder into ``plots/*.png`` + ``summary.md``
(:func:`write_run_report`) and several folders, grouped by ``run.label`` with one run per seed,
into mean curves with 95% confidence bands, a utility-versus-concentration trade-off plot and a
table (:func:`write_comparison_report`).

Two promises:
- Optional inputs are optional. A missing column, ``lorenz.csv`` or ``config.yaml`` drops the plot,
  row or sentence that needs it; the report is still written.
- ``summary.md`` is deterministic: no timestamps, runs sorted by label, seed and folder name, numbers
  formatted to four significant digits. Plots are saved without the matplotlib version stamp.

Matplotlib is used through ``matplotlib.figure.Figure`` directly (never ``pyplot``), so a report
neither switches the caller's backend nor leaks figures; the PNGs are rendered by Agg.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agorasim.config import flatten
from agorasim.errors import UserInputError

__all__ = [
    "read_metrics",
    "read_lorenz",
    "final_values",
    "mean_ci",
    "bootstrap_interval",
    "write_run_report",
    "write_comparison_report",
    "paired_differences",
    "check_control",
]

DPI = 110
TAIL_FRACTION = 0.1  # share of the last rounds averaged into a "final" value
CONFIDENCE = 0.95

# Metrics shown in a run's summary table, in this order: (column, what it means, with units).
RUN_TABLE = (
    ("exposure/gini", "Gini of item exposure (0 = equal, 1 = one item gets all)"),
    ("exposure/hhi", "Herfindahl index of exposure shares (1/n = equal, 1 = one item)"),
    ("exposure/entropy", "normalised entropy of exposure (1 = equal)"),
    ("exposure/coverage", "share of the catalogue shown at least once"),
    ("exposure/tail_share", "share of exposure outside the top 20% items"),
    ("exposure/dgu", "gap between group exposure shares and targets (0 = on target)"),
    ("exposure/mgu", "largest single group's gap to its target"),
    ("items/new_share", "share of exposure going to new items"),
    ("users/utility", "mean true utility of a shown slate"),
    ("users/click_rate", "clicks per shown slate"),
    ("users/churned", "users who left in the round"),
    ("users/decision_auc", "decision accuracy: AUC of the clicks against 4-star-or-better items"),
    ("accuracy/ndcg@10", "NDCG@10 against users' true top items"),
)
# Columns also shown in the run table whenever present (sorted), since they vary by setup.
EXTRA_PREFIXES = ("llm/", "train/", "evaluator/")

# Comparison: panels of compare.png and columns of the comparison table.
COMPARE_PANELS = (
    ("exposure/gini", "exposure Gini (0 = equal, 1 = one item)"),
    ("users/utility", "mean true utility per slate"),
    ("accuracy/ndcg@10", "NDCG@10"),
    ("exposure/coverage", "catalogue coverage (share of items)"),
    ("items/new_share", "new-item exposure share"),
)
COMPARE_TABLE = (
    ("exposure/gini", "gini"),
    ("exposure/coverage", "coverage"),
    ("exposure/tail_share", "tail_share"),
    ("items/new_share", "new_share"),
    ("users/utility", "utility"),
    ("users/click_rate", "click_rate"),
    ("users/decision_auc", "decision_auc"),
    ("accuracy/ndcg@10", "ndcg@10"),
)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_table(path: Path) -> tuple[list[str], np.ndarray]:
    """Header and a float matrix (rows x columns) from a CSV file, read by pandas: short rows are
    NaN-padded, cells past the header dropped, blank lines skipped (e.g. after an interrupted
    write), and empty or unparsable cells are NaN (a metric not measured)."""
    import pandas as pd

    try:
        header = [name.strip() for name in pd.read_csv(path, nrows=0, encoding="utf-8").columns]
    except pd.errors.EmptyDataError:
        header = []
    if not header:
        raise ValueError(f"{path}: empty file, expected a header row")
    width = len(header)
    frame = pd.read_csv(path, header=None, skiprows=1, names=range(width), dtype=str, keep_default_na=False,
                        skip_blank_lines=True, engine="python", on_bad_lines=lambda row: row[:width],
                        encoding="utf-8")
    frame = frame[~(frame.apply(lambda col: col.str.strip()) == "").all(axis=1)] if len(frame) else frame
    table = frame.apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce")).to_numpy(np.float64)
    return header, table.reshape(len(frame), width)


def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a run's ``metrics.csv`` into one array per column.

    Args:
        path: the ``metrics.csv`` file, or the run folder holding it.

    Returns:
        ``{column: array}`` in file order; ``round`` as ``int64`` (numbered from 0 when the file
        has no ``round`` column), every other column as ``float64`` with NaN for empty cells.

    Raises:
        FileNotFoundError: no metrics file at ``path``.
        ValueError: the file has no header or a row without a round number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    header, table = _read_table(path)
    metrics: dict[str, np.ndarray] = {}
    if "round" in header:
        rounds = table[:, header.index("round")]
        if np.isnan(rounds).any():
            bad = int(np.flatnonzero(np.isnan(rounds))[0]) + 2  # 1-based, after the header
            raise ValueError(f"{path}: line {bad} has no round number in column 'round'")
        metrics["round"] = rounds.astype(np.int64)
    else:
        metrics["round"] = np.arange(len(table), dtype=np.int64)
    for j, name in enumerate(header):
        if name != "round" and name not in metrics:
            metrics[name] = table[:, j].copy()
    return metrics


def read_lorenz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Read ``lorenz.csv``: ``(rounds, population_shares, cumulative_shares)`` or None if absent.

    ``population_shares`` (length m) comes from the header's ``p0 … p{m-1}`` columns, evenly
    spaced on [0, 1]; ``cumulative_shares`` is (rows × m). Unreadable files count as absent.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "lorenz.csv"
    if not path.is_file():
        return None
    try:
        header, table = _read_table(path)
    except (ValueError, OSError) as error:
        warnings.warn(f"skipping Lorenz curves: {error}", stacklevel=2)
        return None
    point_cols = [j for j, name in enumerate(header) if name.startswith("p") and name[1:].isdigit()]
    if len(point_cols) < 2 or len(table) == 0:
        return None
    point_cols.sort(key=lambda j: int(header[j][1:]))
    steps = np.array([int(header[j][1:]) for j in point_cols], dtype=np.float64)
    population = steps / steps[-1]
    if "round" in header:
        rounds = table[:, header.index("round")]
    else:
        rounds = np.arange(len(table), dtype=np.float64)
    keep = ~np.isnan(rounds)
    return rounds[keep].astype(np.int64), population, table[keep][:, point_cols]


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as a dict; {} when missing or unreadable (the report goes on)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    from agorasim.config import load_yaml

    try:
        config = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError) as error:
        warnings.warn(f"ignoring unreadable {path}: {error}", stacklevel=2)
        return {}
    return config if isinstance(config, dict) else {}


def _lookup(config: Mapping[str, Any], dotted_key: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class _Run:
    """What a report needs from one run folder."""

    path: Path
    scenario: str
    label: str
    seed: int | None
    config: dict[str, Any]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def title(self) -> str:
        seed = "?" if self.seed is None else str(self.seed)
        return f"{self.scenario} / {self.label} / seed {seed}"

    @property
    def sort_key(self) -> tuple:
        return (self.label, self.seed is None, self.seed or 0, self.path.name, str(self.path))


def _load_run(run_dir: Path, with_metrics: bool = True) -> _Run:
    config = _read_config(run_dir)
    scenario = _lookup(config, "scenario")
    label = _lookup(config, "run.label")
    seed = _lookup(config, "run.seed")
    try:
        seed = None if seed is None else int(seed)
    except (TypeError, ValueError):
        seed = None
    return _Run(
        path=run_dir,
        scenario=str(scenario) if scenario is not None else "unknown scenario",
        # Without a label a run is its own group, named after its folder.
        label=str(label) if label is not None else run_dir.name,
        seed=seed,
        config=config,
        metrics=read_metrics(run_dir / "metrics.csv") if with_metrics else {},
    )


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _n_window(n_rounds: int, fraction: float) -> int:
    # ceil so that e.g. 15 rounds at 10% average the last 2; the epsilon keeps 20 × 0.1 at 2.
    return max(1, math.ceil(n_rounds * fraction - 1e-9))


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmean`` that returns NaN for all-NaN slices without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def final_values(
    metrics: Mapping[str, np.ndarray], tail_fraction: float = TAIL_FRACTION
) -> dict[str, float]:
    """Mean of every column over the last ``tail_fraction`` of rounds (at least one round).

    NaNs are ignored; a column that is NaN over the whole window is NaN. ``round`` is left out.

    Args:
        metrics: columns as returned by :func:`read_metrics`.
        tail_fraction: share of rounds, in (0, 1], counted from the end.
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    finals: dict[str, float] = {}
    for name, column in metrics.items():
        if name == "round":
            continue
        column = np.asarray(column, dtype=np.float64)
        if len(column) == 0:
            finals[name] = math.nan
            continue
        finals[name] = float(_nanmean(column[-_n_window(len(column), tail_fraction) :]))
    return finals


def _start_value(column: np.ndarray, fraction: float) -> float:
    """Mean over the first ``fraction`` of rounds: the counterpart of :func:`final_values`."""
    column = np.asarray(column, dtype=np.float64)
    if len(column) == 0:
        return math.nan
    return float(_nanmean(column[: _n_window(len(column), fraction)]))


def mean_ci(values: Any, confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """Mean over seeds and the half-width of its Student-t confidence interval.

    ``half_width = t_{(1+confidence)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard
    deviation (ddof = 1) over the first axis. NaNs are ignored per element, so ``n`` is the number
    of seeds that measured it; the half-width is 0 where ``n <= 1`` and the mean is NaN where
    ``n == 0``.

    Args:
        values: array of shape ``(n_seeds, ...)``.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(mean, half_width)``, each of shape ``values.shape[1:]`` (floats for 1-D input).
    """
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("mean_ci needs values of shape (n_seeds, ...) with at least one seed")
    n = np.sum(~np.isnan(values), axis=0)
    mean = _nanmean(values, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(values, axis=0, ddof=1)
        t = stats.t.ppf(0.5 + confidence / 2.0, np.maximum(n - 1, 1))
        half = np.where(n > 1, t * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    if values.ndim == 1:
        return float(mean), float(half)
    return mean, half


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same runs give the same report


def bootstrap_interval(values: Any, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[Any, Any, Any]:
    """Mean over seeds and its percentile-bootstrap interval (resampling seeds with replacement).

    Every resampled mean is a mean of observed values, so the interval never leaves the range the
    metric can take (a Gini stays in [0, 1]), unlike a Student-t interval on few seeds. With few
    seeds it is narrow (3 seeds: it can never reach past the extreme seed), which the reports
    say. NaN seeds are dropped per element; one seed gives a zero-width interval.

    Args:
        values: ``(n_seeds, ...)``.
        confidence: Two-sided level.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling (fixed, so a report is reproducible).

    Returns:
        ``(mean, low, high)``, each of shape ``values.shape[1:]`` (floats for 1-D input).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("bootstrap_interval needs values of shape (n_seeds, ...) with at least one seed")
    flat = values.reshape(values.shape[0], -1)
    n = flat.shape[0]
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(flat[index], axis=1)  # (resamples, m)
        low, high = np.nanpercentile(means, [50 * (1 - confidence), 50 * (1 + confidence)], axis=0)
        mean = _nanmean(flat, axis=0)
    shape = values.shape[1:]
    mean, low, high = (np.asarray(a).reshape(shape) for a in (mean, low, high))
    if values.ndim == 1:
        return float(mean), float(low), float(high)
    return mean, low, high


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """Four significant digits; missing values as an em dash."""
    if value is None:
        return "—"
    value = float(value)
    if math.isnan(value):
        return "—"
    if value == 0.0:
        value = 0.0  # no "-0"
    return f"{value:.4g}"


def _fmt_ci(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{_fmt(mean)} ± {_fmt(half)}"


def _fmt_interval(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"


def _fmt_signed(value: float) -> str:
    text = _fmt(value)
    return text if text.startswith("-") or text == "0" else f"+{text}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rounds_text(rounds: np.ndarray, fraction: float, last: bool) -> str:
    """'rounds 18–19' for the averaging window, so readers know what 'start'/'end' mean."""
    if len(rounds) == 0:
        return "no rounds"
    k = _n_window(len(rounds), fraction)
    window = rounds[-k:] if last else rounds[:k]
    if len(window) == 1:
        return f"round {int(window[0])}"
    return f"rounds {int(window[0])}–{int(window[-1])}"


def _write_markdown(path: Path, lines: list[str]) -> Path:
    """Join lines, squeeze runs of blank lines, end with one newline (stable bytes)."""
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    path.write_text(text.strip("\n") + "\n", encoding="utf-8")
    return path


def _relative_link(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


# ---------------------------------------------------------------------------------------------
# Plotting helpers
# ---------------------------------------------------------------------------------------------


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.5), **kwargs):
    """A free-standing Agg figure and its axes; None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _save(fig, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        if ax.get_xlabel() == "round" or ax.get_ylabel() == "round":  # rounds are whole numbers
            (ax.xaxis if ax.get_xlabel() == "round" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    # No "Software" stamp: the same data gives the same PNG bytes across matplotlib patch versions;
    # a tight box keeps point labels and legends that reach past the axes inside the image.
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _has_data(metrics: Mapping[str, np.ndarray], key: str) -> bool:
    return key in metrics and bool(np.any(~np.isnan(np.asarray(metrics[key], dtype=np.float64))))


def _plot_series(ax, rounds: np.ndarray, values: np.ndarray, **kwargs) -> None:
    """Line over the rounds that measured something: metrics logged every few rounds (NaN in
    between) would otherwise draw as isolated, invisible points."""
    keep = ~np.isnan(values)
    marker = "o" if keep.sum() < len(values) else None
    ax.plot(rounds[keep], values[keep], marker=marker, markersize=3, **kwargs)


def _label_colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    n = 10 if len(labels) <= 10 else 20  # tab20 past ten labels, so no two labels share a colour
    cmap = colormaps[f"tab{n}"]
    return {label: cmap(i % n) for i, label in enumerate(labels)}


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def _plot_gini(run: _Run, out: Path) -> bool:
    m = run.metrics
    top = _has_data(m, "exposure/gini")
    bottom = [k for k in ("exposure/coverage", "exposure/tail_share") if _has_data(m, k)]
    if not top and not bottom:
        return False
    nrows = int(top) + int(bool(bottom))
    fig, axes = _figure(nrows, 1, size=(7.0, 3.0 + 2.2 * nrows), sharex=True)
    rounds = m["round"]
    row = 0
    if top:
        ax = axes[row, 0]
        _plot_series(ax, rounds, m["exposure/gini"], color="tab:red")
        ax.set_ylabel("exposure Gini\n(0 = equal, 1 = one item)")
        ax.set_title(f"Exposure concentration — {run.title}")
        ax.grid(alpha=0.3)
        row += 1
    if bottom:
        ax = axes[row, 0]
        names = {"exposure/coverage": "coverage (share of items shown)",
                 "exposure/tail_share": "tail share (share of exposure)"}
        for key in bottom:
            _plot_series(ax, rounds, m[key], label=names[key])
        ax.set_ylabel("share (0–1)")
        if not top:
            ax.set_title(f"Coverage and tail share — {run.title}")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("round")
    _save(fig, out)
    return True


def _lorenz_rows(n_rows: int, most: int = 5) -> np.ndarray:
    """Up to ``most`` row indices spread evenly over the run, first and last included."""
    return np.unique(np.round(np.linspace(0, n_rows - 1, min(most, n_rows))).astype(int))


def _plot_lorenz(run: _Run, out: Path) -> bool:
    lorenz = read_lorenz(run.path / "lorenz.csv")
    if lorenz is None:
        return False
    rounds, population, shares = lorenz
    fig, axes = _figure(1, 1, size=(5.5, 5.0))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="equality")
    from matplotlib import colormaps

    rows = _lorenz_rows(len(rounds))
    cmap = colormaps["viridis"]
    for i, r in enumerate(rows):
        curve = shares[r]
        # Gini = 1 − 2 × area under the Lorenz curve (trapezoid rule on the stored points).
        area = float(np.nansum((curve[1:] + curve[:-1]) / 2.0 * np.diff(population)))
        colour = cmap(i / max(len(rows) - 1, 1))
        ax.plot(population, curve, color=colour, label=f"round {rounds[r]} (Gini ≈ {_fmt(1 - 2 * area)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("share of items, least to most exposed")
    ax.set_ylabel("cumulative share of exposure")
    ax.set_title(f"Lorenz curves of exposure\n{run.title}")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, out)
    return True


def _plot_utility_vs_concentration(run: _Run, out: Path) -> bool:
    m = run.metrics
    if not (_has_data(m, "exposure/gini") and _has_data(m, "users/utility")):
        return False
    gini, utility = m["exposure/gini"], m["users/utility"]
    keep = ~(np.isnan(gini) | np.isnan(utility))
    if not keep.any():
        return False
    fig, axes = _figure(1, 1, size=(6.5, 4.8))
    ax = axes[0, 0]
    points = ax.scatter(gini[keep], utility[keep], c=m["round"][keep], cmap="viridis", s=18)
    fig.colorbar(points, ax=ax, label="round")
    ax.set_xlabel("exposure Gini (0 = equal, 1 = one item)")
    ax.set_ylabel("mean true utility per slate (utility units)")
    ax.set_title(f"User utility against exposure concentration\n{run.title}")
    ax.grid(alpha=0.3)
    _save(fig, out)
    return True


def _plot_new_items(run: _Run, out: Path) -> bool:
    m = run.metrics
    panels = [k for k in ("items/new_share", "items/time_to_first_exposure") if _has_data(m, k)]
    if not panels:
        return False
    fig, axes = _figure(len(panels), 1, size=(7.0, 3.0 + 2.2 * len(panels)), sharex=True)
    ylabels = {
        "items/new_share": "new-item share of exposure (0–1)",
        "items/time_to_first_exposure": "time to first exposure\n(rounds)",
    }
    for row, key in enumerate(panels):
        ax = axes[row, 0]
        _plot_series(ax, m["round"], m[key], color="tab:green" if row == 0 else "tab:purple")
        ax.set_ylabel(ylabels[key])
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"New items — {run.title}")
    axes[-1, 0].set_xlabel("round")
    _save(fig, out)
    return True


RUN_PLOTS = (
    ("gini.png", "Exposure Gini, coverage and tail share over rounds", _plot_gini),
    ("lorenz.png", "Lorenz curves of exposure", _plot_lorenz),
    ("utility_vs_concentration.png", "User utility against exposure Gini", _plot_utility_vs_concentration),
    ("new_items.png", "New items: exposure share and time to first exposure", _plot_new_items),
)


def _change_sentence(name: str, column: np.ndarray, rounds: np.ndarray, fraction: float) -> str | None:
    start = _start_value(column, fraction)
    end = final_values({"x": column}, fraction)["x"]
    if math.isnan(start) or math.isnan(end):
        return None
    change = end - start
    relative = f" ({_fmt_signed(100.0 * change / abs(start))}%)" if start != 0 else ""
    return (
        f"{name} went from {_fmt(start)} ({_rounds_text(rounds, fraction, last=False)}) "
        f"to {_fmt(end)} ({_rounds_text(rounds, fraction, last=True)}), "
        f"a change of {_fmt_signed(change)}{relative}."
    )


def _llm_section(metrics: Mapping[str, np.ndarray], run_dir: Path) -> list[str]:
    """Calls, tokens, price and latency per role, and every round that fell back to the utility
    model; empty when no language model took part."""
    roles = sorted({k.split("/")[1] for k in metrics if k.startswith("llm/") and k.endswith("/calls")})
    if not roles:
        return []
    timed: dict[str, float] = {}  # llm/<role>/latency_s and cache_hits, summed over the rounds
    if (run_dir / "timings.csv").exists():
        header, table = _read_table(run_dir / "timings.csv")
        if len(table):
            timed = {name: float(np.nansum(table[:, j])) for j, name in enumerate(header) if name.startswith("llm/")}
    lines = ["", "## Language-model agents", "",
             "| role | calls | tokens in | tokens out | cache hits | errors | price (USD) | model time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for role in roles:
        def total(name: str, role: str = role) -> float:
            key = f"llm/{role}/{name}"
            return float(np.nansum(metrics[key])) if key in metrics else float("nan")

        lines.append(f"| {role} | {total('calls'):.0f} | {total('tokens_in'):.0f} | {total('tokens_out'):.0f} | "
                     f"{timed.get(f'llm/{role}/cache_hits', float('nan')):.0f} | {total('errors'):.0f} | "
                     f"{_fmt(total('cost_usd'))} | {_fmt(timed.get(f'llm/{role}/latency_s', float('nan')))} |")
    if "llm/fallbacks" in metrics:
        fallbacks = np.nan_to_num(metrics["llm/fallbacks"])
        rate = metrics["llm/fallback_rate"]
        lines += ["", f"Answers that stayed invalid after the re-asks and were given by the utility model: "
                  f"{fallbacks.sum():.0f} in all, mean rate {_fmt(_nanmean(rate))} per round."]
        hit = np.flatnonzero(fallbacks > 0)
        if len(hit):
            shown = ", ".join(f"round {int(metrics['round'][i])}: {fallbacks[i]:.0f} ({rate[i]:.0%})" for i in hit[:20])
            lines.append(f"Rounds with fallbacks: {shown}" + (f", and {len(hit) - 20} more." if len(hit) > 20 else "."))
    return lines


def write_run_report(run_dir: str | os.PathLike, tail_fraction: float = TAIL_FRACTION) -> Path:
    """Write ``plots/*.png`` and ``summary.md`` for one run folder.

    Plots that need a missing column or file are skipped, and so are their links.

    Args:
        run_dir: a run folder with ``metrics.csv`` (required), ``lorenz.csv`` and ``config.yaml``.
        tail_fraction: share of the last rounds averaged into final values (first rounds for start).

    Returns:
        The path of ``summary.md``.
    """
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    metrics = run.metrics
    rounds = metrics["round"]
    finals = final_values(metrics, tail_fraction)

    plots: list[tuple[str, str]] = []
    plot_note = None
    if _have_matplotlib():
        for filename, caption, plot in RUN_PLOTS:
            if plot(run, run_dir / "plots" / filename):
                plots.append((filename, caption))
    else:
        plot_note = "Plots skipped: matplotlib is not installed (`pip install 'agorasim[viz]'`)."

    lines = [f"# Run report: {run.title}", ""]
    if len(rounds):
        lines.append(
            f"Run folder `{run_dir.name}`: {len(rounds)} rounds ({int(rounds[0])}–{int(rounds[-1])}). "
            f"Final values are means over the last {_n_window(len(rounds), tail_fraction)} "
            f"rounds ({_rounds_text(rounds, tail_fraction, last=True)}), NaNs ignored."
        )
    else:
        lines.append(f"Run folder `{run_dir.name}`: metrics.csv has no rounds yet.")
    from agorasim.run.runner import checkpoints

    saved = checkpoints(run_dir)
    if saved:
        lines += ["", f"Latest checkpoint: `{saved[-1].name}`, {saved[-1].stat().st_size / 2**20:.2f} MiB "
                      f"({len(saved)} kept, {sum(p.stat().st_size for p in saved) / 2**20:.2f} MiB in all)."]
    lines += ["", "## Final values", "", "| metric | final | meaning |", "|---|---:|---|"]
    table_keys = [(k, meaning) for k, meaning in RUN_TABLE if k in finals]
    table_keys += [(k, "") for k in sorted(finals) if k.startswith(EXTRA_PREFIXES)]
    for key, meaning in table_keys:
        lines.append(f"| {_md_cell(key)} | {_fmt(finals[key])} | {meaning} |")

    sentences = [
        _change_sentence(name, metrics[key], rounds, tail_fraction)
        for key, name in (("exposure/gini", "Exposure Gini"), ("users/utility", "User utility"))
        if key in metrics
    ]
    sentences = [s for s in sentences if s]
    if sentences:
        lines += ["", "## Change over the run", ""] + [f"- {s}" for s in sentences]

    lines += _llm_section(metrics, run_dir)
    lines += ["", "## Plots", ""]
    if plot_note:
        lines.append(plot_note)
    elif not plots:
        lines.append("No plots: the metrics needed for them are not in this run.")
    for filename, caption in plots:
        lines += [f"![{caption}](plots/{filename})", ""]
    return _write_markdown(run_dir / "summary.md", lines)


# ---------------------------------------------------------------------------------------------
# Several runs
# ---------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Runs sharing a label (one per seed) and their final values."""

    label: str
    runs: list[_Run]
    finals: list[dict[str, float]]

    def final_interval(self, key: str) -> tuple[float, float, float]:
        """Mean over seeds of the final value and its bootstrap interval."""
        values = np.array([f.get(key, math.nan) for f in self.finals], dtype=np.float64)
        if np.isnan(values).all():
            return math.nan, math.nan, math.nan
        return bootstrap_interval(values)

    def x_value(self, x_key: str) -> Any:
        """The swept config value of this group; a list when seeds disagree, None when absent."""
        values = [_lookup(r.config, x_key) for r in self.runs]
        distinct = []
        for v in values:
            if v is not None and v not in distinct:
                distinct.append(v)
        if not distinct:
            return None
        return distinct[0] if len(distinct) == 1 else distinct


def paired_differences(group: _Group, control: _Group, keys: Sequence[str]
                       ) -> tuple[list[int], dict[str, tuple[float, float, float]]]:
    """The seeds both groups ran and, per key, ``group − control`` paired by seed.

    Every seed is its own world (its own users and items), so the difference of two arms is taken
    seed by seed before it is averaged: the mean over the shared seeds and its percentile-bootstrap
    interval over them (:func:`bootstrap_interval`). Runs without a seed are left out; a seed that a
    group ran twice counts once (the run that sorts last).

    Returns:
        ``(seeds, {key: (mean, low, high)})``; NaNs where no shared seed measured the key.
    """
    mine = {r.seed: f for r, f in zip(group.runs, group.finals) if r.seed is not None}
    theirs = {r.seed: f for r, f in zip(control.runs, control.finals) if r.seed is not None}
    seeds = sorted(set(mine) & set(theirs))
    out = {}
    for key in keys:
        diff = np.array([mine[s].get(key, math.nan) - theirs[s].get(key, math.nan) for s in seeds], dtype=np.float64)
        out[key] = bootstrap_interval(diff) if len(diff) and not np.isnan(diff).all() else (math.nan,) * 3
    return seeds, out


def _fmt_signed_interval(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{_fmt_signed(mean)} [{_fmt_signed(low)}, {_fmt_signed(high)}]"


def _paired_section(groups: list[_Group], control: str) -> list[str]:
    """Markdown: every other group's paired difference from the ``control`` group."""
    lines = ["", f"## Paired against {_md_cell(control)}", ""]
    base = next((g for g in groups if g.label == control), None)
    if base is None:
        return lines + [f"No finished run has the label {_md_cell(control)} yet: no paired differences."]
    lines.append(
        f"Each cell is a label's final value minus {_md_cell(control)}'s final value **of the same seed** (the "
        f"same world), the mean over the seeds both ran and its {int(CONFIDENCE * 100)}% percentile-bootstrap "
        "interval over those differences; an interval that does not contain 0 is a difference every resample "
        "of the seeds agrees on (with few seeds the interval is narrow: it cannot reach past the extreme seed)."
    )
    header = ["label", "paired seeds"] + [f"{name} − {control}" for _, name in COMPARE_TABLE]
    lines += ["", "| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for group in groups:
        if group is base:
            continue
        seeds, diffs = paired_differences(group, base, [key for key, _ in COMPARE_TABLE])
        cells = [_md_cell(group.label), str(len(seeds))]
        cells += [_fmt_signed_interval(*diffs[key]) for key, _ in COMPARE_TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def check_control(run_dirs: Iterable[str | os.PathLike], control: str) -> None:
    """``--control LABEL`` names a label some run has: else one line naming the labels there are."""
    runs = [_load_run(Path(d), with_metrics=False) for d in run_dirs if (Path(d) / "metrics.csv").is_file()]
    labels = [label for label, _ in group_runs(runs)]
    if control not in labels:
        raise UserInputError(f"--control {control}: no run has that label (labels: {', '.join(labels) or 'none'})")


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or isinstance(value, list):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return "/".join(_fmt_value(v) for v in value)
    number = _as_number(value)
    return _fmt(number) if number is not None else str(value)


def _plot_compare(groups: list[_Group], colours: dict[str, Any], out: Path) -> bool:
    lengths = [len(r.metrics["round"]) for g in groups for r in g.runs]
    n_rounds = min(lengths) if lengths else 0  # align every curve to the shortest run
    panels = [
        (key, ylabel) for key, ylabel in COMPARE_PANELS
        if any(_has_data(r.metrics, key) for g in groups for r in g.runs)
    ]
    if n_rounds == 0 or not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, size=(4.6 * ncols, 3.6 * nrows))
    for idx, (key, ylabel) in enumerate(panels):
        ax = axes[idx // ncols, idx % ncols]
        for group in groups:
            runs = [r for r in group.runs if key in r.metrics]
            if not runs:
                continue
            rounds = runs[0].metrics["round"][:n_rounds]
            stack = np.stack([r.metrics[key][:n_rounds] for r in runs])
            if np.isnan(stack).all():
                continue
            mean, low, high = bootstrap_interval(stack, resamples=2000)
            colour = colours[group.label]
            ax.plot(rounds, mean, color=colour, label=f"{group.label} (n={len(runs)})")
            ax.fill_between(rounds, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(key)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for idx in range(len(panels), nrows * ncols):
        axes[idx // ncols, idx % ncols].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:  # the first panel may lack a label that another panel has
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize="small")
    fig.suptitle(f"Mean over seeds with a {int(CONFIDENCE * 100)}% bootstrap interval (first {n_rounds} rounds)")
    _save(fig, out)
    return True


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (Gini, utility) points no other point beats on both (lower Gini, higher
    utility); ties count as not beaten."""
    front = []
    for i, (g, u) in enumerate(points):
        if not any((g2 <= g and u2 >= u) and (g2 < g or u2 > u) for j, (g2, u2) in enumerate(points) if j != i):
            front.append(i)
    return front


def _plot_tradeoff(groups: list[_Group], colours: dict[str, Any], out: Path, x_key: str | None) -> bool:
    points = []
    for group in groups:
        gini = group.final_interval("exposure/gini")
        utility = group.final_interval("users/utility")
        if math.isnan(gini[0]) or math.isnan(utility[0]):
            continue
        points.append((group, gini, utility))
    if not points:
        return False
    fig, axes = _figure(1, 1, size=(7.5, 5.5))
    ax = axes[0, 0]
    for group, gini, utility in points:
        ax.errorbar(
            gini[0], utility[0], xerr=[[gini[0] - gini[1]], [gini[2] - gini[0]]],
            yerr=[[utility[0] - utility[1]], [utility[2] - utility[0]]], fmt="o", capsize=3,
            color=colours[group.label], label=f"{group.label} (n={len(group.runs)})",
        )
    front = pareto_front([(g[0], u[0]) for _, g, u in points])
    if len(front) > 1:
        xs, ys = zip(*sorted((points[i][1][0], points[i][2][0]) for i in front))
        ax.plot(xs, ys, color="black", linewidth=1, linestyle="--", zorder=0, label="Pareto front")
    points = [(group, gini[0], None, utility[0], None) for group, gini, utility in points]
    if not x_key:
        for group, gini, _, utility, _ in points:
            ax.annotate(group.label, (gini, utility), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
    if x_key:
        short = x_key.rsplit(".", 1)[-1]
        swept = []
        for group, gini, _, utility, _ in points:
            value = group.x_value(x_key)
            ax.annotate(
                f"{short}={_fmt_value(value)}", (gini, utility), textcoords="offset points",
                xytext=(6, 6), fontsize="small",
            )
            number = _as_number(value)
            if number is not None:
                swept.append((number, group.label, gini, utility))
        if len(swept) >= 2:
            swept.sort()
            ax.plot([p[2] for p in swept], [p[3] for p in swept], color="grey", linewidth=1, zorder=0)
        ax.set_title(f"Utility–concentration trade-off over {x_key}")
    else:
        ax.set_title("Utility–concentration trade-off")
    ax.set_xlabel("final exposure Gini (0 = equal, 1 = one item)")
    ax.set_ylabel("final mean true utility per slate")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, out)
    return True


# What may differ between the seeds of one group: the seed and where or how the run was written or executed.
SEED_ONLY = ("run.seed", "run.out", "run.progress", "run.label", "run.track", "run.executor", "run.workers", "run.ray_address",
             "experiment.", "meta.", "description")


def _setting(config: dict) -> tuple:
    flat = flatten(config)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if not k.startswith(SEED_ONLY)))


def group_runs(runs: list) -> list[tuple[str, list]]:
    """Runs grouped as seeds of one setting: same label *and* same resolved config except the seed.

    Runs that share a label but not a config are separate groups, each labelled by the keys that
    differ (``"popularity+trirec [rounds=2, fairness_weight=inf]"``), so no interval pools
    different settings. Runs without a config.yaml group by label alone.
    """
    by_key: dict[tuple, list] = {}
    for run in runs:
        by_key.setdefault((run.label, _setting(run.config)), []).append(run)
    labels = [label for label, _ in by_key]
    named = []
    for (label, setting), members in by_key.items():
        if labels.count(label) > 1:
            rivals = [dict(s) for (other, s) in by_key if other == label]
            mine = dict(setting)
            differ = sorted({k for r in rivals for k in set(r) | set(mine) if r.get(k) != mine.get(k)})
            shown = ", ".join(f"{k.split('.')[-1]}={_shown(mine.get(k))}" for k in differ[:3])
            label = f"{label} [{shown}{', ...' if len(differ) > 3 else ''}]"
        named.append((label, members))
    return sorted(named, key=lambda pair: pair[0])


def _shown(value: str | None) -> str:
    """A config value as the repr stored by ``_setting``, shown without quotes."""
    return "-" if value is None else value.strip("'")


def write_comparison_report(
    run_dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    x_key: str | None = None,
    tail_fraction: float = TAIL_FRACTION,
    control: str | None = None,
) -> Path:
    """Compare runs grouped by ``run.label`` (one run per seed): plots and ``summary.md``.

    Writes ``compare.png`` (mean over seeds with a 95% CI band per label for Gini, utility,
    NDCG@10, coverage and new-item share, rounds cut to the shortest run), ``tradeoff.png`` (final
    utility against final Gini per label with CI error bars; with ``x_key`` each point is annotated
    with that config value and points are joined in its order) and ``summary.md`` (a table of
    mean ± CI of final values per label, sorted by label, and links to every run folder).
    With ``control``, a second table gives every other label's difference from that label paired
    by seed (:func:`paired_differences`). Run folders without ``metrics.csv`` are listed as skipped.

    Args:
        run_dirs: run folders; their order does not matter.
        out_dir: where the report goes (created if needed).
        x_key: dotted config key swept across labels, e.g. ``platform.fairness_weight``.
        tail_fraction: share of the last rounds averaged into final values.
        control: label of the control arm (e.g. ``sft-only``); a label no finished run has gives a
            line saying so instead of the table.

    Returns:
        The path of ``summary.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[_Run] = []
    skipped: list[Path] = []
    for run_dir in sorted({Path(p) for p in run_dirs}, key=lambda p: (p.name, str(p))):
        if not (run_dir / "metrics.csv").is_file():
            skipped.append(run_dir)
            continue
        runs.append(_load_run(run_dir))
    runs.sort(key=lambda r: r.sort_key)

    groups: list[_Group] = []
    for label, members in group_runs(runs):
        groups.append(_Group(label, members, [final_values(r.metrics, tail_fraction) for r in members]))

    plots: list[tuple[str, str]] = []
    plot_note = None
    if not _have_matplotlib():
        plot_note = "Plots skipped: matplotlib is not installed (`pip install 'agorasim[viz]'`)."
    elif groups:
        colours = _label_colours([g.label for g in groups])
        if _plot_compare(groups, colours, out_dir / "compare.png"):
            plots.append(("compare.png", "Mean over seeds with a 95% bootstrap interval, per label"))
        if _plot_tradeoff(groups, colours, out_dir / "tradeoff.png", x_key):
            plots.append(("tradeoff.png", "Final utility against final exposure Gini"))

    scenarios = sorted({r.scenario for r in runs})
    lines = ["# Comparison report", ""]
    lines.append(
        f"{_plural(len(runs), 'run')} in {_plural(len(groups), 'label')}"
        + (f"; scenario: {', '.join(scenarios)}" if scenarios else "")
        + f". Final values are means over the last {int(round(tail_fraction * 100))}% of rounds "
        f"of each run; cells show the mean over seeds and its {int(CONFIDENCE * 100)}% percentile-bootstrap "
        "interval over seeds [low, high] (it stays inside each metric's range; with few seeds it is "
        "narrow and cannot reach past the extreme seed; a single seed gives [mean, mean])."
    )
    header = ["label", "seeds"] + ([x_key] if x_key else []) + [name for _, name in COMPARE_TABLE]
    lines += ["", "## Final values", "", "| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for group in groups:
        cells = [_md_cell(group.label), str(len(group.runs))]
        if x_key:
            cells.append(_md_cell(_fmt_value(group.x_value(x_key))))
        cells += [_fmt_interval(*group.final_interval(key)) for key, _ in COMPARE_TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    if control is not None:
        lines += _paired_section(groups, control)

    lines += ["", "## Plots", ""]
    if plot_note:
        lines.append(plot_note)
    elif not plots:
        lines.append("No plots: the metrics needed for them are not in these runs.")
    for filename, caption in plots:
        lines += [f"![{caption}]({filename})", ""]

    lines += ["", "## Runs", ""]
    for group in groups:
        lines.append(f"- **{_md_cell(group.label)}**")
        for run in group.runs:
            seed = "?" if run.seed is None else run.seed
            lines.append(f"  - seed {seed}: [{run.path.name}]({_relative_link(run.path, out_dir)})")
    for run_dir in skipped:
        lines.append(f"- skipped (no metrics.csv): `{_relative_link(run_dir, out_dir)}`")
    return _write_markdown(out_dir / "summary.md", lines)


def check_run_folder(path: Path) -> None:
    """One line (``UserInputError``) unless ``path`` is a folder holding a readable agorasim
    ``metrics.csv`` with at least one round."""
    if not path.is_dir():
        raise UserInputError(f"{path}: no such run folder")
    if not (path / "metrics.csv").is_file():
        raise UserInputError(f"{path}: not a run folder (no metrics.csv)")
    try:
        with open(path / "metrics.csv", encoding="utf-8") as f:
            header = f.readline().strip().split(",")
        metrics = read_metrics(path)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise UserInputError(f"{path / 'metrics.csv'}: unreadable ({str(error).splitlines()[0]})") from None
    missing = [c for c in ("round", "exposure/gini", "users/utility") if c not in header]
    if missing:
        raise UserInputError(f"{path / 'metrics.csv'}: not an agorasim metrics file (no column {missing[0]!r})")
    if len(metrics["round"]) == 0:
        raise UserInputError(f"{path / 'metrics.csv'}: no rounds recorded yet")


EXPORT_FORMATS = ("csv", "parquet")


def check_export_format(fmt: str) -> None:
    """One line unless ``fmt`` can be written here (parquet needs pyarrow, the ``tables`` extra)."""
    import importlib.util

    if fmt not in EXPORT_FORMATS:
        raise UserInputError(f"--format {fmt}: give one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UserInputError("--format parquet: pyarrow is not installed (pip install 'agorasim[tables]'), or use --format csv")


def runs_table(run_dirs: Sequence[Path]):
    """Every round of every run as one pandas DataFrame: ``scenario``, ``label``, ``seed`` and
    ``run`` (the folder's name) before the run's ``metrics.csv`` columns (a run lacking a column
    has NaN there). The same as ``pd.concat(pd.read_csv(d / "metrics.csv").assign(run=d.name) ...)``."""
    import pandas as pd

    frames = []
    for run_dir in run_dirs:
        run = _load_run(Path(run_dir), with_metrics=False)
        frame = pd.read_csv(Path(run_dir) / "metrics.csv")
        frame.insert(0, "run", Path(run_dir).name)
        frame.insert(0, "seed", pd.array([run.seed] * len(frame), dtype="Int64"))
        frame.insert(0, "label", run.label)
        frame.insert(0, "scenario", run.scenario)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def export_runs(run_dirs: Sequence[Path], out_dir: Path, fmt: str) -> Path:
    """Write ``runs_table`` of the runs to ``out_dir/runs.<fmt>`` (csv or parquet)."""
    table = runs_table(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"runs.{fmt}"
    if fmt == "parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path
