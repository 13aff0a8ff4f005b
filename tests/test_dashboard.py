"""The dashboard's Mesa models and page pieces, without a browser (tests/test_dashboard_browser.py
opens the page): the controls reach the market, the plotted series are the metrics rows, the group
exposure agrees with the row's DGU, the followed slate is the one shown, a run folder replays as
it was written, and bad input is one line with exit status 2."""

import json
import socket

import numpy as np
import pandas as pd
import pytest

import agorasim.viz  # noqa: E402,F401  (solara's settings, before solara is imported)

pytest.importorskip("solara", reason="the dashboard needs the viz extra (solara)")

from agorasim.cli import main  # noqa: E402
from agorasim.metrics import exposure  # noqa: E402
from agorasim.viz.dashboard import _html_table, live_spec, replay_spec, slate_table  # noqa: E402
from agorasim.viz.models import SERIES, LiveMarket, RunReplay  # noqa: E402
from conftest import SMALL  # noqa: E402

EVERYONE_VISITS = ["agents.users.activity=1.0"]


def test_live_market_is_built_from_the_controls(small_overrides):
    market = LiveMarket(scenario="popularity-loop", policy="random", reranker="trirec", fairness_weight=2.5,
                        seed=3, user=5, overrides=tuple(small_overrides))
    cfg = market.config
    assert (cfg.policy.name, cfg.platform.reranker, cfg.platform.fairness_weight, cfg.run.seed) == (
        "random", "trirec", 2.5, 3)
    assert market.followed_user == 5 and market.steps == 0 and market.running
    for _ in range(2):
        market.step()
    assert market.steps == 2
    frame = market.datacollector.get_model_vars_dataframe()
    assert list(frame.columns) == list(SERIES)
    for label, key in SERIES.items():
        np.testing.assert_array_equal(frame[label].to_numpy(), [row[key] for row in market.rows])
    np.testing.assert_array_equal(frame["fairness weight"], [2.5, 2.5])  # trirec keeps its weight


def test_live_market_stops_at_the_runs_last_round(small_overrides):
    market = LiveMarket(scenario="popularity-loop", overrides=tuple(small_overrides + ["run.rounds=2"]))
    market.step()
    assert market.running
    market.step()
    assert not market.running  # Mesa's controller greys out Step and Play


def test_page_controls_are_mesa_model_parameters_of_the_model(small_overrides):
    """What SolaraViz's Reset does: the model class called with the parameters' values."""
    spec = live_spec("popularity-loop", small_overrides)
    params = spec.model_params
    assert params["policy"]["value"] == "popularity" and "bpr" in params["policy"]["values"]
    assert params["reranker"]["value"] == "none" and "trirec" in params["reranker"]["values"]
    assert (params["fairness_weight"].value, params["seed"].value) == (1.0, 0)
    first = spec.model()
    assert isinstance(first, LiveMarket) and first.config.scenario == "popularity-loop"
    params["reranker"]["value"], params["fairness_weight"].value = "controller", 0.5
    again = spec.model()  # a later session: a fresh market from the parameters
    assert again is not first
    assert (again.config.platform.reranker, again.config.platform.fairness_weight) == ("controller", 0.5)


def test_group_exposure_is_what_the_dgu_compares(small_overrides):
    market = LiveMarket(scenario="popularity-loop", overrides=tuple(small_overrides))
    for _ in range(3):
        market.step()
    for row, groups in zip(market.rows, market.group_rows):
        n = market.config.platform.n_groups
        share = np.array([groups[f"share/g{g}"] for g in range(n)])
        target = np.array([groups[f"target/g{g}"] for g in range(n)])
        assert groups["round"] == row["round"]
        assert share.sum() == pytest.approx(1.0) and target.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(target, np.full(n, 1 / n))  # platform.target=uniform
        assert np.abs(share - target).sum() == pytest.approx(row["exposure/dgu"])
    rnd, share, target = market.groups()
    assert rnd == 2 and share[0] > share[-1]  # the popular group gets more than the tail


def test_lorenz_view_is_the_ledger_windows_curve(small_overrides):
    market = LiveMarket(scenario="popularity-loop", overrides=tuple(small_overrides))
    assert market.lorenz() is None
    market.step()
    rnd, population, shares = market.lorenz()
    last = market.last_round
    want_population, want_shares = exposure.lorenz(last["window"][last["alive"]], points=21)
    assert rnd == 0
    np.testing.assert_array_equal(population, want_population)
    np.testing.assert_array_equal(shares, want_shares)
    assert shares[0] == 0 and shares[-1] == pytest.approx(1.0) and np.all(np.diff(shares) >= 0)


