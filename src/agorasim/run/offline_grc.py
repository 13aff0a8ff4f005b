"""The GRC arm of the offline protocol (``agorasim eval --grc``; ALGORITHMS.md section 6).

From the selected SFT model, with the same rows and beams as the other arms:

1. **Supervised GRC stage**: triples from the SFT model's top ``triple_beams`` beams on every
   training pair, ``grc_sft_epochs`` epochs of ``L_MLE + lambda_rc L_rc``; the epoch with the best
   validation NDCG@10 of the corrected (EGRS) ranking is kept.
2. **RL stage**: ``grpo_steps`` steps of GRC's trajectory GRPO (``rl.grc.GRCMethod``) on
   ``rl.Trainer`` with the offline rl section of the other methods (G top beams as drafts,
   ``grpo_prompts`` prompts, lr, KL weight, dynamic sampling); R is the prefix match (or hit) with
   the held-out next item; the step with the best validation NDCG@10 of the corrected ranking is
   kept (the supervised stage itself is not a candidate, as for sft+<method>).
3. **Report**: ``sft+grc-draft`` (the first ``beams`` drafts of the EGRS decoding) and ``sft+grc``
   (the corrected, deduplicated list) on test; paired differences against plain SFT for every
   HR@K and NDCG@K; the gain of each corrected beam by its entropy rank (rank 1 = the highest
   reflection entropy among the top ``draft_beams`` drafts); both stages' numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from agorasim.metrics.accuracy import dcg_weights
from agorasim.policy.grc import GRCSettings, supervised_stage
from agorasim.rl.grc import PLACEMENTS, EGRSResult, GRCMethod, apply_corrections, egrs_decode, first_wrong
from agorasim.rl.judges import TargetJudge
from agorasim.rl.trainer import Prompts, Trainer

ARMS = ("sft+grc-draft", "sft+grc")


def grc_method(rl, settings: GRCSettings, levels: int) -> GRCMethod:
    """GRC's method on an rl section (its reflection tokens go into the shared vocabulary)."""
    return GRCMethod(rl, settings, levels + 1)


def rank_grc(policy, history: np.ndarray, beams: int, settings: GRCSettings) -> EGRSResult:
    """The EGRS decoding of ``history`` rows with ``beams`` listed items (shared-prompt cache)."""
    return egrs_decode(policy, history, beams, settings.draft_beams, settings.correct_top, shared_prompt=True,
                       placement=settings.placement)


def per_row(ranked: np.ndarray, target: np.ndarray, metric: str) -> np.ndarray:
    """``(N,)`` one row's ``hr@k`` (0/1) or ``ndcg@k`` (``1/log2(rank+2)``) of the target."""
    name, k = metric.split("@")
    top = np.asarray(ranked)[:, :int(k)]
    found = top == target[:, None]
    if name == "hr":
        return found.any(1).astype(np.float64)
    return (found * dcg_weights(top.shape[1])).max(1, initial=0.0)


def paired(ranked_a: np.ndarray, ranked_b: np.ndarray, target: np.ndarray, metrics) -> dict[str, tuple[float, float]]:
    """``metric -> (mean, standard error)`` of the per-row difference ``b - a`` on the same rows."""
    out = {}
    for metric in metrics:
        diff = per_row(ranked_b, target, metric) - per_row(ranked_a, target, metric)
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        out[metric] = (float(diff.mean()), se)
    return out


