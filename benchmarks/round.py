"""One market round against the bare numpy + faiss kernels that do the same scoring and choice.

The framework round (utility agents, popularity policy, no re-ranker, all metrics and the log)
is timed through ``Market.step()``. The kernels, in the same process on the same arrays, do only
the scoring and choice math of that round (see ``kernels``).
``overhead_ratio = seconds_per_round / kernel_seconds``; target <= 1.2 at the default size;
at a million users (``--users 1000000 --items 100000 --index ivf``) <= 5 s a round and <= 8 GiB.

    python benchmarks/round.py            # 100k users, 20k items, 10% active
    python benchmarks/round.py --quick    # 10k users, 2k items
    python benchmarks/round.py --users 1000000 --items 100000 --index ivf   # a million users

``--index`` sets ``env.retrieval.index`` (the kernels always search exactly), and the recall of
the exact candidate pool is measured on the same market after the timed rounds. Peak memory is
the process's maximum resident set.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import faiss
import numpy as np
import torch

from agorasim.config import build_config
from agorasim.env.market import Market
from agorasim.env.retrieval import draw_excluding
from agorasim.run import allocator
from agorasim.scenarios import load_scenario


def kernels(market: Market, users: np.ndarray, rng: np.random.Generator) -> float:
    """Seconds for the bare scoring and choice of one round over ``users``: the same math as
    the round (profiles with cold users seeded by a popularity-drawn item, faiss search plus
    random exploration distinct from the searched items, popularity ranking, promotion
    pull, true and perceived utility with social proof and satiation, logit choice, ratings, the
    accuracy probe's utility over the catalogue), written as straight-line numpy with none of the
    framework (graph, agents, log, ledger, metrics, checks)."""
    w, cfg = market.world, market.config
    cat, pop = w.catalogue, w.population
    alive = cat.alive_ids()
    content = np.ascontiguousarray(cat.content[alive])
    index = faiss.IndexFlatIP(content.shape[1])
    index.add(content)
    friends = w.friend_matrix()
    w.refresh_social()
    recent = w._recent
    pool, k_rank, k = cfg.policy.pool_size, cfg.platform.candidates, cfg.platform.k
    n_explore = int(round(cfg.policy.explore * pool))
    ucfg = cfg.agents.users
    start = time.perf_counter()
    b = len(users)
    history = pop.history[users]
    valid = history >= 0
    profiles = (cat.content[np.maximum(history, 0)] * valid[..., None]).sum(1)
    profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
    cold = ~valid.any(1)  # users with no history search from a popularity-drawn item, as the round does
    weight = 1.0 + cat.interactions[alive]
    profiles[cold] = content[rng.choice(len(alive), int(cold.sum()), p=weight / weight.sum())]
    _, found = index.search(profiles.astype(np.float32), pool - n_explore)
    # the exploration items are distinct and not among the searched ones, as the round's pools are
    pools = np.concatenate([alive[found], alive[draw_excluding(rng, len(alive), found, n_explore)]], 1)
    ranked = np.take_along_axis(pools, np.argsort(-cat.interactions[pools], axis=1, kind="stable")[:, :k_rank], 1)
    hype = np.bitwise_count(cat.features[ranked].astype(np.uint64)) / 4.0
    slates = ranked[:, :k]
    hype = hype[:, :k]
    social = (friends[users] @ recent).tocsr()[np.repeat(np.arange(b), k), slates.ravel()]
    fresh = np.exp2(-(w.round - cat.born[slates]) / ucfg.novelty_halflife)
    utility = (np.einsum("bd,bkd->bk", pop.taste[users], cat.embedding[slates]) + cat.quality[slates]
               + pop.conformity[users, None] * np.log1p(cat.interactions[slates])
               + pop.novelty[users, None] * fresh + pop.social[users, None] * np.asarray(social).reshape(b, k)
               + rng.normal(0, ucfg.utility_noise, (b, k)))
    if ucfg.repeat_penalty > 0:  # satiation: an item of the user's history loses the penalty
        utility -= ucfg.repeat_penalty * (slates[:, :, None] == history[:, None, :]).any(2)
    perceived = utility + pop.trust[users, None] * hype - ucfg.position_bias * np.log2(np.arange(k) + 1.0)
    logits = np.concatenate([perceived, np.full((b, 1), ucfg.outside_utility)], 1) / ucfg.temperature
    choice = np.argmax(logits + rng.gumbel(size=logits.shape), 1)
    clicked = np.minimum(choice, k - 1)
    stars = np.clip(np.rint(3 + 2 * (utility[np.arange(b), clicked] - ucfg.rating_center)), 1, 5)
    probe = users[: min(cfg.run.eval_users, b)]
    full = (pop.taste[probe] @ cat.embedding[alive].T + cat.quality[alive]
            + pop.conformity[probe, None] * np.log1p(cat.interactions[alive], dtype=np.float32)
            + pop.novelty[probe, None] * np.exp2(-(w.round - cat.born[alive]) / ucfg.novelty_halflife).astype(np.float32)
            + pop.social[probe, None] * (friends[probe] @ recent).tocsr()[:, alive].toarray())
    if ucfg.repeat_penalty > 0:  # at the probe users' history entries (a repeated item: once)
        column = np.full(cat.n + 1, -1, np.int64)
        column[alive] = np.arange(len(alive))
        hit = column[np.where(history[: len(probe)] >= 0, history[: len(probe)], cat.n)]
        r, c = np.nonzero(hit >= 0)
        full[r, hit[r, c]] -= np.float32(ucfg.repeat_penalty)
    torch.from_numpy(np.ascontiguousarray(full)).topk(10, dim=1)
    elapsed = time.perf_counter() - start
    assert stars.shape == (b,)
    return elapsed


def search_recall(market: Market, n_users: int, rng: np.random.Generator) -> float:
    """Recall of the exact search pool: for ``n_users`` users with a history, the share of the
    exact inner-product top-n (faiss IndexFlatIP over alive items) that the market's index returns."""
    w, cfg = market.world, market.config.policy
    users = np.flatnonzero(w.population.view("active"))
    profiles, has_history = w.profiles(users)
    pick = rng.permutation(np.flatnonzero(has_history))[:n_users]
    queries = np.ascontiguousarray(profiles[pick], dtype=np.float32)
    content, alive = w.catalogue.content[: w.catalogue.n], w.catalogue.alive_ids()
    n = min(cfg.pool_size, len(alive)) - int(round(cfg.explore * min(cfg.pool_size, len(alive))))
    exact = faiss.IndexFlatIP(content.shape[1])
    exact.add(np.ascontiguousarray(content[alive], dtype=np.float32))
    truth = alive[exact.search(queries, n)[1]]
    found = market.retriever.search(queries, n, content, alive)
    return float(np.mean([len(np.intersect1d(a, b)) / n for a, b in zip(found, truth)]))


def main() -> None:
    allocator.tune()  # as the command line runs (run/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k users, 2k items")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--activity", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                        help="env.retrieval.index of the framework round (the kernels always search exactly)")
    parser.add_argument("--recall-users", type=int, default=2000, help="queries of the recall check")
    args = parser.parse_args()
    if args.quick:
        args.users, args.items = 10_000, 2_000
    config = build_config(load_scenario("cold-start"), [
        f"market.n_users={args.users}", f"market.n_items={args.items}", f"market.n_providers={max(args.items // 20, 1)}",
        f"agents.users.activity={args.activity}", "market.new_items_per_round=0", "market.new_users_per_round=0",
        "policy.name=popularity", "platform.reranker=none", "run.progress=false", f"run.rounds={args.rounds + 2}",
        f"env.retrieval.index={args.index}"])
    market = Market(config)
    for _ in range(2):  # warm-up: first faiss index, first refit, caches
        market.step()
    rng = np.random.default_rng(0)
    round_seconds, kernel_seconds = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        market.step()
        round_seconds.append(time.perf_counter() - started)
        users = np.flatnonzero(market.world.population.view("active"))
        users = users[rng.random(len(users)) < args.activity]
        kernel_seconds.append(kernels(market, users, rng))
    recall = search_recall(market, args.recall_users, rng)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # best of N on both sides (as timeit does): the least disturbed run of each; the medians are
    # printed too, they move with faiss's search time, which varies run to run on a shared VM
    seconds, kernel = float(np.min(round_seconds)), float(np.min(kernel_seconds))
    median_ratio = float(np.median(round_seconds)) / float(np.median(kernel_seconds))
    print(f"users={args.users} items={args.items} active~{args.activity:.0%}: round {seconds:.3f} s, "
          f"kernels {kernel:.3f} s (best of {args.rounds}); ratio of medians {median_ratio:.2f}; "
          f"index {market.retriever.kind}, recall of the exact pool {recall:.3f}; peak memory {peak_gib:.2f} GiB")
    print(json.dumps({"benchmark": "round", "users": args.users, "items": args.items,
                      "seconds_per_round": round(seconds, 4), "kernel_seconds": round(kernel, 4),
                      "overhead_ratio": round(seconds / kernel, 3), "median_ratio": round(median_ratio, 3),
                      "index": market.retriever.kind, "recall": round(recall, 4), "peak_gib": round(peak_gib, 3)}))


if __name__ == "__main__":
    main()
