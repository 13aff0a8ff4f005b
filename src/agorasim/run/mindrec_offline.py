"""MindRec offline on Amazon (``agorasim eval --mindrec``, or ``benchmarks/mindrec_offline.py``).

The arm compares, on the same rows and at the same beam width B:

* **SFT (AR)**: the offline protocol's generative SFT model (a causal LM over the semantic ids),
  ranked by trie-constrained autoregressive beam search;
* **MindRec faithful**: the masked-diffusion model over ``c1 c2 s1..s4`` (a 2-level k-means tree,
  8 x 4, on the same item embeddings, before the *same* semantic ids), decoded by the paper's
  diffusion beam search (per-position token sets: a decoded sequence may be a non-item, which
  then occupies its slot as a miss);
* **MindRec trie**: the same model decoded with ``trie_consistent`` (never a non-item);
* **MindRec left-to-right**: the same model, id positions decoded in order by plain beam search
  (the same model, AR-order decoding: the decoder comparison at equal beams).

The MindRec epoch is chosen on validation NDCG@10 of the trie-consistent decoding. Paired standard
errors are per-row differences against SFT on the same test rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from agorasim.policy.mindrec import MindRecPolicy, kmeans_tree
from agorasim.run.offline import KS, Rows, ranking_metrics

ARMS = ("mindrec_faithful", "mindrec_trie", "mindrec_l2r")


def paired_metric(ranked_a: np.ndarray, ranked_b: np.ndarray, target: np.ndarray, metric: str, k: int
                  ) -> tuple[float, float]:
    """Mean and standard error of the per-row ``metric@k`` (``hr`` or ``ndcg``) difference ``b - a``."""
    def per_row(ranked):
        top = np.asarray(ranked)[:, :k] == target[:, None]
        if metric == "hr":
            return top.any(1).astype(np.float64)
        return (top / np.log2(np.arange(2, top.shape[1] + 2))).max(1, initial=0.0)

    diff = per_row(ranked_b) - per_row(ranked_a)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def build_mindrec(generative, embeddings: np.ndarray, params: dict, seed: int) -> MindRecPolicy:
    """A ``MindRecPolicy`` over the generative policy's semantic ids with an 8 x 4 k-means tree."""
    policy = MindRecPolicy(**params)
    categories = kmeans_tree(embeddings, (8, 4), seed=seed)
    policy.setup(categories, [8, 4], generative.ids, generative.ids.codes, None, seed=seed + 1)
    policy.ready = True
    return policy


def train_mindrec(policy: MindRecPolicy, train: Rows, valid: Rows, epochs: int, eval_every: int, beams: int,
                  seed: int, log) -> dict[str, float]:
    """Masked-diffusion epochs (cosine-free constant lr); keeps the epoch with the best validation
    NDCG@10 of trie-consistent decoding."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=policy.sft_lr)
    best, best_state = {"epoch": 0.0, "valid_ndcg@10": -1.0}, None
    for epoch in range(1, epochs + 1):
        losses = policy.train_epoch(optimizer, train.history, train.target, generator)
        if epoch % eval_every and epoch != epochs:
            continue
        ranked = policy.decode(valid.history, beams, mode="trie").items
        score = ranking_metrics(ranked, valid.target, (10,))["ndcg@10"]
        log(f"mindrec epoch {epoch:3d}  loss {np.mean(losses):.4f}  valid ndcg@10 {score:.4f}")
        if score > best["valid_ndcg@10"]:
            best = {"epoch": float(epoch), "valid_ndcg@10": score}
            best_state = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
    policy.model.load_state_dict(best_state)
    return best


def mindrec_arms(policy: MindRecPolicy, test: Rows, beams: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Rankings of the three decodings and their statistics (invalid share, first filled id position)."""
    ranked, stats = {}, {}
    for arm, mode, order in (("mindrec_faithful", "faithful", "any"), ("mindrec_trie", "trie", "any"),
                             ("mindrec_l2r", "trie", "left_to_right")):
        started = time.perf_counter()
        decoded = policy.decode(test.history, beams, mode=mode, id_order=order)
        ranked[arm] = decoded.items
        real = np.isfinite(decoded.scores)
        stats[f"{arm}/invalid_share"] = float(decoded.invalid.sum() / max(real.sum(), 1))
        stats[f"{arm}/top1_invalid_share"] = float(decoded.invalid[:, 0].mean())
        top = decoded.first_position[:, 0]
        hist = np.bincount(top[top >= 0], minlength=policy.levels + 1)
        for position, count in enumerate(hist):
            stats[f"{arm}/first_filled_{position + 1}"] = float(count / max(hist.sum(), 1))
        stats[f"{arm}/seconds"] = time.perf_counter() - started
    return ranked, stats


