"""Command line: ``agorasim run|report|eval|fidelity|attack|dashboard`` (``experiments/run.py`` is ``agorasim run``).

Every error a user can cause (scenario name, policy, config key or value, data file, resume
folder) is reported on one line and exits with status 2 before any run folder is written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import datetime
from pathlib import Path

from agorasim.config import Config, build_config
from agorasim.errors import UserInputError
from agorasim.run import allocator
from agorasim.run.preflight import check_config, check_output

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        raise UserInputError(message)


def _csv_list(text: str, kind=str, option: str = "") -> list:
    try:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserInputError(f"{option} expected a comma-separated list of {kind.__name__}, got '{text}'") from None
    if not values:
        raise UserInputError(f"{option} '{text}': give at least one value (e.g. {'0,1,2' if kind is int else 'popularity,bpr'})")
    return values


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agorasim run", description="Simulate a recommendation marketplace and record exposure concentration.")
    p.add_argument("--scenario", help="packaged scenario name or a .yaml file (default cold-start)")
    p.add_argument("--policy", help="recommender policy; several comma-separated ones are compared")
    p.add_argument("--reranker", help="platform re-ranker: none, trirec, controller, mmr, new-item-boost")
    p.add_argument("--seed", type=int, help="seed of the run")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (reports confidence bands)")
    p.add_argument("--rounds", type=int, help="rounds to simulate")
    p.add_argument("--out", help="folder for run folders (default runs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set market.n_users=500 (repeatable)")
    p.add_argument("--workers", type=int, metavar="N", help="run the arms of an experiment as Ray tasks, N at a "
                   "time, on a local Ray started for the command (run.executor=ray, run.workers=N; the `ray` extra); "
                   "0: one after another in this process (run.executor=sequential, the default)")
    p.add_argument("--ray-address", metavar="ADDR", help="run the arms on the Ray cluster at ADDR ('auto', HOST:6379 "
                   "or ray://HOST:10001) instead of a local Ray (run.ray_address); results come back to this machine")
    p.add_argument("--resume", metavar="DIR", help="continue a run from its last checkpoint, or an experiment "
                   "folder arm by arm (finished arms kept, unfinished or failed ones resumed, missing ones run); only "
                   "--rounds (extend or shorten, not below what is done), --no-progress, --workers and "
                   "--ray-address may be given with it")
    p.add_argument("--list-scenarios", action="store_true", help="list packaged scenarios and exit")
    p.add_argument("--list-policies", action="store_true", help="list policies and re-rankers and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _executor_overrides(args) -> list[str]:
    """``--workers`` and ``--ray-address`` as ``run.executor``/``run.workers``/``run.ray_address`` overrides."""
    sets = []
    if args.workers is not None:
        if args.workers < 0:
            raise UserInputError(f"--workers {args.workers}: give 0 (one arm after another here) or at least 1 Ray worker")
        if args.workers == 0 and args.ray_address:
            raise UserInputError("--workers 0 runs the arms here, one after another: it cannot go with --ray-address")
        sets += ["run.executor=sequential"] if args.workers == 0 else ["run.executor=ray", f"run.workers={args.workers}"]
    if args.ray_address is not None:
        if not args.ray_address.strip():
            raise UserInputError("--ray-address: give the address of a Ray cluster, e.g. auto or ray://HOST:10001")
        sets += ["run.executor=ray", f"run.ray_address={json.dumps(args.ray_address.strip())}"]
    return sets


def _cli_overrides(args) -> list[str]:
    sets = []
    if args.policy:
        policies = _csv_list(args.policy, option="--policy")
        sets.append(f"policy.name={policies[0]}")
        sets.append(f"experiment.policies=[{','.join(policies)}]" if len(policies) > 1 else "experiment.policies=[]")
    if args.reranker:
        sets.append(f"platform.reranker={args.reranker}")
    if args.seed is not None:
        sets += [f"run.seed={args.seed}", "experiment.seeds=[]"]
    if args.seeds:
        seeds = _csv_list(args.seeds, int, "--seeds")
        sets.append(f"experiment.seeds=[{','.join(str(s) for s in seeds)}]")
    if args.rounds is not None:
        sets.append(f"run.rounds={args.rounds}")
    if args.out:
        sets.append(f"run.out={args.out}")
    if args.no_progress:
        sets.append("run.progress=false")
    return sets + _executor_overrides(args)


def expand(base: dict, overrides: list[str], config: Config) -> list[Config]:
    """One config per (policy or named variant, sweep value, seed) of the experiment section."""
    arms = [(None, [f"policy.name={p}"]) for p in config.experiment.policies or [config.policy.name]]
    arms += [(label, list(sets)) for label, sets in config.experiment.variants.items()]
    seeds = config.experiment.seeds or [config.run.seed]
    key = config.experiment.sweep_key
    values = config.experiment.sweep_values if key else [None]
    configs = []
    for (label, sets), value, seed in itertools.product(arms, values, seeds):
        extra = sets + [f"run.seed={seed}"] + ([f"{key}={value}"] if key else [])
        variant = build_config(base, overrides + extra)
        variant.experiment.policies = [variant.policy.name]  # an arm runs one policy
        if label:
            variant.run.label = label
        if key:  # every sweep point is its own arm, whatever the base or variant label
            variant.run.label = f"{variant.label} {key.split('.')[-1]}={value:g}"
        configs.append(variant)
    from agorasim.run.experiment import arm_name

    names = [arm_name(c) for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserInputError(f"experiment: {len(names) - len(set(names))} arms share a folder name ({twice[0]}): "
                             "give the policies, variants or seeds distinct labels")
    control = config.experiment.control
    labels = list(dict.fromkeys(c.label for c in configs))
    if control is not None and control not in labels:
        raise UserInputError(f"experiment.control={control}: no arm has that label (labels: {', '.join(labels)}; "
                             "experiment.control=null for no paired table)")
    return configs


def describe_policy_params() -> str:
    """Each policy's ``policy.params``: name, default and description of every field."""
    from agorasim.policy import POLICIES, params_model

    lines = ["", "policy.params of each policy (--set policy.params={field: value, ...}):"]
    for name in POLICIES:
        fields = params_model(name).model_fields
        lines.append(f"  {name}:" + ("" if fields else " (none)"))
        lines += [f"    {field} = {info.default!r}: {info.description}" for field, info in fields.items()]
    return "\n".join(lines)