def test_followed_slate_is_the_slate_the_user_was_shown(small_overrides):
    market = LiveMarket(scenario="popularity-loop", user=7, overrides=tuple(small_overrides + EVERYONE_VISITS))
    assert market.followed_slate() is None
    market.step()
    slate = market.followed_slate()
    last = market.last_round
    b = int(np.flatnonzero(last["users"] == 7)[0])
    assert slate["user"] == 7 and slate["round"] == 0
    assert [s["item"] for s in slate["slots"]] == [int(i) for i in last["slates"][b] if i >= 0]
    clicks = [slot for slot, s in enumerate(slate["slots"]) if s["click"]]
    assert clicks == ([int(last["feedback"].choice[b])] if last["feedback"].choice[b] >= 0 else [])
    for slot, s in enumerate(slate["slots"]):
        assert s["hype"] == pytest.approx(last["shown"].hype[b, slot])
        assert set(s["unsupported"]) <= set(s["claimed"])
        assert (s["rating"] is None) == (not s["click"])


def test_slate_table_names_promotions_and_feedback():
    slate = {"user": 3, "round": 4, "slots": [
        {"item": 12, "title": "Steel Kettle", "claimed": ["durable", "compact"], "unsupported": ["compact"],
         "hype": 0.5, "click": True, "rating": 7.5, "reason": "liked"},
        {"item": 40, "title": "", "claimed": [], "unsupported": [], "hype": 0.0, "click": False, "rating": None,
         "reason": "not_interested"},
        {"item": 41, "title": "", "claimed": None, "unsupported": None, "hype": None, "click": False,
         "rating": None, "reason": "preferred_other"}]}
    assert slate_table(slate, 3) == ("User 3, round 4", [
        ("0", "12 Steel Kettle", "durable, compact", "compact", "0.50", "clicked, rated 7.5/10 (liked)"),
        ("1", "40", "none", "none", "0.00", "not interested"),
        ("2", "41", "—", "—", "—", "preferred other")])
    assert slate_table(None, 9) == ("User 9 has not visited yet (or is not among the users events.jsonl records).", [])
    assert "&lt;b&gt;" in _html_table([("0", "<b>", "", "", "", "")])  # titles are escaped


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["run", "--scenario", "popularity-loop", "--policy", "popularity", "--reranker", "controller",
            "--rounds", "12", "--out", str(out)]
    for o in SMALL + ["run.rounds=12"]:
        argv += ["--set", o]
    assert main(argv) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def test_replay_steps_through_the_run_folder(run_folder):
    metrics = pd.read_csv(run_folder / "metrics.csv")
    replay = RunReplay(run_dir=str(run_folder))
    assert replay.running and replay.current_row() == {} and replay.lorenz() is None
    while replay.running:
        replay.step()
    assert replay.steps == len(metrics) == 12
    frame = replay.datacollector.get_model_vars_dataframe()
    for label, key in SERIES.items():
        np.testing.assert_array_equal(frame[label].to_numpy(), metrics[key].to_numpy())
    assert frame["fairness weight"].nunique() > 1  # the controller moved its weight
    lorenz = pd.read_csv(run_folder / "lorenz.csv")
    rnd, population, shares = replay.lorenz()
    assert rnd == 11 and list(lorenz["round"]) == [0, 10, 11]  # every 10 rounds and the last
    np.testing.assert_array_equal(shares, lorenz.iloc[-1][[f"p{i}" for i in range(21)]].to_numpy(float))
    groups = pd.read_csv(run_folder / "groups.csv")
    assert len(groups) == 12
    share = groups.filter(like="share/").to_numpy()
    target = groups.filter(like="target/").to_numpy()
    np.testing.assert_allclose(np.abs(share - target).sum(1), metrics["exposure/dgu"], rtol=1e-12)


def test_replay_follows_a_user_of_events_jsonl(run_folder):
    events = [json.loads(line) for line in (run_folder / "events.jsonl").read_text().splitlines()]
    user = events[-1]["user_id"]
    last = [e for e in events if e["user_id"] == user][-1]
    replay = RunReplay(run_dir=str(run_folder), user=user)
    while replay.running:
        replay.step()
    slate = replay.followed_slate()
    assert slate["round"] == last["round"] and [s["item"] for s in slate["slots"]] == last["slate"]
    assert all(s["claimed"] is not None and s["hype"] is not None for s in slate["slots"])
    judged = {j["item_id"]: j for j in last["judgements"]}
    assert all(judged[s["item"]]["promotion"]["claimed"] == s["claimed"] for s in slate["slots"])
    spec = replay_spec(str(run_folder))
    assert user in spec.model_params["user"]["values"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--scenario", "no-such-scenario"], "unknown scenario 'no-such-scenario'"),
    (["--scenario", "popularity-loop", "--set", "platform.reranker=nope"], "platform.reranker"),
    (["{tmp}"], "not a run folder (no metrics.csv)"),
    (["{tmp}/missing"], "no such run folder"),
    (["{tmp}", "--scenario", "cold-start"], "not both"),
    (["--port", "0"], "between 1 and 65535"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["dashboard", *argv, "--port", str(_free_port())] if "--port" not in argv else ["dashboard", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--scenario", "popularity-loop", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"agorasim: error: --port {port}: cannot listen on 127.0.0.1:{port} (in use); choose another port"
