"""Experiment arms as Ray tasks: the same files as the sequential path, failures kept to their arm."""

import shutil
from pathlib import Path

import pytest

from agorasim.cli import main
from agorasim.run import parallel

TINY = ["market.n_users=300", "market.n_items=200", "market.n_providers=20", "market.new_items_per_round=3",
        "market.new_users_per_round=4", "agents.users.activity=0.3", "run.rounds=4", "run.eval_users=32",
        "run.progress=false"]
# a variant that passes every check up front and fails inside the run only: its language-model users
# ask a server that is not there, fall back to the utility model every time, and the run stops
# (RunStopped) after agents.llm.fallback_rounds=3 rounds, with its checkpoint written
DEAD = ('experiment.variants={dead: [agents.users.backend=openai, agents.users.llm_share=0.05, '
        '"agents.llm.base_url=http://127.0.0.1:9/v1", agents.llm.check_server=false, agents.llm.retries=0]}')


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def experiment(out: Path) -> Path:
    (path,) = [p for p in out.iterdir() if (p / "plan.yaml").exists()]
    return path


def test_ray_arms_write_the_files_of_the_sequential_path(tmp_path, capsys):
    pytest.importorskip("ray")
    args = ["run", "--policy", "popularity,random", "--seeds", "0,1"] + sets(TINY)
    assert main(args + ["--out", str(tmp_path / "seq")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "arm random+trirec__1: start (Ray task)" in out and "(4 of 4)" in out
    seq, ray = experiment(tmp_path / "seq"), experiment(tmp_path / "ray")
    names = sorted(p.name for p in (seq / "arms").iterdir())
    assert names == sorted(p.name for p in (ray / "arms").iterdir()) and len(names) == 4
    for name in names:
        assert (ray / "arms" / name / "metrics.csv").read_bytes() == (seq / "arms" / name / "metrics.csv").read_bytes()
        assert (ray / "arms" / name / "summary.md").is_file()
    assert (ray / "compare" / "summary.md").read_bytes() == (seq / "compare" / "summary.md").read_bytes()


def test_a_failing_ray_arm_is_reported_and_resume_runs_only_what_is_missing(tmp_path, capsys):
    pytest.importorskip("ray")
    args = ["run", "--policy", "popularity,random", "--out", str(tmp_path), "--workers", "2"]
    assert main(args + sets(TINY + [DEAD])) == 1
    captured = capsys.readouterr()
    path = experiment(tmp_path)
    arms = path / "arms"
    assert "arm dead__0: FAILED" in captured.out and "stopped after round 3" in captured.out
    assert "1 of 3 arms failed: dead__0" in captured.err and f"--resume {path}" in captured.err
    assert "stopped after round 3" in (arms / "dead__0" / "error.txt").read_text()
    assert list((arms / "dead__0" / "checkpoints").glob("round_00003.ckpt"))  # sent back with the failure
    for name in ("popularity+trirec__0", "random+trirec__0"):
        assert (arms / name / "summary.md").is_file()
    assert (path / "compare" / "summary.md").read_text().count("  - seed ") == 2  # the finished arms only

    first = (arms / "random+trirec__0" / "metrics.csv").read_bytes()
    kept = (arms / "popularity+trirec__0" / "summary.md").stat().st_mtime_ns
    shutil.rmtree(arms / "random+trirec__0")
    code = main(["run", "--resume", str(path), "--workers", "2"])
    out = capsys.readouterr().out
    assert "arm popularity+trirec__0: finished, kept" in out
    assert "arm random+trirec__0: start (Ray task)" in out and "arm dead__0: resume (Ray task)" in out
    assert "arm popularity+trirec__0: start" not in out
    assert (arms / "popularity+trirec__0" / "summary.md").stat().st_mtime_ns == kept
    assert (arms / "random+trirec__0" / "metrics.csv").read_bytes() == first
    # the stopped arm resumed at round 3; its last round ends the run before a fourth fallback stop
    assert code == 0 and (arms / "dead__0" / "summary.md").is_file() and not (arms / "dead__0" / "error.txt").exists()


def test_without_ray_the_arms_run_one_after_another_saying_so(tmp_path, capsys, monkeypatch):
    real = parallel.importlib.util.find_spec
    monkeypatch.setattr(parallel.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    args = ["run", "--policy", "popularity,random", "--out", str(tmp_path)] + sets(TINY + ["run.rounds=2"])
    assert main(args + ["--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "ray is not installed (pip install 'agorasim[ray]'); running the 2 arms one after another" in captured.err
    assert "arm random+trirec__0: start\n" in captured.out
    assert main(args + ["--ray-address", "auto"]) == 2  # a cluster asked for is not quietly replaced
    assert "--ray-address auto: ray is not installed" in capsys.readouterr().err
    assert len(list(tmp_path.iterdir())) == 1  # no folder for the refused command


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers -1: give 0"),
    (["--workers", "0", "--ray-address", "auto"], "cannot go with --ray-address"),
    (["--set", "run.ray_address=auto"], "needs run.executor=ray"),
])
def test_bad_executor_flags_are_one_line(tmp_path, capsys, flags, message):
    assert main(["run", "--policy", "popularity,random", "--out", str(tmp_path)] + flags + sets(TINY)) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