def cmd_run(argv: list[str]) -> int:
    from agorasim.scenarios import describe_scenarios, load_scenario

    args = run_parser().parse_args(argv)
    if args.list_scenarios:
        for name, description in describe_scenarios():
            print(f"{name:20s} {' '.join(description.split())}")
        return 0
    if args.list_policies:
        from agorasim.platform import RERANKERS
        from agorasim.policy import POLICIES

        print("policies:   " + ", ".join(POLICIES))
        print("re-rankers: " + ", ".join(RERANKERS))
        print(describe_policy_params())
        return 0
    from agorasim.run import experiment, parallel
    from agorasim.run.runner import Interrupted, RunStopped, finish_run, run_market, start_run

    if args.resume:
        return _resume(args)
    base = load_scenario(args.scenario or "cold-start")
    overrides = _cli_overrides(args) + args.overrides
    config = build_config(base, overrides)
    check_config(config)
    configs = expand(base, overrides, config)
    for variant in configs:
        check_config(variant)
    check_output(config.run.out, "--out" if args.out else "run.out")
    if len(configs) > 1:
        with parallel.executor_for(config, len(configs), _warn) as executor:
            executor.start()  # a Ray that cannot start is exit 2 before the folder exists
            path = experiment.new_experiment(Path(config.run.out), config.scenario, base, overrides)
            print(f"experiment folder: {path}  (continue it with --resume {path})", flush=True)
            return _run_experiment(path, configs, config.experiment.sweep_key, executor)
    market, recorder, run_dir = start_run(configs[0])
    print(f"run folder: {run_dir}", flush=True)
    try:
        run_market(market, recorder, progress=configs[0].run.progress)
    except (Interrupted, RunStopped) as stop:
        return _interrupted(stop, run_dir)
    finish_run(run_dir)
    print(f"run folder: {run_dir}\nsummary:    {run_dir / 'summary.md'}")
    return 0


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_experiment(folder: Path, configs: list[Config], sweep_key: str | None, executor) -> int:
    """Run or finish every arm of an experiment folder, then print where its comparison is.

    Exit status 0 when every arm finished, 1 when one failed (each is named with its error; the
    others ran to the end), 130 when interrupted.
    """
    from agorasim.run import experiment
    from agorasim.run.runner import Interrupted, RunStopped

    try:
        result = experiment.run_experiment(folder, configs, sweep_key, lambda line: print(line, flush=True), executor)
    except (Interrupted, RunStopped) as stop:
        return _interrupted(stop, folder)
    except KeyboardInterrupt:  # Ctrl-C while Ray tasks run: the arms that came back are kept
        _warn(f"agorasim: interrupted; finished arms are kept in {folder / 'arms'}, the running ones start "
              f"again on resume\ncontinue with: agorasim run --resume {folder}")
        return 130
    if result.summary is not None:
        print(f"comparison: {result.summary}")
    if result.failed:
        listed = "; ".join(f"{name} ({error})" for name, error in result.failed)
        _warn(f"agorasim: {len(result.failed)} of {len(configs)} arms failed: {listed}\n"
              f"run them again with: agorasim run --resume {folder}")
        return 1
    return 0


