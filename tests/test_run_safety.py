"""Nothing lost, nothing silently wrong: resume that honours what it is told, interrupts that keep
their work, damaged checkpoints, and bad input refused before any run folder is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from agorasim.cli import main
from agorasim.config import build_config
from agorasim.errors import UserInputError
from agorasim.run import preflight
from agorasim.scenarios import load_scenario

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
POP = ["--policy", "popularity", "--no-progress"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def one_run(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, small_overrides, capsys):
    """A 4-round popularity run with checkpoints at rounds 2 and 4."""
    code = main(["run", "--out", str(tmp_path / "runs")] + POP + sets(small_overrides + ["run.rounds=4",
                                                                                        "run.checkpoint_every=2"]))
    assert code == 0
    capsys.readouterr()
    return one_run(tmp_path / "runs")


@pytest.fixture
def straight6(tmp_path_factory, small_overrides):
    out = tmp_path_factory.mktemp("straight")
    assert main(["run", "--out", str(out)] + POP + sets(small_overrides + ["run.rounds=6"])) == 0
    return (one_run(out) / "metrics.csv").read_bytes()


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, flag", [
    (["--policy", "nope"], "--policy"), (["--set", "bogus.key=1"], "--set"), (["--seed", "1"], "--seed"),
    (["--scenario", "cold-start"], "--scenario"), (["--reranker", "none"], "--reranker"),
])
def test_resume_refuses_what_would_change_the_run(finished, capsys, extra, flag):
    before = snapshot(finished)
    assert main(["run", "--resume", str(finished), "--rounds", "6"] + extra) == 2
    err = capsys.readouterr().err
    assert f"{flag} cannot change it" in err and err.count("\n") == 1
    assert snapshot(finished) == before


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["market"].update(n_users=-5), "config.yaml: config market.n_users"),
    (lambda c: c["platform"].update(reranker="bogus"), "config.yaml: config platform.reranker"),
    (lambda c: c["market"].update(n_users=999), "market.n_users is 999 but the run's checkpoint has 300"),
    (lambda c: c["platform"].update(fairness_weight=2.0), "platform.fairness_weight is 2.0"),
])
def test_resume_checks_config_yaml_against_the_checkpoint(finished, capsys, edit, message):
    config = yaml.safe_load((finished / "config.yaml").read_text())
    edit(config)
    (finished / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(finished)
    assert main(["run", "--resume", str(finished), "--rounds", "6"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert snapshot(finished) == before


def test_unparseable_config_yaml_is_one_line(finished, capsys):
    (finished / "config.yaml").write_bytes(b"market: [unclosed\n\xff")
    assert main(["run", "--resume", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: not valid YAML" in err and err.count("\n") == 1


@pytest.mark.parametrize("rounds, message", [("-1", "must be at least 1"), ("3", "has 4 rounds done; give at least 4")])
def test_resume_rounds_must_cover_what_is_done(finished, capsys, rounds, message):
    assert main(["run", "--resume", str(finished), "--rounds", rounds]) == 2
    assert message in capsys.readouterr().err


def test_extending_a_run_keeps_config_yaml_true_and_equals_a_longer_run(finished, straight6, capsys):
    assert main(["run", "--resume", str(finished), "--rounds", "6", "--no-progress"]) == 0
    config = yaml.safe_load((finished / "config.yaml").read_text())
    assert config["run"]["rounds"] == 6
    assert [r["from_round"] for r in config["meta"]["resumed"]] == [4]
    assert (finished / "metrics.csv").read_bytes() == straight6
    summary = (finished / "summary.md").read_text()
    assert "cold-start" in summary and "seed 0" in summary and "unknown scenario" not in summary
    assert "checkpoint" in summary  # its size is reported


# --- damaged checkpoints --------------------------------------------------------------------------


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, straight6, capsys):
    newest = finished / "checkpoints" / "round_00004.ckpt"
    assert sorted(p.name for p in (finished / "checkpoints").glob("*.ckpt")) == ["round_00002.ckpt", "round_00004.ckpt"]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    assert main(["run", "--resume", str(finished), "--rounds", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "round_00004.ckpt: damaged" in err and "resuming from round_00002.ckpt" in err
    assert (finished / "metrics.csv").read_bytes() == straight6


def test_checkpoints_hold_the_log_once_in_segments(finished, straight6, capsys):
    """The interaction log is written incrementally: each checkpoint file holds the market without
    it, and checkpoints/log/ holds each round's impressions exactly once."""
    from agorasim.run import checkpoint

    payload = checkpoint.read(finished / "checkpoints" / "round_00004.ckpt")
    assert payload["market"].world.log.chunks == [] and payload["log_chunks"] == 4
    names = sorted(p.name for p in (finished / "checkpoints" / "log").iterdir())
    assert names == ["log_0000000_0000002.npz", "log_0000002_0000004.npz"]
    segments = checkpoint.read_log(finished / "checkpoints" / "log", 4)
    rounds = np.concatenate([s["round"] for s in segments])
    assert np.array_equal(np.unique(rounds), [0, 1, 2, 3]) and np.all(np.diff(rounds) >= 0)
    # a damaged newest segment is only needed by the newest checkpoint: resume falls back
    last = finished / "checkpoints" / "log" / names[-1]
    last.write_bytes(last.read_bytes()[:50])
    assert main(["run", "--resume", str(finished), "--rounds", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{names[-1]} is damaged" in err and "resuming from round_00002.ckpt" in err
    assert (finished / "metrics.csv").read_bytes() == straight6


@pytest.mark.parametrize("content", [b"", b"\x00garbage", None])
def test_no_usable_checkpoint_is_one_line_and_touches_nothing(finished, capsys, content):
    for path in (finished / "checkpoints").glob("*.ckpt"):
        if content is None:
            path.write_bytes(path.read_bytes()[:-10])
        else:
            path.write_bytes(content)
    before = snapshot(finished)
    assert main(["run", "--resume", str(finished), "--rounds", "6"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(finished) == before


# --- interrupts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, seed", [(signal.SIGINT, 11), (signal.SIGTERM, 12)])
def test_interrupt_writes_a_checkpoint_and_resume_is_byte_identical(tmp_path, small_overrides, sig, seed):
    """checkpoint_every is larger than the run, so only the interrupt's checkpoint can save it."""
    common = sets(small_overrides + ["run.rounds=400", "run.checkpoint_every=1000", "run.progress=false"]) + \
        ["--policy", "popularity", "--seed", "5"]
    at = int(np.random.default_rng(seed).integers(3, 9))  # interrupt after a random round
    proc = subprocess.Popen(RUN + common + ["--out", str(tmp_path / "cut")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, metrics = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "cut").glob("*/metrics.csv"))
        if found and len(found[0].read_text().splitlines()) > at:
            metrics = found[0]
            break
        time.sleep(0.02)
    assert metrics is not None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    run_dir = metrics.parent
    assert f"run folder: {run_dir}" in out.splitlines()[0]  # printed at the start
    assert proc.returncode == 130, err
    assert f"continue with: agorasim run --resume {run_dir}" in err
    (saved,) = (run_dir / "checkpoints").glob("*.ckpt")
    done = int(saved.stem.split("_")[1])
    assert at <= done < 400 and len(metrics.read_text().splitlines()) == 1 + done
    resumed = subprocess.run(RUN + ["--resume", str(run_dir), "--no-progress"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert main(["run", "--out", str(tmp_path / "straight")] + [a for a in common if a != "--no-progress"]) == 0
    assert metrics.read_bytes() == (one_run(tmp_path / "straight") / "metrics.csv").read_bytes()


def test_a_signal_late_in_a_round_still_leaves_a_checkpoint_of_the_round_it_stops_at(tmp_path, small_overrides,
                                                                                   monkeypatch):
    """The signal lands after the round's checkpoint decision (here: while the progress bar is
    updated), so the run must go one more round and checkpoint that one, not stop without one."""
    import tqdm

    from agorasim.run.runner import Interrupted, checkpoints, run_market, start_run

    config = build_config(load_scenario("cold-start"), small_overrides + [
        "run.rounds=50", "run.checkpoint_every=1000", "policy.name=popularity", f"run.out={tmp_path}"])
    market, recorder, run_dir = start_run(config)
    updates = []

    def update(bar, n=1):
        updates.append(n)
        if len(updates) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tqdm.tqdm, "update", update)
    with pytest.raises(Interrupted) as stopped:
        run_market(market, recorder, progress=False)
    assert stopped.value.rounds_done == 4
    assert [p.name for p in checkpoints(run_dir)] == ["round_00004.ckpt"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 4


def test_a_run_whose_language_model_is_gone_stops_with_a_checkpoint(tmp_path, small_overrides, capsys):
    """The openai backend at a port nobody listens on, with the server check off: every answer
    falls back, so after fallback_rounds rounds the run stops instead of going on for hours."""
    overrides = small_overrides + ["run.rounds=10", "agents.users.backend=openai", "agents.users.llm_share=0.5",
                                   "agents.llm.base_url=http://127.0.0.1:9/v1", "agents.llm.check_server=false",
                                   "agents.llm.retries=0", "agents.llm.reasks=0", "agents.llm.fallback_rounds=2"]
    assert main(["run", "--out", str(tmp_path)] + POP + sets(overrides)) == 1
    err = capsys.readouterr().err
    assert "fell back to the utility model" in err and "continue with: agorasim run --resume" in err
    run_dir = one_run(tmp_path)
    assert [p.name for p in (run_dir / "checkpoints").glob("*.ckpt")] == ["round_00002.ckpt"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3


# --- bad input, before any folder is written --------------------------------------------------------


@pytest.fixture
def binary_scenario(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x00\x01\xff\xfe")
    return path


BAD = [
    (["--policy", ","], "--policy ',': give at least one value"),
    (["--seeds", ","], "--seeds ',': give at least one value"),
    (["--set", "experiment.sweep_key=platform.fairness_weight"], "experiment.sweep_values: give the values"),
    (["--set", "experiment.sweep_values=[1, 2]"], "set experiment.sweep_key"),
    (["--scenario", "missing.yaml"], "--scenario missing.yaml: no such file"),
    (["--set", "platform.fairness_weight=.inf"], "platform.fairness_weight: Input should be a finite number"),
    (["--set", "agents.users.temperature=.nan"], "agents.users.temperature: Input should be a finite number"),
    (["--set", "rl.rewards={rating: .inf}"], "rl.rewards.rating: Input should be a finite number"),
    (["--set", "market.n_items=5"], "market.n_items: a slate shows platform.k=10 items"),
    (["--set", "market.n_users=1000000000000"], "GiB, this machine has"),
    (["--set", "rl.rewards={ratng: 1.0}", "--policy", "generative"], "unknown reward 'ratng'"),
    (["--set", "agents.users.backend=hf", "--set", "agents.llm.model=/nonexistent"], "agents.llm.model '/nonexistent'"),
    (["--set", "agents.cache.mode=replay", "--set", "agents.cache.path=/nonexistent.jsonl"], "no such response store"),
    (["--set", "agents.cache.mode=replay"], "replay needs the response store"),
    (["--set", "agents.users.backend=openai", "--set", "agents.llm.base_url=ftp://x"], "expected http(s)://"),
    (["--set", "agents.users.backend=openai", "--set", "agents.llm.base_url=http://127.0.0.1:9/v1"],
     "no server answers at http://127.0.0.1:9/v1"),
    (["--out", "/proc/agorasim"], "--out /proc/agorasim: cannot write there"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, small_overrides, args, message):
    out = tmp_path / "runs"
    argv = ["run"] + POP + sets(small_overrides) + args
    if "--out" not in args:
        argv += ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_binary_scenario_file(binary_scenario, capsys):
    assert main(["run", "--scenario", str(binary_scenario)]) == 2
    assert "not a text (UTF-8) YAML file" in capsys.readouterr().err


def test_out_that_is_a_file_or_a_run_folder(finished, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, message in ((afile, "is a file, not a folder"), (finished, "is a run folder")):
        before = snapshot(tmp_path)
        assert main(["run", "--out", str(out)] + POP + ["--rounds", "1"]) == 2
        assert message in capsys.readouterr().err
        assert snapshot(tmp_path) == before


def test_run_folder_names_cannot_climb_out_of_out(tmp_path, small_overrides):
    out = tmp_path / "deep" / "runs"
    assert main(["run", "--out", str(out)] + POP + sets(small_overrides + ["run.rounds=1", "scenario=../../escaped",
                                                                          "run.label=../x/y"])) == 0
    (run_dir,) = out.iterdir()
    assert run_dir.name.startswith("escaped__x-y__0__")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and "escaped" in p.name) == [run_dir.name]


def test_memory_estimate_by_hand():
    config = build_config(load_scenario("cold-start"), ["market.n_users=1000", "market.n_items=100",
                                                       "agents.users.activity=0.1", "market.new_users_per_round=5"])
    # 100 visitors + 5 arrivals, max(candidates 50, pool 100) = 100
    want = 400 * 2**20 + 2_500 * 1000 + 5_000 * 100 + 64 * 105 * 100
    assert preflight.memory_estimate(config) == want


def test_server_probe_is_skipped_when_replaying_or_asked(tmp_path):
    called = []
    config = build_config(load_scenario("cold-start"), ["agents.users.backend=openai"])
    preflight.check_engines(config, probe=lambda *a: called.append(a))
    assert called == [("http://127.0.0.1:8000/v1", "OPENAI_API_KEY")]
    config.agents.llm.check_server = False
    preflight.check_engines(config, probe=lambda *a: called.append(a))
    assert len(called) == 1
    with pytest.raises(UserInputError, match="expected http"):
        config.agents.llm.base_url = "127.0.0.1:8000"
        preflight.check_engines(config)


# --- reports and eval ----------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ("", "unreadable"), ("a,b\n1,zz\n", "not an agorasim metrics file"),
    ("round,exposure/gini,users/utility\n", "no rounds recorded yet"),
])
def test_report_on_a_bad_metrics_file(tmp_path, capsys, content, message):
    (tmp_path / "metrics.csv").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "summary.md").exists()


def test_report_out_that_is_a_file(finished, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["report", str(finished), str(finished), "--out", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and afile.read_text() == "keep"


def test_eval_checks_out_and_data_before_training(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["eval", "--quick", "--out", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    data = tmp_path / "three"
    data.mkdir()
    (data / "info.txt").write_text("".join(f"item {i}\t{i}\n" for i in range(3)))
    header = "user_id,item_asins,item_asin,history_item_id,item_id,history_item_title,item_title,history_rating," \
             "rating,history_timestamp,timestamp\n"
    row = "U{u},['a'],b,[{h}],{t},\"['x']\",y,[5.0],5.0,[1],{ts}\n"
    for name in ("valid.csv", "test.csv"):
        (data / name).write_text(header + "".join(row.format(u=u, h=u % 3, t=(u + 1) % 3, ts=u + 2) for u in range(4)))
    assert main(["eval", "--quick", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "3 items" in err and "need at least 10" in err and err.count("\n") == 1
    # the same data as a market world: a slate of 10 cannot be filled from 3 items
    assert main(["run", "--scenario", "amazon-industrial", "--out", str(tmp_path / "runs"),
                 "--set", f"market.data_dir={data}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "3 items" in err and "need at least" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


def test_an_experiment_can_be_extended_but_not_cut(tmp_path, small_overrides, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--out", str(out), "--seeds", "0,1"] + POP + sets(small_overrides + ["run.rounds=2"])) == 0
    (folder,) = out.iterdir()
    assert main(["run", "--resume", str(folder), "--rounds", "3", "--no-progress"]) == 0
    arms = sorted((folder / "arms").iterdir())
    assert [len((a / "metrics.csv").read_text().splitlines()) - 1 for a in arms] == [3, 3]
    assert yaml.safe_load((folder / "plan.yaml").read_text())["overrides"][-1] == "run.rounds=3"
    capsys.readouterr()
    assert main(["run", "--resume", str(folder), "--rounds", "2"]) == 2
    assert "already has 3 rounds" in capsys.readouterr().err


# --- bounded state: the log keeps clicks plus a window of full rounds ------------------------------


def test_log_compaction_keeps_clicks_and_the_window_and_resumes_identically(tmp_path, small_overrides, capsys):
    """With ``run.log_window=10`` the in-memory log of a 16-round run holds every click but the
    non-clicks of the last 10 rounds only; metrics equal a run that keeps everything, and a run
    resumed from log segments written before some of their rounds were compacted equals both."""
    from agorasim.env.market import Market
    from agorasim.run import runner

    base = small_overrides + ["policy.name=bpr", "policy.refit_every=3", "run.rounds=16"]
    full = Market(build_config(load_scenario("cold-start"), base + ["run.log_window=null"]))
    compact = Market(build_config(load_scenario("cold-start"), base + ["run.log_window=10"]))
    for _ in range(16):
        full.step()
        compact.step()
    import json

    assert json.dumps(full.rows) == json.dumps(compact.rows)
    a, b = full.world.log.arrays(), compact.world.log.arrays()
    assert (a["click"] == 0).sum() > (b["click"] == 0).sum() > 0  # non-clicks dropped ...
    assert np.array_equal(full.world.log.clicks()[1], compact.world.log.clicks()[1])  # ... clicks kept
    assert set(b["round"][b["click"] == 0]) == set(range(6, 16))  # full impressions: the last 10 rounds
    assert compact.world.log.compacted_before == 6

    out = tmp_path / "runs"
    args = ["run", "--out", str(out), "--no-progress"] + sets(base + ["run.log_window=10", "run.checkpoint_every=4"])
    assert main(args[:] + ["--set", "run.rounds=12"]) == 0
    run_dir = one_run(out)
    assert len(list((run_dir / "checkpoints").glob("round_*.ckpt"))) == 2  # run.keep_checkpoints
    assert main(["run", "--resume", str(run_dir), "--rounds", "16", "--no-progress"]) == 0
    market, _ = runner.load_run(run_dir, 16)
    assert market.world.log.compacted_before == 6
    assert np.array_equal(market.world.log.arrays()["item"], compact.world.log.arrays()["item"])
    straight = tmp_path / "straight"
    assert main(["run", "--out", str(straight), "--no-progress"] + sets(base + ["run.log_window=10"])) == 0
    assert (run_dir / "metrics.csv").read_bytes() == (one_run(straight) / "metrics.csv").read_bytes()
    capsys.readouterr()


def test_compact_by_hand():
    from agorasim.env.state import InteractionLog

    log = InteractionLog()
    for r in range(3):
        log.append(round=np.full(3, r), user=np.array([0, 1, 2]), item=np.array([5, 6, 7]) + r,
                   position=np.arange(3), click=np.array([1, 0, 0], np.int8), rating=np.array([4, np.nan, np.nan]))
    log.compact(2)
    assert [len(c["round"]) for c in log.chunks] == [1, 1, 3]  # rounds 0 and 1: their one click each
    assert log.clicks()[1].tolist() == [5, 6, 7] and len(log.arrays(since_round=2)["item"]) == 3
    segment = log.segment(0)
    log.compact(1)  # behind the pointer: nothing to do
    assert log.compacted_before == 2
    fresh = InteractionLog(compacted_before=2)
    full = InteractionLog()
    for r in range(3):
        full.append(round=np.full(3, r), user=np.array([0, 1, 2]), item=np.array([5, 6, 7]) + r,
                    position=np.arange(3), click=np.array([1, 0, 0], np.int8), rating=np.array([4, np.nan, np.nan]))
    fresh.extend_from_segment(full.segment(0))
    fresh.recompact()
    assert [len(c["round"]) for c in fresh.chunks] == [1, 1, 3]
    assert np.array_equal(fresh.segment(0)["item"], segment["item"])