def offline_arms(generative, embeddings: np.ndarray, train: Rows, valid: Rows, splits: dict[str, Rows], config,
                 streams, info: dict, log) -> dict[str, dict[str, np.ndarray]]:
    """The MindRec arms inside ``agorasim eval --mindrec``: the offline config's model size, SFT
    epochs, learning rate and beams; rankings per arm and split (statistics of the test split into
    ``info``)."""
    params = config.policy
    policy = build_mindrec(generative, embeddings, dict(hidden=params.hidden, layers=params.layers, heads=params.heads,
                                                        prompt_items=params.prompt_items, max_len=params.max_len,
                                                        sft_lr=params.sft_lr, sft_batch=params.sft_batch,
                                                        beams=config.beams, history_attention=config.mindrec_attention),
                           seed=int(np.random.default_rng(streams[4]).integers(2**31)))
    epochs = config.mindrec_epochs or params.sft_epochs
    best = train_mindrec(policy, train, valid, epochs, config.mindrec_eval_every, config.valid_beams,
                         int(np.random.default_rng(streams[5]).integers(2**31)), log)
    info.update({f"mindrec/{k}": v for k, v in best.items()})
    ranked: dict[str, dict[str, np.ndarray]] = {arm: {} for arm in ARMS}
    for split, rows in splits.items():
        arms, stats = mindrec_arms(policy, rows, config.beams)
        for arm in ARMS:
            ranked[arm][split] = arms[arm]
        if split == "test":
            info.update({k: v for k, v in stats.items() if not k.endswith("seconds")})
    return ranked


def report_table(results: dict[str, dict[str, float]], gains: dict[str, dict[str, tuple[float, float]]],
                 base: str = "sft_ar") -> str:
    """Markdown: HR@K / NDCG@K per model, then paired differences against ``base``."""
    cols = [f"hr@{k}" for k in KS] + [f"ndcg@{k}" for k in KS]
    lines = ["| model | " + " | ".join(c.upper().replace("@", "@") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for model, values in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{values[c]:.4f}" for c in cols) + " |")
    lines += ["", f"| paired vs {base} | " + " | ".join(c.upper() for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for model, by_metric in gains.items():
        lines.append(f"| {model} | " + " | ".join(f"{by_metric[c][0]:+.4f} ± {by_metric[c][1]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def run(out_dir: str | Path, seed: int = 0, train_users: int | None = None, valid_rows: int = 300,
        test_rows: int = 1000, beams: int = 10, sft_epochs: int = 16, mindrec_epochs: int = 16,
        eval_every: int = 4, hidden: int = 128, threads: int = 1, ar: bool = True,
        history_attention: str = "full") -> dict:
    """The comparison end to end on the vendored Industrial_and_Scientific data; writes
    ``mindrec.json`` and ``mindrec.md`` in ``out_dir``. ``ar=False`` skips the SFT (AR) model: the
    MindRec decodings are then compared against its own left-to-right decoding;
    ``history_attention``: MindRec's (``MindRecParams``: full, the paper's, or prefix)."""
    from agorasim.data.amazon import item_embeddings, load_amazon
    from agorasim.policy.threads import torch_threads
    from agorasim.run.offline import Progress, build_generative, load_rows, make_config, rank_generative, train_sft

    log = Progress(True)
    config = make_config(seed, train_users=train_users, valid_rows=valid_rows, test_rows=test_rows, beams=max(beams, 10),
                         valid_beams=max(beams, 10), methods=[], policy={"hidden": hidden, "sft_epochs": sft_epochs,
                                                                         "threads": threads})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads):
        data = load_amazon(None)
        streams = np.random.SeedSequence(seed).spawn(6)
        rng_data, rng_ids, rng_sft = (np.random.default_rng(s) for s in streams[:3])
        train, valid, test = load_rows(data, config, rng_data)
        log(f"mindrec eval: {len(train)} training pairs, {len(valid)} valid, {len(test)} test rows, {data.n_items} items")
        embeddings = item_embeddings(data, dim=config.embed_dim)
        generative = build_generative(embeddings, config, rng_ids, data.titles)
        ranked, best_sft, ar_seconds = {}, {"epoch": 0.0}, 0.0
        if ar:
            best_sft = train_sft(generative, train, valid, config, rng_sft, log)
            started = time.perf_counter()
            ranked = {"sft_ar": rank_generative(generative, test, beams)}
            ar_seconds = time.perf_counter() - started
        mindrec = build_mindrec(generative, embeddings, dict(hidden=hidden, layers=generative.layers,
                                                             heads=generative.heads, prompt_items=config.policy.prompt_items,
                                                             max_len=config.policy.max_len, sft_lr=config.policy.sft_lr,
                                                             sft_batch=config.policy.sft_batch, beams=beams,
                                                             history_attention=history_attention),
                                seed=int(np.random.default_rng(streams[4]).integers(2**31)))
        best_mindrec = train_mindrec(mindrec, train, valid, mindrec_epochs, eval_every, beams,
                                     int(np.random.default_rng(streams[5]).integers(2**31)), log)
        arms, stats = mindrec_arms(mindrec, test, beams)
        ranked.update(arms)
    results = {model: ranking_metrics(r, test.target) for model, r in ranked.items()}
    base = "sft_ar" if ar else "mindrec_l2r"
    gains = {model: {f"{m}@{k}": paired_metric(ranked[base], r, test.target, m, k) for m in ("hr", "ndcg")
                     for k in KS} for model, r in ranked.items() if model != base}
    info = {"train_pairs": len(train), "valid_rows": len(valid), "test_rows": len(test), "beams": beams,
            "sft_epoch": best_sft["epoch"], "mindrec_epoch": best_mindrec["epoch"], "mindrec_epochs": mindrec_epochs,
            "history_attention": history_attention, "sft_ar/seconds": ar_seconds,
            **stats}
    table = report_table(results, gains, base)
    (out / "mindrec.json").write_text(json.dumps({"results": results, "gains": gains, "info": info}, indent=1))
    (out / "mindrec.md").write_text(table + "\n\n" + json.dumps(info, indent=1) + "\n")
    log("\n" + table + "\n" + json.dumps(info, indent=1))
    return {"results": results, "gains": gains, "info": info}