def _interrupted(stop, folder: Path) -> int:
    """The message and exit status of a run stopped by a signal (130) or by ``RunStopped`` (1)."""
    from agorasim.run.runner import RunStopped

    stopped = isinstance(stop, RunStopped)
    what = f"stopped: {stop.reason}" if stopped else "interrupted"
    print(f"agorasim: {what}; after round {stop.rounds_done}, checkpoint written in {stop.run_dir}\n"
          f"continue with: agorasim run --resume {folder}", file=sys.stderr)
    return 1 if stopped else 130


def _resume(args) -> int:
    """``--resume DIR``: a run folder or an experiment folder; only --rounds and --no-progress apply
    (and, to an experiment folder, --workers and --ray-address: how this sitting runs its arms)."""
    from agorasim.run import experiment, parallel
    from agorasim.run.runner import Interrupted, RunStopped, finish_run, load_run, run_market

    given = [flag for flag, value in (("--scenario", args.scenario), ("--policy", args.policy),
                                      ("--reranker", args.reranker), ("--seed", args.seed), ("--seeds", args.seeds),
                                      ("--out", args.out), ("--set", args.overrides)) if value not in (None, [])]
    folder = Path(args.resume)
    if not folder.is_dir():
        raise UserInputError(f"--resume {args.resume}: no such run folder")
    if given:
        raise UserInputError(f"--resume continues a run as it started: {given[0]} cannot change it (only "
                             "--rounds, --no-progress, --workers and --ray-address apply); start a new run for "
                             "another setting")
    if args.rounds is not None and args.rounds < 1:
        raise UserInputError(f"--rounds {args.rounds}: must be at least 1")
    if experiment.is_experiment(folder):
        base, overrides = experiment.read_plan(folder)
        if args.rounds is not None:
            overrides = experiment.set_rounds(folder, args.rounds)
        overrides = overrides + _executor_overrides(args)  # this sitting's, not written to the plan
        config = build_config(base, overrides)
        configs = expand(base, overrides, config)
        for variant in configs:
            check_config(variant)
        with parallel.executor_for(config, len(configs), _warn) as executor:
            return _run_experiment(folder, configs, config.experiment.sweep_key, executor)
    market, recorder = load_run(folder, args.rounds)
    print(f"run folder: {folder} (resuming at round {market.world.round} of {market.config.run.rounds})", flush=True)
    try:
        run_market(market, recorder, progress=market.config.run.progress and not args.no_progress)
    except (Interrupted, RunStopped) as stop:
        return _interrupted(stop, folder)
    print(f"run folder: {folder}\nsummary:    {finish_run(folder)}")
    return 0