def entropy_rank_gains(result: EGRSResult, target: np.ndarray, tokens: np.ndarray) -> list[dict[str, float]]:
    """Per entropy rank j of the corrected drafts (0 = highest entropy): the mean gain of the final
    item over its draft in hit (``hit``: 1[final = target] - 1[draft = target] at that slot) and
    prefix match (``prefix``, shared leading tokens / D); ``list_hit``, the beam's own change to
    whether the list holds the target (+1 when its correction is the target and no draft was,
    -1 when its draft was the target: ``hit`` also counts a correction that repeats a target another
    draft already lists, which the deduplicated list does not gain); the share of drafts really
    changed (``changed``: a correction exists), the share whose draft was the target
    (``draft_hit``), the mean entropy and the mean draft rank (1-based)."""
    depth = tokens.shape[1]
    drafts = np.take_along_axis(result.drafts, result.columns, 1)
    final = np.where(result.corrected >= 0, result.corrected, drafts)
    target_tokens = tokens[target][:, None, :]

    def prefix(items):
        return np.where(items >= 0, (first_wrong(tokens[np.maximum(items, 0)], target_tokens) - 1) / depth, 0.0)

    hit_final, hit_draft = (final == target[:, None]), (drafts == target[:, None])
    listed = (result.drafts == target[:, None]).any(1, keepdims=True)
    list_gain = (hit_final & ~listed).astype(float) - hit_draft
    entropy = np.take_along_axis(result.entropy, result.columns, 1)
    rows = []
    for j in range(result.columns.shape[1]):
        rows.append({"rank": float(j + 1), "hit": float((hit_final[:, j].astype(float) - hit_draft[:, j]).mean()),
                     "list_hit": float(list_gain[:, j].mean()),
                     "prefix": float((prefix(final[:, j]) - prefix(drafts[:, j])).mean()),
                     "changed": float((result.corrected[:, j] >= 0).mean()),
                     "draft_hit": float(hit_draft[:, j].mean()), "entropy": float(entropy[:, j].mean()),
                     "draft_rank": float(result.columns[:, j].mean() + 1)})
    return rows


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s weights (to restore the selected epoch or step)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def train_grc(policy, train, valid, config, settings: GRCSettings, rl, rng: np.random.Generator,
              generator: torch.Generator, exposure, log, stage_end=None,
              rng_prompts: np.random.Generator | None = None) -> dict[str, float]:
    """Both GRC stages from the current (SFT) model (module docstring); leaves the model at the
    selected RL step (or the selected supervised epoch when ``config.grpo_steps`` is 0).

    Args:
        policy: the offline generative policy (its vocabulary holds the reflection tokens).
        train, valid: ``Rows`` of the protocol.
        config: the ``OfflineConfig``.
        settings: the GRC settings.
        rl: the offline rl section (``offline.rl_config``).
        rng: draws the supervised stage's order.
        stage_end: optional ``callable()`` run after the supervised stage (report it there).
        rng_prompts: draws the RL stage's prompt batches (None: ``rng``).

    Returns:
        The supervised stage's losses and selected epoch, the RL step kept and their validation
        NDCG@10 (``sft_epoch``, ``sft_valid_ndcg@10``, ``step``, ``valid_ndcg@10``, ...).
    """
    def valid_score() -> float:
        ranked = rank_grc(policy, valid.history, config.valid_beams, settings).ranked
        return float(per_row(ranked, valid.target, "ndcg@10").mean())

    best = {"sft_epoch": 0.0, "sft_valid_ndcg@10": -1.0}
    states = {}

    def epoch_end(epoch: int) -> None:
        score = valid_score()
        log(f"grc sft epoch {epoch:3d}  valid ndcg@10 (corrected) {score:.4f}")
        if score > best["sft_valid_ndcg@10"]:
            best.update({"sft_epoch": float(epoch), "sft_valid_ndcg@10": score})
            states["sft"] = snapshot(policy.model)

    stats = supervised_stage(policy, train.history, train.target, settings, config.policy.sft_batch, rng,
                             config.grad_clip, epoch_end)
    policy.model.load_state_dict(states["sft"])
    best.update({k.removeprefix("train/grc_"): v for k, v in stats.items()})
    if stage_end is not None:
        stage_end()
    best.update({"step": 0.0, "valid_ndcg@10": float("nan")})
    if config.grpo_steps == 0:
        return best
    trainer = Trainer(policy, rl, grc_method(rl, settings, policy.levels))
    if rl.beta > 0:
        trainer.begin()  # the KL anchor is the supervised GRC model
    judge = TargetJudge(exposure)
    best["valid_ndcg@10"] = -1.0
    states["rl"] = snapshot(policy.model)
    n_prompts = min(rl.users_per_step, len(train))
    rng_prompts = rng if rng_prompts is None else rng_prompts
    loc_accuracy, corrected = [], []
    for step in range(1, config.grpo_steps + 1):
        batch = train.take(np.sort(rng_prompts.choice(len(train), n_prompts, replace=False)))
        row = trainer.step(Prompts(np.full(len(batch), -1), batch.history, batch.target), judge, generator)
        loc_accuracy.append(row["train/grc/loc_accuracy"])
        corrected.append(row["train/grc/corrected_share"])
        if step % config.grpo_eval_every == 0 or step == config.grpo_steps:
            score = valid_score()
            log(f"grc step {step:4d}  reward {row['train/reward']:.3f}  loc accuracy {loc_accuracy[-1]:.3f}  "
                f"corrected {corrected[-1]:.3f}  valid ndcg@10 (corrected) {score:.4f}")
            if score > best["valid_ndcg@10"]:
                best.update({"step": float(step), "valid_ndcg@10": score})
                states["rl"] = snapshot(policy.model)
    policy.model.load_state_dict(states["rl"])
    best["rl_loc_accuracy"] = float(np.nanmean(loc_accuracy))
    best["rl_corrected_share"] = float(np.mean(corrected))
    return best


