"""The new-item evaluator's cost per round: training (fit) and scoring, against the same round
without the evaluator, in the same run.

Two markets of the ``new-item-evaluator`` world (popularity policy, new-item boost) run the same
``--rounds`` rounds and seed: one boosts new items by age (the baseline), one by PaperEval's
evaluator (``platform.boost_score=evaluator``, ``platform/evaluator.py``), whose ``fit`` (every
``platform.evaluator.train_every`` rounds) and ``scores`` (every round, the new items) are timed.
The last line printed is one JSON object.

    .venv/bin/python benchmarks/evaluator.py --rounds 60
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

WORLD = ["market.n_users=2000", "market.n_items=1000", "market.n_providers=100", "market.new_items_per_round=5",
         "market.new_users_per_round=10", "agents.items.promotion=grounded", "platform.reranker=new-item-boost",
         "policy.name=popularity", "run.progress=false"]


def timed(obj, name: str, spent: list[float]) -> None:
    """Wrap ``obj.name`` so that each call's seconds are appended to ``spent``."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = inner(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return out

    setattr(obj, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    from agorasim.config import build_config
    from agorasim.env.market import Market

    torch.set_num_threads(args.threads)
    rounds = {}
    fits, scores = [], []
    for arm, extra in (("age", []), ("evaluator", ["platform.boost_score=evaluator"])):
        market = Market(build_config({}, WORLD + extra))
        if market.evaluator is not None:
            timed(market.evaluator, "fit", fits)
            timed(market.evaluator, "scores", scores)
        spent = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            market.step()
            spent.append(time.perf_counter() - started)
        rounds[arm] = np.array(spent)
    base, with_eval = rounds["age"].mean(), rounds["evaluator"].mean()
    result = {
        "benchmark": "evaluator", "rounds": args.rounds,
        "round_s_boost_by_age": round(float(base), 4), "round_s_evaluator": round(float(with_eval), 4),
        "fits": len(fits), "fit_s_mean": round(float(np.mean(fits)), 4) if fits else None,
        "scoring_calls": len(scores), "scoring_s_mean": round(float(np.mean(scores)), 5) if scores else None,
        "evaluator_s_per_round": round(float((np.sum(fits) + np.sum(scores)) / args.rounds), 4),
        "overhead_ratio": round(float(with_eval / base), 2), "threads": args.threads,
    }
    print(f"round {base:.3f} s by age, {with_eval:.3f} s with the evaluator: {len(fits)} fits of "
          f"{result['fit_s_mean']} s, scoring {result['scoring_s_mean']} s a round")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
