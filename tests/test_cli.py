"""End-to-end CLI runs: outputs, determinism, bad input, resume after a kill, comparisons."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agorasim.cli import main
from agorasim.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py")]
REQUIRED = ["round", "exposure/gini", "exposure/hhi", "exposure/entropy", "exposure/coverage", "exposure/tail_share",
            "exposure/dgu", "exposure/mgu", "items/new_share", "users/utility", "users/click_rate", "users/churned",
            "accuracy/ndcg@10"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def run_folders(out: Path) -> list[Path]:
    """Run folders under ``out``: single runs, and the arms of experiment folders."""
    found = []
    for p in sorted(out.iterdir()):
        if (p / "plan.yaml").exists():
            found += sorted(a for a in (p / "arms").iterdir() if a.is_dir())
        elif p.is_dir():
            found.append(p)
    return found


def experiment_folder(out: Path) -> Path:
    (path,) = [p for p in out.iterdir() if (p / "plan.yaml").exists()]
    return path


def test_cold_start_run_writes_a_complete_run_folder(tmp_path, small_overrides):
    proc = subprocess.run(RUN + ["--scenario", "cold-start", "--out", str(tmp_path)]
                          + sets(small_overrides + ["run.rounds=5"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_folders(tmp_path)
    assert run_dir.name.startswith("cold-start__generative+trirec__0__")
    assert f"run folder: {run_dir}" in proc.stdout
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert all(column in header for column in REQUIRED)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 5
    assert not any("second" in c or "time" in c.split("/")[-1] for c in header if c != "items/time_to_first_exposure")
    for name in ("config.yaml", "timings.csv", "lorenz.csv", "events.jsonl", "summary.md"):
        assert (run_dir / name).stat().st_size > 0, name
    for plot in ("gini.png", "lorenz.png", "utility_vs_concentration.png", "new_items.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["meta"]
    assert meta["git_sha"] and meta["versions"]["numpy"]
    # the lock make setup installed from, by its SHA-256 (a one-byte change to the lock changes it)
    lock = Path(__file__).resolve().parents[1] / "locks" / "cpu.txt"
    assert meta["lock"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert list((run_dir / "checkpoints").glob("round_00005.ckpt"))


def test_same_seed_gives_byte_identical_metrics(tmp_path, small_overrides):
    args = ["run", "--rounds", "4", "--no-progress"] + sets(small_overrides)
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = run_folders(tmp_path / "a"), run_folders(tmp_path / "b")
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--scenario", "nope"], "unknown scenario 'nope'"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--reranker", "nope"], "config platform.reranker: must be one of"),
    (["--set", "market.n_user=3"], "unknown config key 'market.n_user'"),
    (["--set", "market.n_users=-1"], "config market.n_users"),
    (["--set", "platform.k=20", "--set", "platform.candidates=10"], "platform.candidates: must be >= platform.k"),
    (["--set", "policy.params={nonsense: 1}"], "config policy.params"),
    (["--rounds", "0"], "config run.rounds"),
    (["--seeds", "0,x"], "comma-separated list of int"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--resume", "/nonexistent/run"], "no such run folder"),
    (["--scenario", "exposure-study", "--set", "experiment.variants={grpo: [rl.method=grpo]}"],
     "experiment.control=sft-only: no arm has that label"),
    (["--scenario", "amazon-industrial", "--set", "market.data_dir=/nonexistent"], "/nonexistent"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    existing = tmp_path / "cold-start__old"
    existing.mkdir()
    (existing / "metrics.csv").write_text("round\n0\n")
    code = main(["run", "--out", str(tmp_path), "--no-progress"] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cold-start__old"]  # nothing new written
    assert (existing / "metrics.csv").read_text() == "round\n0\n"


def test_malformed_data_file_is_reported(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "info.txt").write_text("a title\t0\n")
    (data / "valid.csv").write_text("user_id,garbage\nx,y\n")
    (data / "test.csv").write_text("user_id,garbage\nx,y\n")
    code = main(["run", "--scenario", "amazon-industrial", "--out", str(tmp_path / "runs"),
                 "--set", f"market.data_dir={data}"])
    err = capsys.readouterr().err
    assert code == 2 and "valid.csv" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_bad_input_from_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run(RUN + ["--scenario", "cold-start", "--set", "market.n_users=abc", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("agorasim: error: config market.n_users")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, small_overrides):
    common = ["--seed", "3"] + sets(small_overrides + ["run.rounds=40", "run.checkpoint_every=4", "run.progress=false"])
    straight = subprocess.run(RUN + common + ["--out", str(tmp_path / "straight")], capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(RUN + common + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed").glob("*/checkpoints/round_00008.ckpt"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint is not None, "the run ended before it could be killed"
    run_dir = checkpoint.parents[1]
    lines_at_kill = len((run_dir / "metrics.csv").read_text().splitlines())
    assert lines_at_kill < 41  # really interrupted
    resumed = subprocess.run(RUN + ["--resume", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (want,) = run_folders(tmp_path / "straight")
    assert (run_dir / "metrics.csv").read_bytes() == (want / "metrics.csv").read_bytes()
    assert (run_dir / "lorenz.csv").read_bytes() == (want / "lorenz.csv").read_bytes()
    assert (run_dir / "events.jsonl").read_bytes() == (want / "events.jsonl").read_bytes()
    assert (run_dir / "summary.md").exists()


def test_several_seeds_and_policies_are_compared(tmp_path, small_overrides, capsys):
    code = main(["run", "--policy", "popularity,random", "--seeds", "0,1", "--out", str(tmp_path)]
                + sets(small_overrides + ["run.rounds=3"]))
    assert code == 0
    assert len(run_folders(tmp_path)) == 4
    compare = experiment_folder(tmp_path) / "compare"
    summary = (compare / "summary.md").read_text()
    assert "popularity+trirec" in summary and "random+trirec" in summary
    assert (compare / "compare.png").exists() and (compare / "tradeoff.png").exists()
    assert "comparison:" in capsys.readouterr().out


def test_fairness_sweep_labels_runs_by_value(tmp_path, small_overrides):
    code = main(["run", "--scenario", "fairness-tradeoff", "--rounds", "2", "--out", str(tmp_path),
                 "--set", "experiment.sweep_values=[0,2]"] + sets(small_overrides + ["run.rounds=3"]))
    assert code == 0
    names = [p.name for p in run_folders(tmp_path)]
    assert any("fairness_weight=0__" in n for n in names) and any("fairness_weight=2__" in n for n in names)


def test_every_arm_of_a_labelled_sweep_has_its_own_folder():
    """trirec-claim labels its base arm and sweeps the fairness weight over three promotion modes:
    18 arms, each named by its mode, weight and seed (the sweep value used to be dropped from a
    labelled arm, so arms of different weights shared a folder)."""
    from agorasim.cli import expand
    from agorasim.config import build_config
    from agorasim.run.experiment import arm_name
    from agorasim.scenarios import load_scenario

    base = load_scenario("trirec-claim")
    names = [arm_name(c) for c in expand(base, [], build_config(base))]
    assert len(names) == len(set(names)) == 18
    assert "promotion-off-fairness_weight=0.5__2" in names and "promotion-grounded-fairness_weight=2__0" in names
    with pytest.raises(UserInputError, match="arms share a folder name .promotion-grounded"):
        clash = ["experiment.variants={promotion-grounded: [agents.items.promotion=grounded]}"]
        expand(base, clash, build_config(base, clash))


def test_list_scenarios(capsys):
    assert main(["run", "--list-scenarios"]) == 0
    out = capsys.readouterr().out
    for name in ("cold-start", "popularity-loop", "fairness-tradeoff", "amazon-industrial"):
        assert name in out


def test_named_variants_run_beside_the_policies(tmp_path, small_overrides):
    code = main(["run", "--out", str(tmp_path), "--set", "experiment.variants={fair: [platform.fairness_weight=3]}"]
                + sets(small_overrides + ["run.rounds=2"]))
    assert code == 0
    names = sorted(p.name.split("__")[0] for p in run_folders(tmp_path))
    assert names == ["fair", "generative+trirec"]


def test_experiment_folder_resumes_arm_by_arm(tmp_path, small_overrides, capsys):
    args = ["run", "--policy", "popularity,random", "--seeds", "0,1", "--out", str(tmp_path)]
    args += sets(small_overrides + ["run.rounds=4", "run.checkpoint_every=2", "experiment.control=popularity+trirec"])
    assert main(args) == 0
    path = experiment_folder(tmp_path)
    straight = {p.name: (p / "metrics.csv").read_bytes() for p in run_folders(tmp_path)}
    assert sorted(straight) == ["popularity+trirec__0", "popularity+trirec__1", "random+trirec__0",
                                "random+trirec__1"]
    # an interrupted sitting: one arm finished, one stopped after its round-2 checkpoint, two never ran
    arms = path / "arms"
    for name in ("random+trirec__0", "random+trirec__1"):
        import shutil
        shutil.rmtree(arms / name)
    partial = arms / "popularity+trirec__1"
    (partial / "summary.md").unlink()
    (partial / "checkpoints" / "round_00004.ckpt").unlink()
    kept = (arms / "popularity+trirec__0" / "summary.md").stat().st_mtime_ns
    (path / "compare").rename(path / "old-compare")
    capsys.readouterr()
    assert main(["run", "--resume", str(path)]) == 0
    out = capsys.readouterr().out
    assert "arm popularity+trirec__0: finished, kept" in out and "arm popularity+trirec__1: resume" in out
    assert "arm random+trirec__0: start" in out
    assert (arms / "popularity+trirec__0" / "summary.md").stat().st_mtime_ns == kept
    for p in run_folders(tmp_path):
        assert (p / "metrics.csv").read_bytes() == straight[p.name], p.name
    assert (path / "compare" / "summary.md").read_text().count("  - seed ") == 4  # every arm in the comparison
    (path / "compare" / "summary.md").unlink()
    assert main(["report", str(path)]) == 0
    compare = (path / "compare" / "summary.md").read_text()  # the plan's control, paired over both seeds
    assert "## Paired against popularity+trirec" in compare and "| random+trirec | 2 |" in compare