def cmd_report(argv: list[str]) -> int:
    from agorasim.run.report import (
        check_control,
        check_export_format,
        check_run_folder,
        export_runs,
        write_comparison_report,
        write_run_report,
    )

    p = _Parser(prog="agorasim report", description="(Re)write plots and summary of run folders.")
    p.add_argument("run_dirs", nargs="+", help="run folders")
    p.add_argument("--out", help="comparison folder when several runs are given")
    p.add_argument("--x-key", help="dotted config key of a sweep (trade-off plot)")
    p.add_argument("--control", help="label of the control arm: adds every other label's difference from it, paired "
                   "by seed (an experiment folder defaults to its experiment.control)")
    p.add_argument("--format", dest="fmt", help="also write every round of every run as one table, runs.csv or "
                   "runs.parquet, beside the report (columns scenario, label, seed, run, then metrics.csv's)")
    args = p.parse_args(argv)
    from agorasim.run import experiment

    if args.fmt is not None:
        check_export_format(args.fmt)
    if len(args.run_dirs) == 1 and experiment.is_experiment(Path(args.run_dirs[0])):
        path = Path(args.run_dirs[0])
        arms = experiment.finished_arms(path)
        if not arms:
            raise UserInputError(f"{path}: no finished arm yet")
        if args.control is not None:
            check_control(arms, args.control)
        control = args.control or experiment.plan_control(path)
        summary = write_comparison_report(arms, Path(args.out or path / "compare"), args.x_key, control=control)
        print(summary)
        if args.fmt:
            print(export_runs(arms, summary.parent, args.fmt))
        return 0
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        check_run_folder(d)
    if len(dirs) == 1:
        if args.control is not None:
            raise UserInputError(f"--control {args.control}: needs several runs (or an experiment folder) to compare")
        summary = write_run_report(dirs[0])
    else:
        out = Path(args.out or "runs/compare__" + datetime.now().strftime("%Y%m%d-%H%M%S"))
        check_output(out, "--out")
        if args.control is not None:
            check_control(dirs, args.control)
        summary = write_comparison_report(dirs, out, args.x_key, control=args.control)
    print(summary)
    if args.fmt:
        print(export_runs(dirs, Path(summary).parent, args.fmt))
    return 0


def cmd_eval(argv: list[str]) -> int:
    from agorasim.run.offline import main as offline_main

    return offline_main(argv)


def _llm_check_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from agorasim.agents.engines import ENGINES

    p = _Parser(prog=prog, description=description)
    p.add_argument("--backend", default="hf", choices=ENGINES, help="text engine of the user agents (default hf)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an agents.llm.* or agents.cache.* key, e.g. --set agents.llm.batch_size=16")
    return p


def _llm_sections(overrides: list[str]):
    """(agents.llm, agents.cache) from ``--set`` overrides of those sections only."""
    for text in overrides:
        if not text.split("=", 1)[0].strip().startswith(("agents.llm.", "agents.cache.")):
            raise UserInputError(f"--set {text}: only agents.llm.* and agents.cache.* keys apply here")
    config = build_config({}, overrides)
    return config.agents.llm, config.agents.cache


def cmd_fidelity(argv: list[str]) -> int:
    from agorasim.run import llm_checks

    p = _llm_check_parser("agorasim fidelity", "Can language-model users find real Amazon users' held-out "
                          "next item among random ones? Precision/recall/F1 beside utility and random choice.")
    p.add_argument("--users", type=int, default=200, help="test users sampled (default 200)")
    p.add_argument("--candidates", type=int, default=10, help="slate size: held-out item + random unseen items (default 10)")
    p.add_argument("--data", help="data folder with info.txt, valid.csv, test.csv (default: the vendored copy)")
    args = p.parse_args(argv)
    llm_cfg, cache_cfg = _llm_sections(args.overrides)
    figures = llm_checks.fidelity(args.backend, args.users, args.candidates, args.seed, llm_cfg, args.data,
                                  cache_cfg=cache_cfg, progress=True)
    print(llm_checks.format_fidelity(figures))
    print(llm_checks.json_line(figures))
    return 0


