"""The dashboard's Mesa models: a scenario run live, or a finished run folder replayed.

``LiveMarket`` is the market itself (``env/market.py`` is a ``mesa.Model``), built from keyword
arguments so Mesa's ``SolaraViz`` can rebuild it when a control changes (its Reset calls
``model.__class__(**model_params)``). ``RunReplay`` is a ``mesa.Model`` whose ``step()`` reads
the next round of a run folder (``metrics.csv``, ``lorenz.csv``, ``groups.csv``,
``events.jsonl``). Both record the plotted series with Mesa's ``DataCollector`` and answer the
same views (``current_row``, ``lorenz``, ``groups``, ``followed_slate``), which the page's panels
read (``viz/dashboard.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mesa
import numpy as np
import pandas as pd

from agorasim.config import Config, build_config
from agorasim.env.market import Market
from agorasim.metrics import exposure
from agorasim.run.report import check_run_folder

# plotted label -> metrics.csv column
SERIES = {
    "exposure Gini": "exposure/gini",
    "coverage": "exposure/coverage",
    "tail share": "exposure/tail_share",
    "utility": "users/utility",
    "fairness weight": "platform/fairness_weight",
}
LORENZ_POINTS = 21  # as lorenz.csv records it (run/runner.py)


def _reporters() -> dict:
    """Mesa model reporters: one per plotted series, read from the model's current metrics row."""
    return {label: (lambda model, key=key: float(model.current_row().get(key, math.nan))) for label, key in SERIES.items()}


