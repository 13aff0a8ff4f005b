"""Explanations per second: the learned and llm explainers against the template in the same run.

A small market (the tests' size, 32 aspects) runs ``--rounds`` warm-up rounds with the learned
explainer so that the explainer has trained on reviews and the users have histories; the slates of
the next round are then explained N times by each explainer (``platform/explain.py``):

- template: the baseline, top aspects by the user's profile (numpy);
- learned: SELLER's dual-path adapter and tiny LM, greedy constrained decoding of E aspects for
  every shown item (one batch), and one training round (``steps`` Adam steps) timed apart;
- llm: a text engine writes each explanation (``--engine fake`` by default, ``hf`` for the embedded
  SmolLM2-135M-Instruct); only the first ``--llm-items`` shown items are explained, each a
  distinct request (the memo is cleared), so the figure is the engine's own throughput;
  ``llm_read_share`` is the share of them whose aspects were read from the engine's text (the
  rest named no aspect and fell back to the template).

The last line printed is one JSON object.

    .venv/bin/python benchmarks/explain.py                     # fake engine
    .venv/bin/python benchmarks/explain.py --engine hf --llm-items 32
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SMALL = ["market.n_users=2000", "market.n_items=1000", "market.n_providers=100", "run.progress=false"]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="warm-up rounds before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best of)")
    parser.add_argument("--engine", default="fake", choices=["fake", "hf"], help="engine of the llm explainer")
    parser.add_argument("--llm-items", type=int, default=64, help="shown items the llm explainer explains")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    from agorasim.config import build_config
    from agorasim.env.market import Market
    from agorasim.platform.explain import ExplainRequest, LLMExplainer, TemplateExplainer, render

    torch.set_num_threads(args.threads)
    market = Market(build_config({}, SMALL + ["platform.explain=learned"]))
    for _ in range(args.rounds):
        market.step()
    last = market.last_round
    users, slates = last["users"], last["slates"]
    w, cat = market.world, market.world.catalogue
    request = ExplainRequest(users=users, slates=slates, listed=market.listed_aspects(slates), profile=w.profiles(users)[0],
                             history=w.population.history[users], content=cat.content[: cat.n], titles=cat.titles,
                             writes=np.zeros(len(users), bool), round=w.round)
    n_items = int((slates >= 0).sum())
    cfg = market.config.platform.explanation
    rng = np.random.default_rng(0)
    template = TemplateExplainer(cfg, cat.embedding.shape[1])
    t_template = best_of(lambda: template.explain(request, rng), args.repeats)
    learned = market.explainer
    t_learned = best_of(lambda: learned.explain(request, rng), args.repeats)
    t_train = best_of(lambda: learned.learn(request.history[:0], slates[0, :0], np.zeros((0, cfg.n_aspects), np.int64),
                                            cat.content[: cat.n], request.listed[0, :0], 0, rng), 1)

    engine = market.engines.get(args.engine)
    llm = LLMExplainer(cfg, cat.embedding.shape[1], engine, market.config.agents.llm, seed=0)
    rows = max(1, min(len(users), -(-args.llm_items // slates.shape[1])))
    small = ExplainRequest(**{**request.__dict__, "users": users[:rows], "slates": slates[:rows],
                              "listed": request.listed[:rows], "profile": request.profile[:rows],
                              "history": request.history[:rows], "writes": request.writes[:rows]})
    n_llm = int((small.slates >= 0).sum())
    llm.explain(small, rng)  # warm-up (loads the model)

    def fresh():
        llm.memo.clear()
        llm.explain(small, rng)

    t_llm = best_of(fresh, 1 if args.engine == "hf" else args.repeats)
    out = llm.explain(small, rng)
    shown = small.slates >= 0
    # explanations whose aspects were read from the engine's text (the rest fell back to the template)
    read = np.mean([text != render(a, llm.names) for text, a in zip(out.text[shown], out.aspects[shown])])
    result = {
        "benchmark": "explain", "shown_items": n_items, "aspects": cfg.n_aspects,
        "template_per_s": round(n_items / t_template, 1),
        "learned_per_s": round(n_items / t_learned, 1),
        "learned_train_round_s": round(t_train, 3), "learned_train_steps": cfg.steps,
        "learned_vs_template": round(t_learned / t_template, 1),
        "llm_engine": args.engine, "llm_items": n_llm, "llm_per_s": round(n_llm / t_llm, 2),
        "llm_read_share": round(float(read), 3),
        "threads": args.threads,
    }
    print(f"template {result['template_per_s']}/s, learned {result['learned_per_s']}/s "
          f"(training round {t_train:.3f} s), llm[{args.engine}] {result['llm_per_s']}/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