def cmd_attack(argv: list[str]) -> int:
    from agorasim.agents.prompts import INJECTION_STYLES
    from agorasim.run import llm_checks

    p = _llm_check_parser("agorasim attack", "Success rate of prompt-injection styles in a promotion, with the "
                          "defence off and on (95%% intervals), and the defence's false-positive rate on honest text.")
    p.add_argument("--users", type=int, default=100, help="users of the synthetic market asked (default 100)")
    p.add_argument("--styles", default=None,
                   help=f"injection styles, comma-separated (default all: {','.join(INJECTION_STYLES)})")
    p.add_argument("--honest", type=int, default=100,
                   help="honest promotions the model writes for the false-positive rate (default 100; 0: none)")
    args = p.parse_args(argv)
    llm_cfg, cache_cfg = _llm_sections(args.overrides)
    styles = None if args.styles is None else _csv_list(args.styles, option="--styles")
    figures = llm_checks.attack(args.backend, args.users, args.seed, llm_cfg, styles=styles,
                                honest=args.honest, cache_cfg=cache_cfg, progress=True)
    print(llm_checks.format_attack(figures))
    print(llm_checks.json_line(figures))
    return 0


def dashboard_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agorasim dashboard", description="Serve a live Mesa (SolaraViz) dashboard of a scenario run "
                "round by round, or of a run folder replayed: exposure Gini, coverage, tail share, utility, the "
                "Lorenz curve, exposure by popularity group against its target, the fairness weight and one user's slate.")
    p.add_argument("run_dir", nargs="?", help="a run folder to replay (instead of running --scenario live)")
    p.add_argument("--scenario", help="packaged scenario name or a .yaml file to run live (default cold-start)")
    p.add_argument("--seed", type=int, help="seed of the live run (a control of the page too)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the live run, e.g. --set market.n_users=500 (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    return p


def cmd_dashboard(argv: list[str]) -> int:
    args = dashboard_parser().parse_args(argv)
    if args.run_dir and (args.scenario or args.overrides or args.seed is not None):
        raise UserInputError("agorasim dashboard: give a run folder to replay or --scenario/--seed/--set to run live, not both")
    from agorasim.viz.server import check_port, quiet_solara

    check_port(args.host, args.port)
    quiet_solara()
    try:
        from agorasim.viz import dashboard
    except ImportError as error:
        raise UserInputError(f"agorasim dashboard needs the viz extra ({error.name} is missing): "
                             "pip install 'agorasim[viz]'") from None
    from agorasim.viz.server import serve

    if args.run_dir:
        spec = dashboard.replay_spec(args.run_dir)
    else:
        spec = dashboard.live_spec(args.scenario or "cold-start", args.overrides, args.seed)
    dashboard.set_page(spec)
    print(f"dashboard: http://{args.host}:{args.port}  ({spec.name}; Ctrl-C stops it)", flush=True)
    serve(args.host, args.port)
    return 0


COMMANDS = {"run": cmd_run, "report": cmd_report, "eval": cmd_eval, "fidelity": cmd_fidelity, "attack": cmd_attack,
            "dashboard": cmd_dashboard}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    allocator.tune()  # keep freed heap memory between rounds (run/allocator.py); once per process
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: agorasim {run,report,eval,fidelity,attack,dashboard} [options]   (agorasim run --help, agorasim eval --help)")
        return 0
    command = argv[0]
    try:
        if command not in COMMANDS:
            raise UserInputError(f"unknown command '{command}': choose one of {', '.join(COMMANDS)}")
        return COMMANDS[command](argv[1:])
    except UserInputError as error:
        print(f"agorasim: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C: the last periodic checkpoint stays
        print("agorasim: interrupted; continue with --resume <run folder> (from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