def live_config(scenario: str = "cold-start", policy: str | None = None, reranker: str | None = None,
                fairness_weight: float | None = None, seed: int | None = None,
                overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The checked config of a live run: the scenario, ``--set`` overrides, then the controls."""
    from agorasim.run.preflight import check_config
    from agorasim.scenarios import load_scenario

    sets = list(overrides)
    if policy:
        sets += [f"policy.name={policy}", "experiment.policies=[]"]
    if reranker:
        sets.append(f"platform.reranker={reranker}")
    if fairness_weight is not None:
        sets.append(f"platform.fairness_weight={fairness_weight}")
    if seed is not None:
        sets += [f"run.seed={int(seed)}", "experiment.seeds=[]"]
    config = build_config(load_scenario(scenario), sets)
    check_config(config)
    return config


class LiveMarket(Market):
    """A scenario's market run live: every Step of the page is one round.

    Args:
        scenario: packaged scenario name or a .yaml path.
        policy: recommender policy (None: the scenario's).
        reranker: platform re-ranker (None: the scenario's).
        fairness_weight: the platform's fairness weight (None: the scenario's).
        seed: seed of the run (None: the scenario's).
        user: id of the user whose slates the page follows.
        overrides: further ``KEY=VALUE`` config overrides (as ``--set``).
    """

    def __init__(self, scenario: str = "cold-start", policy: str | None = None, reranker: str | None = None,
                 fairness_weight: float | None = None, seed: int | None = None, user: int = 0,
                 overrides: tuple[str, ...] = ()):
        super().__init__(live_config(scenario, policy, reranker, fairness_weight, seed, overrides))
        self.followed_user = int(user)
        self.datacollector = mesa.DataCollector(model_reporters=_reporters())
        self._followed: dict | None = None
        self.running = self.world.round < self.config.run.rounds

    def step(self) -> None:
        """One round of the market, then the page's views of it."""
        super().step()
        self._follow()
        self.datacollector.collect(self)
        self.running = self.world.round < self.config.run.rounds

    def current_row(self) -> dict:
        return self.rows[-1] if self.rows else {}

    def lorenz(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(round, population shares, exposure shares) of the ledger window over alive items."""
        if not self.last_round:
            return None
        alive, window = self.last_round["alive"], self.last_round["window"]
        population, shares = exposure.lorenz(window[alive], points=LORENZ_POINTS)
        return int(self.last_round["row"]["round"]), population, shares

    def groups(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(round, exposure share, target share) of every popularity group (0 = most popular)."""
        return _group_vectors(self.group_rows[-1]) if self.group_rows else None

    def followed_slate(self) -> dict | None:
        """The followed user's last slate: round, and per slot the item, its promotion and the feedback."""
        return self._followed

    def _follow(self) -> None:
        last = self.last_round
        users = last["users"]
        b = int(np.searchsorted(users, self.followed_user))
        if b >= len(users) or users[b] != self.followed_user:
            return  # not a visitor this round: the page keeps the last slate it saw
        # the record events.jsonl would hold for this user (FeedbackBatch.records), as a replay reads it
        (record,) = last["feedback"].records(users, last["slates"], int(last["row"]["round"]), np.array([b]),
                                             last["shown"])
        self._followed = slate_view(record.model_dump(), self.world.catalogue.titles)


def slate_view(record: dict, titles: list[str] | None = None) -> dict:
    """The page's view of one user's slate from its ``SlateFeedback`` record (a line of
    events.jsonl, or ``model_dump()`` of a live one): round, and per shown item its title (when
    ``titles`` are known), the promotion shown (None where it was not recorded) and the feedback."""
    slots = []
    for judgement in record["judgements"]:
        item, promotion = judgement["item_id"], judgement.get("promotion") or {}
        slots.append({"item": item, "title": titles[item] if titles is not None and item < len(titles) else "",
                      "claimed": promotion.get("claimed"), "unsupported": promotion.get("unsupported"),
                      "hype": promotion.get("hype"), "click": judgement["click"], "rating": judgement["rating"],
                      "reason": judgement["reason"]})
    return {"user": record["user_id"], "round": record["round"], "slots": slots}


def _group_vectors(row: dict) -> tuple[int, np.ndarray, np.ndarray]:
    n = sum(1 for key in row if key.startswith("share/g"))
    share = np.array([row[f"share/g{g}"] for g in range(n)], np.float64)
    target = np.array([row[f"target/g{g}"] for g in range(n)], np.float64)
    return int(row["round"]), share, target


def _read_events(path: Path) -> list[dict]:
    """events.jsonl records (a line cut short by an interrupted write is skipped)."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class RunReplay(mesa.Model):
    """A finished (or running) run folder replayed round by round: every Step is the next round.

    Args:
        run_dir: the run folder (``metrics.csv`` and, when present, ``lorenz.csv``,
            ``groups.csv``, ``events.jsonl``).
        user: id of the user whose slates the page follows (-1: the first user in events.jsonl).
    """

    def __init__(self, run_dir: str = "", user: int = -1):
        super().__init__(rng=0)  # a replay draws nothing; mesa wants a generator all the same
        self.run_dir = Path(run_dir)
        check_run_folder(self.run_dir)
        self.metrics = pd.read_csv(self.run_dir / "metrics.csv")
        self.lorenz_table = _read_optional(self.run_dir / "lorenz.csv")
        self.group_table = _read_optional(self.run_dir / "groups.csv")
        self.events = _read_events(self.run_dir / "events.jsonl")
        self.followed_user = int(user) if user >= 0 else (self.events[0]["user_id"] if self.events else 0)
        self.datacollector = mesa.DataCollector(model_reporters=_reporters())
        self.cursor = -1  # index of the current row of metrics.csv
        self.running = len(self.metrics) > 0

    @property
    def round(self) -> int:
        return int(self.metrics["round"].iloc[self.cursor]) if self.cursor >= 0 else -1

    def step(self) -> None:
        """The next recorded round."""
        self.cursor += 1
        self.datacollector.collect(self)
        self.running = self.cursor + 1 < len(self.metrics)

    def current_row(self) -> dict:
        if self.cursor < 0:
            return {}
        return {k: (math.nan if pd.isna(v) else float(v)) for k, v in self.metrics.iloc[self.cursor].items()}

    def lorenz(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The last Lorenz curve recorded up to the current round (lorenz.csv has one every few rounds)."""
        row = self._latest(self.lorenz_table)
        if row is None:
            return None
        points = sorted((int(k[1:]), float(v)) for k, v in row.items() if k.startswith("p") and k[1:].isdigit())
        shares = np.array([v for _, v in points])
        return int(row["round"]), np.linspace(0.0, 1.0, len(shares)), shares

    def groups(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        row = self._latest(self.group_table)
        return None if row is None else _group_vectors(row)

    def followed_slate(self) -> dict | None:
        """The followed user's last slate in events.jsonl up to the current round."""
        found = None
        for record in self.events:
            if record["round"] > self.round:
                break
            if record["user_id"] == self.followed_user:
                found = record
        return None if found is None else slate_view(found)

    def _latest(self, table: pd.DataFrame | None) -> dict | None:
        if table is None or self.cursor < 0:
            return None
        upto = table[table["round"] <= self.round]
        return None if upto.empty else upto.iloc[-1].to_dict()


def _read_optional(path: Path) -> pd.DataFrame | None:
    """A run folder's optional table, or None when it is absent, empty or unreadable."""
    try:
        table = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    return table if "round" in table.columns and len(table) else None
