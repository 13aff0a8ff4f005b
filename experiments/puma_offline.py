"""PUMA's offline measure: rating prediction (RMSE, MAE) on held-out simulator ratings, per
migration arm, across a model upgrade A -> B and a chained one A -> B -> C.

``python experiments/puma_offline.py --seeds 0 1 2 --users 1000 --budget 100 --epochs 10 --json puma.json``
(about 9 min a seed on one CPU core).

Per seed: a synthetic market (``--users`` users) runs its popularity warm-up, after which the
generative policy's model A (width 64, 2 layers) is SFT-trained on the click log. Every user then
rates ``--ratings`` items they would choose (drawn by softmax of their true utility; the
simulator's expected stars, rounded to whole stars), a fifth of them held out. Prompts are trained on A (PUMA stage 1), and the
upgrade to B (width 128, 4 layers, another seed; SFT on the same log) is migrated by each arm:

* ``source A``: A's own prompts on A (what the upgrade threatens);
* ``random prompts``: B with untrained random prompts, only the rating head trained (on the
  budget's users): no personalisation;
* ``retrain``: every user's prompt trained again on B (the full-retraining baseline);
* ``puma`` / ``puma-random``: the adapter trained on ``--budget`` users chosen by PUMA's selection
  or at random, applied to every user's A prompt; ``puma (all users)``: the adapter on every user
  (5 epochs);
* chained: C (width 192, 4 layers) reached from B's PUMA prompts by a second adapter (A -> B -> C),
  against the adapter straight from A (A -> C) and retraining on C.

The table is the mean over seeds [95% percentile-bootstrap interval over seeds], with the seconds
and optimiser steps each arm spent on migration (the new model's own SFT is common to all arms and
not counted). ``--json`` writes every seed's numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch

from agorasim.config import build_config
from agorasim.env.market import Market
from agorasim.policy.observation import LogView
from agorasim.policy.puma import (
    RatingLM,
    Ratings,
    SoftPrompts,
    migrate,
    predict_stars,
    rating_sft,
    rmse_mae,
    select_users,
    train_prompts,
)
from agorasim.run.report import bootstrap_interval
from agorasim.scenarios import load_scenario

ARMS = ("source A", "random prompts", "retrain", "puma", "puma-random", "puma (all users)",
        "chained A->B->C", "direct A->C", "retrain on C")


def market_for(seed: int, users: int, budget: int) -> Market:
    overrides = [f"market.n_users={users}", "market.n_items=1000", "market.n_providers=100", "run.progress=false",
                 "policy.name=generative", "rl.method=none", "platform.reranker=none", f"run.seed={seed}",
                 "policy.params={warmup_rounds: 5, hidden: 64, layers: 2, heads: 4, "
                 f"puma: {{enabled: true, prompt_epochs: 1, budget: {budget}, min_per_cluster: {max(1, budget // 40)}}}}}"]
    return Market(build_config(load_scenario("policy-upgrade"), overrides))


def sample_ratings(market: Market, per_user: int, rng: np.random.Generator, temperature: float = 0.5) -> Ratings:
    """``per_user`` items per user rated by the simulator (whole stars). Users rate what they
    chose to consume, as in PUMA's data: items drawn without replacement with probability
    softmax(true utility / ``temperature``) (Gumbel top-k), so the stars spread over 1..5 instead
    of piling on the 1 star of a random item."""
    users = np.flatnonzero(market.world.population.view("active"))
    alive = market.world.catalogue.alive_ids()
    utility = market.users.utility_matrix(market.world, users, alive)
    keys = utility / temperature + rng.gumbel(size=utility.shape)
    picks = alive[np.argsort(-keys, axis=1)[:, :per_user]]
    stars = 1.0 + market.judge(users, picks)["rating"] / 2.5
    ratings = Ratings(per_user, holdout=0.2)
    ratings.add(np.repeat(users, per_user), picks.ravel(), np.clip(np.round(stars.ravel()), 1, 5), rng)
    return ratings


def upgraded(policy, log: LogView, ratings: Ratings, hidden: int, layers: int, seed: int, rng):
    """A copy of the policy on a new LM (SFT on the log, then the population rating SFT)."""
    new = copy.deepcopy(policy)
    new.hidden, new.layers = hidden, layers
    new.build_model(seed=seed)
    new.sft(log, rng, new.sft_epochs)
    _, items, stars = ratings.rows()
    rating_sft(RatingLM.of(new), items, stars, new.puma.rating_sft_epochs, new.sft_lr, new.puma.batch,
               torch.Generator().manual_seed(seed))
    return new


def held_out_error(policy, prompts: SoftPrompts, ratings: Ratings) -> tuple[float, float]:
    users, items, stars = ratings.rows(held=True)
    predicted = predict_stars(RatingLM.of(policy), prompts.head, prompts.table[torch.from_numpy(users)], items)
    return rmse_mae(predicted, stars)


def one_seed(seed: int, args) -> dict[str, dict[str, float]]:
    torch.set_num_threads(args.threads)
    market = market_for(seed, args.users, args.budget)
    for _ in range(market.policy.warmup_rounds):
        market.step()
    policy, log = market.policy, LogView(market.world.log)
    rng = np.random.default_rng(seed + 1000)
    ratings = sample_ratings(market, args.ratings, rng)
    cfg = policy.puma.model_copy(update={"prompt_epochs": args.epochs})
    out: dict[str, dict[str, float]] = {}

    def record(name, pol, prompts, seconds, steps):
        rmse, mae = held_out_error(pol, prompts, ratings)
        out[name] = {"rmse": rmse, "mae": mae, "seconds": seconds, "steps": float(steps)}
        print(f"seed {seed} {name:18s} rmse {rmse:.4f} mae {mae:.4f} {seconds:7.1f} s {steps:6d} steps", flush=True)

    # -- stage 1 on A --
    started = time.perf_counter()
    rating_sft(RatingLM.of(policy), ratings.rows()[1], ratings.rows()[2], cfg.rating_sft_epochs, policy.sft_lr,
               cfg.batch, torch.Generator().manual_seed(seed))
    source = SoftPrompts.fresh(policy.hidden, len(ratings.count), seed)
    users, items, stars = ratings.rows()
    steps = train_prompts(RatingLM.of(policy), source.head, source.table, users, items, stars, cfg.prompt_epochs,
                          cfg.prompt_lr, cfg.batch, torch.Generator().manual_seed(seed + 1))
    source.ready[np.unique(users)] = True
    record("source A", policy, source, time.perf_counter() - started, steps)

    # -- A -> B --
    b = upgraded(policy, log, ratings, 128, 4, 10_000 + seed, rng)
    lm_b = RatingLM.of(b)
    started = time.perf_counter()
    rand = SoftPrompts.fresh(b.hidden, len(ratings.count), seed + 7)
    picked = select_users(source.table.numpy(), ratings.variance(np.arange(len(ratings.count))), cfg.budget,
                          cfg.clusters, cfg.bins, cfg.min_per_cluster, seed)
    u, i, s = ratings.rows(picked)
    steps = train_prompts(lm_b, rand.head, rand.table, u, i, s, cfg.adapter_epochs, cfg.prompt_lr, cfg.batch,
                          torch.Generator().manual_seed(seed + 2), prompts_learn=False)
    record("random prompts", b, rand, time.perf_counter() - started, steps)
    migrated = {}
    for arm in ("retrain", "puma", "puma-random"):
        prompts, cost = migrate(arm, cfg, source, lm_b, ratings, seed)
        migrated[arm] = prompts
        record(arm, b, prompts, cost["time/puma_seconds"], int(cost["puma/steps"]))
    everyone = cfg.model_copy(update={"budget": len(ratings.count), "adapter_epochs": 5})
    prompts, cost = migrate("puma", everyone, source, lm_b, ratings, seed)
    record("puma (all users)", b, prompts, cost["time/puma_seconds"], int(cost["puma/steps"]))

    # -- B -> C: chained from B's PUMA prompts, against A -> C directly and retraining on C --
    c = upgraded(policy, log, ratings, 192, 4, 20_000 + seed, rng)
    lm_c = RatingLM.of(c)
    for name, start in (("chained A->B->C", migrated["puma"]), ("direct A->C", source)):
        prompts, cost = migrate("puma", cfg, start, lm_c, ratings, seed + 5)
        record(name, c, prompts, cost["time/puma_seconds"], int(cost["puma/steps"]))
    prompts, cost = migrate("retrain", cfg, source, lm_c, ratings, seed + 5)
    record("retrain on C", c, prompts, cost["time/puma_seconds"], int(cost["puma/steps"]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--ratings", type=int, default=20, help="simulator ratings per user (a fifth held out)")
    parser.add_argument("--budget", type=int, default=200, help="users that train the adapter")
    parser.add_argument("--epochs", type=int, default=15, help="prompt epochs of stage 1 and of retraining")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every seed's numbers here")
    args = parser.parse_args(argv)
    runs = [one_seed(seed, args) for seed in args.seeds]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seeds": runs}, f, indent=1)
    print(f"\n{len(runs)} seeds, {args.users} users, {args.ratings} ratings each, budget {args.budget}: "
          "mean [95% bootstrap interval over seeds]\n")
    print("| arm | RMSE | MAE | seconds | optimiser steps |")
    print("|---|---:|---:|---:|---:|")
    for arm in ARMS:
        cells = []
        for key in ("rmse", "mae", "seconds", "steps"):
            mean, low, high = bootstrap_interval(np.array([r[arm][key] for r in runs]))
            cells.append(f"{mean:.4f} [{low:.4f}, {high:.4f}]" if key in ("rmse", "mae") else
                         f"{mean:.1f}" if key == "seconds" else f"{mean:.0f}")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