def grc_report(stages: dict[str, EGRSResult], ranked_sft: np.ndarray, ranked_grpo: dict[str, np.ndarray],
               target: np.ndarray, tokens: np.ndarray, info: dict[str, float], settings: GRCSettings,
               metrics) -> str:
    """The GRC section of ``offline.md``: paired differences against plain SFT, the draft-to-final
    check, and the gain per corrected beam by entropy rank, for each stage."""
    lines = ["", "## GRC (generation, reflection, correction) with EGRS", "",
             f"Same test rows and {ranked_sft.shape[1]} listed items for every row. EGRS: the reflection entropy of "
             f"the top {settings.draft_beams} drafts, the {settings.correct_top} highest corrected (greedy "
             "reflection and correction; replace = in the draft's slot, after = right after the kept draft), the "
             "list deduplicated. Paired difference against plain SFT "
             "(mean, standard error over the test rows):", "",
             "| model | " + " | ".join(m.replace("hr", "HR").replace("ndcg", "NDCG") for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 1)]
    compared = dict(ranked_grpo)
    other = next(p for p in PLACEMENTS if p != settings.placement)
    for stage, result in stages.items():
        compared[f"GRC {stage}, draft"] = result.drafts
        compared[f"GRC {stage}, corrected ({settings.placement})"] = result.ranked
        # the other placement of the same corrections (serving-only: no model call; its list is cut
        # from the first n drafts, so it can differ from a served one below rank n - budget)
        compared[f"GRC {stage}, corrected ({other})"] = apply_corrections(result.drafts, result.columns,
                                                                          result.corrected, other)
    for name, ranked in compared.items():
        diffs = paired(ranked_sft, ranked, target, metrics)
        lines.append(f"| {name} | " + " | ".join(f"{d:+.4f} ({se:.4f})" for d, se in diffs.values()) + " |")
    lines += ["", "Corrected against draft of the same GRC model (paired):", ""]
    for stage, result in stages.items():
        diffs = paired(result.drafts, result.ranked, target, ("hr@1", "hr@10", "ndcg@10"))
        lines.append(f"- {stage}: " + ", ".join(f"{m} {d:+.4f} ({se:.4f})" for m, (d, se) in diffs.items()))
    lines += ["", "Gain of each corrected beam over its draft, by entropy rank (1 = highest reflection entropy; "
              "hit and prefix match with the target, means over the test rows):", "",
              "| stage | entropy rank | mean entropy | mean draft rank | corrected share | draft was the target | "
              "hit gain | list hit gain | prefix gain |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, result in stages.items():
        for row in entropy_rank_gains(result, target, tokens):
            lines.append(f"| {stage} | {row['rank']:.0f} | {row['entropy']:.3f} | {row['draft_rank']:.2f} | "
                         f"{row['changed']:.3f} | {row['draft_hit']:.4f} | {row['hit']:+.4f} | {row['list_hit']:+.4f} | "
                         f"{row['prefix']:+.4f} |")
    lines += ["", "Stages: supervised epoch {:.0f} of {} (valid NDCG@10 corrected {:.4f}; greedy reflection = l* on "
              "{:.1%} of the training triples after the last epoch), RL step {:.0f} (valid NDCG@10 corrected {:.4f}).".format(
                  info["sft+grc/sft_epoch"], settings.grc_sft_epochs, info["sft+grc/sft_valid_ndcg@10"],
                  info["sft+grc/reflection_accuracy"], info["sft+grc/step"], info["sft+grc/valid_ndcg@10"]), ""]
    return "\n".join(lines)


def run_arm(policy, sft_state: dict, train, valid, splits: dict, config, streams, exposure, ranked_sft: dict,
            ranked_methods: dict[str, np.ndarray], report, info: dict[str, float], log) -> str:
    """The GRC arm inside ``offline._evaluate``: both stages from the selected SFT model, the two
    reported models (``report``), their paired gains (``info``) and the GRC section of offline.md.

    The RL stage replays the methods' prompt stream and torch generator (``streams[3]``,
    ``streams[5]``); the supervised stage draws its order from a seventh stream of the run's seed.
    """
    from agorasim.run.offline import METRICS, paired_difference, rl_config

    settings = config.grc
    policy.model.load_state_dict(sft_state)
    test = splits["test"]
    stages: dict[str, EGRSResult] = {}

    def stage_end() -> None:
        stages["supervised"] = rank_grc(policy, test.history, config.beams, settings)
        diff = paired(ranked_sft["test"], stages["supervised"].ranked, test.target, ("ndcg@10",))["ndcg@10"]
        log(f"grc supervised stage: test ndcg@10 {diff[0]:+.4f} +- {diff[1]:.4f} over SFT (corrected)")

    rng_sft = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(7)[6])
    generator = torch.Generator().manual_seed(int(np.random.default_rng(streams[5]).integers(2**31)))
    rl = rl_config(config, "grpo")
    best = train_grc(policy, train, valid, config, settings, rl, rng_sft, generator, exposure, log, stage_end,
                     rng_prompts=np.random.default_rng(streams[3]))
    info.update({f"sft+grc/{k}": v for k, v in best.items()})
    final = {split: rank_grc(policy, rows.history, config.beams, settings) for split, rows in splits.items()}
    if config.grpo_steps:
        stages["supervised+RL"] = final["test"]
    for key, field in zip(ARMS, ("drafts", "ranked"), strict=True):
        ranked = {split: getattr(result, field) for split, result in final.items()}
        report(key, ranked)
        gain, error = paired_difference(ranked_sft["test"], ranked["test"], test.target)
        info.update({f"{key}/test_ndcg@10_gain": gain, f"{key}/test_ndcg@10_gain_se": error})
        log(f"{key}: test ndcg@10 {gain:+.4f} +- {error:.4f} over SFT")
    return grc_report(stages, ranked_sft["test"], ranked_methods, test.target, policy.tokens, info, settings, METRICS)
