"""Offline protocol on Amazon next-item data (``agorasim eval``): SASRec, SFT and SFT+GRPO.

The protocol of ReRe (arXiv 2510.12211) and MiniOneRec (arXiv 2510.24431) on the shipped
Industrial_and_Scientific split, at laptop scale:

1. **Data.** Training pairs are ``train_pairs(data)``: every prefix of each valid user's earliest
   history predicts the next item. No validation or test target is trained on. The full training
   split of the papers is not shipped, so our models see far fewer pairs than the published ones.
2. **Semantic ids.** Item titles are embedded (all-MiniLM-L6-v2, PCA to ``embed_dim``) and
   quantised by residual k-means into ``levels`` codes plus a de-duplication code
   (``policy/semantic_ids.py``).
3. **SFT.** A tiny Qwen2 LM (``GenerativePolicy``'s model) learns next-item prediction by token
   cross-entropy on the target's codes. After every epoch it is scored on validation rows (predict
   ``target`` from ``history``) by constrained beam search; the epoch with the best NDCG@10 is kept.
4. **SFT+GRPO.** From the kept SFT model: GRPO steps on training prompts. The group is the top-G
   constrained beams, the reward ReRe's ``rere_rank`` against the held-out next item (hit 1, rank
   penalty for wrong beams when the target is in the group), advantages by ``rl.combine``, loss
   ``grpo``. The step with the best validation NDCG@10 is kept (step 0, the SFT model itself, is
   not a candidate: SFT+GRPO is always a GRPO-trained model).
5. **SASRec** on the same training sequences, epoch chosen on validation NDCG@10, scored over all
   items (full ranking).
6. **Report** on test: HR@K and NDCG@K for K in 1, 3, 5, 10. Generative models rank by
   ``beams``-wide constrained beam search (50 in the papers); a target outside the beams is a
   miss. No item is masked out of any ranking (a user may buy an item again).

Same seed, same numbers: one ``numpy`` ``SeedSequence`` per run, spawned per part; every torch
random draw comes from a ``torch.Generator`` seeded from it, and model initialisation forks
torch's global RNG (``build_model``).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agorasim.data.amazon import HISTORY_LEN, AmazonData, item_embeddings, load_amazon, train_pairs
from agorasim.errors import UserInputError
from agorasim.metrics import exposure as exposure_metrics
from agorasim.metrics.accuracy import dcg_weights, hr_at_k, ndcg_next_item_at_k
from agorasim.policy.generative import GenerativePolicy
from agorasim.policy.grc import GRCSettings
from agorasim.policy.params import GenerativeParams
from agorasim.policy.sasrec import SASRec, SASRecPolicy, next_item_windows, torch_threads
from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens
from agorasim.policy.trie import CatalogueTrie
from agorasim.rl.judges import TargetJudge
from agorasim.rl.sft import sft_epoch
from agorasim.rl.trainer import Prompts, Trainer

KS = (1, 3, 5, 10)
BASE_MODELS = ("sasrec", "sft")
METRICS = tuple(f"{name}@{k}" for name in ("hr", "ndcg") for k in KS)
EXPOSURE_METRICS = ("coverage@10", "gini@10", "dgu@10", "mgu@10")
DEFAULT_OUT = Path("runs") / "offline"
PUBLISHED_FILE = "published.yaml"  # beside info.txt: figures published for that data set


def published_figures(source: Path) -> tuple[str, dict[str, dict[str, float]]]:
    """(note, model -> metric -> value) from ``published.yaml`` in the data folder; ("", {}) when
    the folder has none, so published figures are only ever shown beside the data they belong to.

    Raises:
        UserInputError: the file exists but is not a mapping of models to metric values.
    """
    import yaml

    path = Path(source) / PUBLISHED_FILE
    if not path.is_file():
        return "", {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        models = {str(m): {str(k): float(v) for k, v in figures.items()} for m, figures in data["models"].items()}
        return str(data.get("note", "published")), models
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserInputError(f"{path}: expected 'models: {{name: {{ndcg@10: value, ...}}}}' ({type(error).__name__})") from None


_SELECT_ON = "ndcg@10"  # validation metric that picks epochs and steps


class OfflineConfig(BaseModel):
    """Every knob of the offline protocol; ``quick_config`` shrinks it for tests."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, ge=0, description="seed of the run's numpy SeedSequence")
    train_users: int | None = Field(
        None, ge=1, description="users whose training pairs are used (None: all)")
    valid_rows: int | None = Field(
        None, ge=1, description="validation rows drawn for model selection (None: all)")
    test_rows: int | None = Field(None, ge=1, description="test rows drawn for the report (None: all)")
    embed_dim: int = Field(32, ge=2, le=384, description="PCA dimension of the title embeddings")
    # -- the generative policy: the market's own typed parameters, offline defaults -------------------
    policy: GenerativeParams = Field(
        default_factory=lambda: offline_policy(), description="the generative policy's parameters "
        "(GenerativeParams, as policy.params in the market: semantic ids, LM, SFT), with the offline defaults "
        f"codebook_size 64 (64^3 paths for 3.7k items keep most codes in use), hidden 128, sft_epochs 16 and a "
        f"{HISTORY_LEN}-item prompt; pretrained/title_tokens start it from SmolLM2 with ReRe's title prompts")
    sft_micro_batch: int | None = Field(
        None, ge=1, description="pairs per forward/backward within an SFT step (gradient accumulation for a "
        "pretrained model; None: the policy's policy.sft_micro_batch, which is the whole step, or 16 pairs "
        "with pretrained)")
    sft_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="SFT learning rate: constant, or one epoch of linear warm-up then "
        "cosine decay to 0 at the last epoch")
    valid_beams: int = Field(
        20, ge=10, description="beams when scoring validation NDCG@10 for selection (>= 10)")
    # -- in-loop methods (rl/) ------------------------------------------------------------------
    methods: list[str] = Field(
        default_factory=lambda: ["grpo"], description="training methods run from the selected SFT model "
        "(rl.method names), each reported as sft+<method>")
    rl: dict[str, Any] = Field(
        default_factory=dict, description="further rl config fields for the methods (e.g. a method's section: "
        "{ugr: {alpha_min: 0.1}}); group size, prompts, lr and KL weight come from the fields below")
    grpo_steps: int = Field(50, ge=0, description="training steps after SFT (0: sft+<method> = the SFT model)")
    grpo_prompts: int = Field(
        256, ge=1, description="training prompts rolled out per step; groups without the target "
        "(all rewards 0, advantage 0) are dropped before the update, as DAPO's dynamic sampling")
    group_size: int = Field(16, ge=2, description="G: top-G constrained beams per prompt (ReRe)")
    grpo_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the methods")
    grpo_beta: float = Field(
        0.05, ge=0, description="weight of the k3 KL to the selected SFT model (keeps the small-data "
        "policy near it)")
    grpo_eval_every: int = Field(10, ge=1, description="training steps between validation scores")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm (SFT and GRPO)")
    grc: GRCSettings | None = Field(
        None, description="the GRC arm's settings (policy.grc.GRCSettings; run/offline_grc.py), reported as "
        "sft+grc-draft and sft+grc; None: no GRC arm (--grc: task_reward prefix, the other defaults)")
    # -- SASRec ---------------------------------------------------------------------------------
    sasrec_dim: int = Field(64, ge=2, description="SASRec embedding width")
    sasrec_epochs: int = Field(200, ge=1, description="SASRec epochs over the training windows")
    sasrec_lr: float = Field(2e-3, gt=0, description="SASRec Adam learning rate")
    sasrec_dropout: float = Field(0.2, ge=0, lt=1, description="SASRec dropout in training")
    sasrec_eval_every: int = Field(10, ge=1, description="SASRec epochs between validation scores")
    # -- report ---------------------------------------------------------------------------------
    beams: int = Field(50, ge=10, description="beams of the reported generative rankings (>= 10)")
    mindrec: bool = Field(
        False, description="also train MindRec (policy/mindrec.py: 8x4 k-means category tree before the same "
        "semantic ids, masked diffusion) and report it decoded paper-faithfully, trie-consistently and left to "
        "right at the same beams (run/mindrec_offline.py)")
    mindrec_attention: Literal["full", "prefix"] = Field(
        "full", description="MindRec's history_attention: full (the paper's) or prefix (a deviation: the history's "
        "keys and values computed once per prompt, decoding about 12x faster)")
    mindrec_epochs: int | None = Field(None, ge=1, description="MindRec's masked-diffusion epochs (None: policy.sft_epochs)")
    mindrec_eval_every: int = Field(1, ge=1, description="MindRec epochs between validation decodings (the last "
                                    "epoch is always scored)")
    report_valid: bool = Field(
        False, description="also report the selected models on the validation rows, with the test "
        "decoding (costs two more 50-beam passes)")


def offline_policy(**fields) -> GenerativeParams:
    """The offline protocol's generative policy: ``GenerativeParams`` with the offline defaults
    (``policy.threads`` is the whole run's torch threads: the models are tiny, and on 2 shared
    cores the quick run took 51 s with 2 threads, 6 s with 1)."""
    defaults = dict(codebook_size=64, hidden=128, sft_epochs=16, prompt_items=HISTORY_LEN, max_len=HISTORY_LEN)
    return GenerativeParams(**{**defaults, **fields})


def quick_config(seed: int = 0) -> OfflineConfig:
    """A run of well under a minute on a 2-core CPU, for tests: few rows, tiny models."""
    return OfflineConfig(seed=seed, train_users=300, valid_rows=150, test_rows=150,
                         policy=offline_policy(hidden=32, layers=1, heads=2, sft_epochs=4, sft_lr=1e-2, sft_batch=128),
                         grpo_steps=3,
                         grpo_prompts=32, group_size=16, grpo_eval_every=1, sasrec_dim=16, sasrec_epochs=4,
                         sasrec_eval_every=2)


def make_config(seed: int = 0, quick: bool = False, **overrides) -> OfflineConfig:
    """The run's config: defaults (or ``quick_config``) with ``overrides``, validated once.

    Raises:
        UserInputError: an unknown field or a value out of range (one line naming it).
    """
    base = (quick_config(seed) if quick else OfflineConfig(seed=seed)).model_dump()
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(given.get("policy"), dict):  # policy fields are merged into the base policy's
        given["policy"] = {**base["policy"], **given["policy"]}
    try:
        config = OfflineConfig.model_validate({**base, **given})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            fields = GenerativeParams.model_fields if first["loc"][0] == "policy" else OfflineConfig.model_fields
            raise UserInputError(f"eval: unknown setting '{where}': allowed: {', '.join(fields)}") from None
        raise UserInputError(f"eval {where}: {first['msg']} (got {first.get('input')!r})") from None
    model = config.policy
    if model.hidden % model.heads:
        raise UserInputError(f"eval policy.heads: must divide policy.hidden ({model.hidden}), got {model.heads}")
    for method in config.methods:
        rl_config(config, method)  # an unknown method or a bad rl field fails here, before any work
    if model.title_tokens and not model.pretrained:
        raise UserInputError("eval policy.title_tokens: needs policy.pretrained (a model with a tokenizer)")
    if model.pretrained is not None:
        from agorasim.agents.engines.models import model_dir

        model_dir(model.pretrained, "eval policy.pretrained")  # a missing model: one line now, not after SASRec's training
    return config


def rl_config(config: OfflineConfig, method: str):
    """The ``rl`` section a method trains with offline: ReRe's ``rere_rank`` reward against the
    held-out next item on the top-G beams (the market's mixed group is not the offline protocol),
    DAPO's dynamic sampling (groups without the target have advantage 0 and are dropped), and the
    group size, prompts, lr and KL weight of ``config``.

    Raises:
        UserInputError: an unknown method, or a bad ``config.rl`` field (one line).
    """
    from agorasim.config import RLConfig
    from agorasim.rl.methods import METHODS

    if method not in METHODS:
        raise UserInputError(f"eval --method: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    fields = dict(method=method, group_size=config.group_size, users_per_step=config.grpo_prompts, rollout="beam",
                  lr=config.grpo_lr, beta=config.grpo_beta, rewards={"rere_rank": 1.0}, dynamic_sampling=True,
                  grad_clip=config.grad_clip)
    try:
        return RLConfig.model_validate({**fields, **config.rl})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserInputError(f"eval rl.{where}: {first['msg']} (got {first.get('input')!r})") from None


def model_names(config: OfflineConfig) -> tuple[str, ...]:
    """Reported models: SASRec, SFT, then ``sft+<method>`` for each method."""
    from agorasim.run.mindrec_offline import ARMS as MINDREC_ARMS
    from agorasim.run.offline_grc import ARMS as GRC_ARMS

    return (BASE_MODELS + tuple(f"sft+{m}" for m in config.methods) + (GRC_ARMS if config.grc is not None else ())
            + (MINDREC_ARMS if config.mindrec else ()))


# -- metrics -----------------------------------------------------------------------------------------
def ranking_metrics(ranked: np.ndarray, target: np.ndarray, ks=KS) -> dict[str, float]:
    """HR@K and NDCG@K of rankings against one held-out item per row.

    Args:
        ranked: ``(B, K')`` item ids, best first, ``-1`` for an empty slot; a target not in the
            row (e.g. outside the beams) is a miss at every K.
        target: ``(B,)`` the next item of each row.
        ks: Cut-offs.

    Returns:
        ``{"hr@K": ..., "ndcg@K": ...}`` for every K, HR first.
    """
    out = {f"hr@{k}": hr_at_k(ranked, target, k) for k in ks}
    out.update({f"ndcg@{k}": ndcg_next_item_at_k(ranked, target, k) for k in ks})
    return out


def paired_difference(ranked_a: np.ndarray, ranked_b: np.ndarray, target: np.ndarray, k: int = 10
                      ) -> tuple[float, float]:
    """Mean and standard error of the per-row NDCG@k difference ``b - a`` on the same rows.

    Per row NDCG@k is ``1/log2(rank+2)`` for the target at 0-based ``rank < k``, else 0; the
    standard error is ``std(diff, ddof=1) / sqrt(N)`` (a paired comparison: both models are
    scored on the same rows, so row difficulty cancels).
    """
    def per_row(ranked: np.ndarray) -> np.ndarray:
        top = np.asarray(ranked)[:, :k]
        return ((top == target[:, None]) * dcg_weights(top.shape[1])).max(1, initial=0.0)

    diff = per_row(ranked_b) - per_row(ranked_a)
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else 0.0, float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


# -- data -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """Next-item samples: ``history`` (N, 10) -1 left-padded, most recent last; ``target`` (N,)."""

    history: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(self.history[index], self.target[index])


def _pair_users(history: np.ndarray) -> np.ndarray:
    """User index (0, 1, ...) of each ``train_pairs`` row: a user's pairs start with a one-item
    history (``train_pairs`` lists users one after another, positions in time order)."""
    return np.cumsum((history >= 0).sum(1) == 1) - 1


def training_windows(train: Rows, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec's training windows (inputs, next items) from the users' training pairs.

    A user's sequence is the first item of their first pair followed by the targets of all their
    pairs, so each transition is trained on once (the pairs themselves overlap).
    """
    users = _pair_users(train.history)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    first_items = train.history[starts, -1]
    seq_users = np.concatenate([users[starts], users])
    seq_items = np.concatenate([first_items, train.target])
    # per user: the first item, then the targets in time order
    first = np.r_[np.zeros(len(starts), np.int64), np.ones(len(users), np.int64)]
    order = np.lexsort((np.arange(len(seq_users)), first, seq_users))
    return next_item_windows(seq_users[order], seq_items[order], max_len)


def load_rows(data: AmazonData, config: OfflineConfig, rng: np.random.Generator) -> tuple[Rows, Rows, Rows]:
    """Training pairs, validation and test rows, each subsampled when the config asks."""
    history, target = train_pairs(data)
    if len(target) == 0:
        raise UserInputError(f"eval --data {data.source}: no training pairs (no valid.csv history "
                             "has two or more items)")
    train = Rows(history, target)
    if config.train_users is not None:
        users = _pair_users(history)
        n_users = users[-1] + 1
        if config.train_users < n_users:
            keep = np.sort(rng.choice(n_users, config.train_users, replace=False))
            train = train.take(np.flatnonzero(np.isin(users, keep)))
    splits = []
    for split, limit in ((data.valid, config.valid_rows), (data.test, config.test_rows)):
        rows = Rows(split.history, split.target)
        if limit is not None and limit < len(rows):
            rows = rows.take(np.sort(rng.choice(len(rows), limit, replace=False)))
        splits.append(rows)
    return train, splits[0], splits[1]


# -- generative model -----------------------------------------------------------------------------------
def build_generative(embeddings: np.ndarray, config: OfflineConfig, rng: np.random.Generator,
                     titles: list[str] | None = None) -> GenerativePolicy:
    """A ``GenerativePolicy`` with semantic ids, trie and an untrained LM for a fixed catalogue."""
    params = config.policy
    policy = GenerativePolicy(**params.model_dump())
    policy.ids = SemanticIds(levels=params.levels, codebook_size=min(params.codebook_size, len(embeddings)))
    try:
        codes = policy.ids.fit(embeddings, seed=int(rng.integers(2**31)))
    except ValueError as error:  # too many identical titles for the codebook: a setting to change
        raise UserInputError(f"eval policy.codebook_size: {error}") from None
    policy.load_tokenizer()
    policy.tokens = codes_to_tokens(codes, policy.ids.level_sizes, policy.first_code)
    policy.add_titles(titles)
    policy.trie = CatalogueTrie(codes, policy.ids.level_sizes, policy.first_code)
    # the vocabulary holds every method's special tokens (none for grpo, so its model is unchanged)
    from agorasim.rl.methods import make_method

    methods = [make_method(rl_config(config, m)) for m in config.methods]
    if config.grc is not None:  # its reflection tokens
        from agorasim.run.offline_grc import grc_method

        methods.append(grc_method(rl_config(config, "grpo"), config.grc, params.levels))
    policy.build_lm(methods, seed=int(rng.integers(2**31)))
    policy.ready = True
    return policy


def rank_generative(policy: GenerativePolicy, rows: Rows, beams: int) -> np.ndarray:
    """``(N, beams)`` items by constrained beam search, best first.

    Always in the trie's shared-prompt layout: for this model (42-token prompts) it was 3x faster
    at 50 beams than the expanded layout the trie picks by default for wide beams (1 CPU thread,
    1,024 prompts: 3.9 s against 11.3 s), and it gives the same beams.
    """
    items, _ = policy.beam_search(rows.history, beams, shared_prompt=True)
    return items.reshape(len(rows), beams)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule: str) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based)."""
    if schedule == "constant":
        return 1.0
    if step < steps_per_epoch:  # linear warm-up over the first epoch
        return (step + 1) / steps_per_epoch
    total = max(1, steps_per_epoch * (epochs - 1))
    progress = min(1.0, (step - steps_per_epoch) / total)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Progress:
    """The eval's log lines (seconds since the start first) and its progress bars over SASRec and
    SFT epochs and method steps (tqdm on stderr, with rate and ETA); ``enabled=False`` silences both."""

    def __init__(self, enabled: bool = True, started: float | None = None):
        self.enabled = enabled
        self.started = time.perf_counter() if started is None else started

    def __call__(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(f"[{time.perf_counter() - self.started:6.1f} s] {message}")

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="", leave=False, disable=not self.enabled, dynamic_ncols=True)


def train_sft(policy: GenerativePolicy, train: Rows, valid: Rows, config: OfflineConfig,
              rng: np.random.Generator, log: Progress) -> dict[str, float]:
    """SFT epochs; leaves the model at the epoch with the best validation NDCG@10.

    Returns:
        ``epoch`` (1-based) kept, its validation NDCG@10 and its mean training loss.
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.policy.sft_lr)
    steps_per_epoch = -(-len(train) // config.policy.sft_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, steps_per_epoch, config.policy.sft_epochs, config.sft_schedule))
    best = {"epoch": 0.0, "valid_ndcg@10": -1.0, "loss": float("nan")}
    best_state = _snapshot(policy.model)
    bar = log.bar(config.policy.sft_epochs, "sft epochs")
    for epoch in range(1, config.policy.sft_epochs + 1):
        losses = sft_epoch(policy, optimizer, train.history, train.target, config.policy.sft_batch, generator,
                           config.grad_clip, scheduler, config.sft_micro_batch or policy.sft_micro_batch)
        bar.update(1)
        score = ranking_metrics(rank_generative(policy, valid, config.valid_beams), valid.target, (10,))
        log(f"sft epoch {epoch:3d}  loss {np.mean(losses):.4f}  valid ndcg@10 {score[_SELECT_ON]:.4f}")
        if score[_SELECT_ON] > best["valid_ndcg@10"]:
            best = {"epoch": float(epoch), "valid_ndcg@10": score[_SELECT_ON], "loss": float(np.mean(losses))}
            best_state = _snapshot(policy.model)
    bar.close()
    policy.model.load_state_dict(best_state)
    return best


def train_method(policy: GenerativePolicy, method: str, train: Rows, valid: Rows, config: OfflineConfig,
                 rng: np.random.Generator, generator: torch.Generator, exposure,
                 log: Progress) -> dict[str, float]:
    """``grpo_steps`` steps of ``method`` (``rl.Trainer``, the loop the market uses) from the current
    (SFT) model; leaves the model at the step with the best validation NDCG@10.

    Each step rolls out on ``grpo_prompts`` training prompts drawn by ``rng``; the judge is the
    held-out next item (``TargetJudge``). Step 0, the SFT model itself, is not a candidate:
    sft+<method> is always a trained model.

    Returns:
        ``step`` kept (0 when ``grpo_steps`` is 0), its validation NDCG@10, the mean share of
        prompts whose group held the target.
    """
    if config.grpo_steps == 0:
        return {"step": 0.0, "valid_ndcg@10": float("nan"), "group_hit_rate": float("nan")}
    rl = rl_config(config, method)
    trainer = Trainer(policy, rl)
    if rl.beta > 0:
        trainer.begin()  # the KL anchor is the selected SFT model
    judge = TargetJudge(exposure)
    best = {"step": 0.0, "valid_ndcg@10": -1.0}
    best_state = _snapshot(policy.model)
    hit_rates = []
    n_prompts = min(rl.users_per_step, len(train))
    bar = log.bar(config.grpo_steps, f"{method} steps")
    for step in range(1, config.grpo_steps + 1):
        batch = train.take(np.sort(rng.choice(len(train), n_prompts, replace=False)))
        stats = trainer.step(Prompts(np.full(len(batch), -1), batch.history, batch.target), judge, generator)
        bar.update(1)
        hit_rates.append(stats["train/hit_rate"])
        if step % config.grpo_eval_every == 0 or step == config.grpo_steps:
            score = ranking_metrics(rank_generative(policy, valid, config.valid_beams), valid.target, (10,))
            log(f"{method} step {step:4d}  group hit rate {stats['train/hit_rate']:.3f}  "
                f"groups {stats.get('train/groups', float(n_prompts)):.0f}  valid ndcg@10 {score[_SELECT_ON]:.4f}")
            if score[_SELECT_ON] > best["valid_ndcg@10"]:
                best = {"step": float(step), "valid_ndcg@10": score[_SELECT_ON]}
                best_state = _snapshot(policy.model)
    bar.close()
    policy.model.load_state_dict(best_state)
    best["group_hit_rate"] = float(np.mean(hit_rates)) if hit_rates else float("nan")
    return best


# -- SASRec ---------------------------------------------------------------------------------------------
def rank_sasrec(policy: SASRecPolicy, rows: Rows, k: int) -> np.ndarray:
    """``(N, k)`` items by SASRec's score over the whole catalogue (full ranking), best first."""
    history = np.pad(rows.history, ((0, 0), (policy.max_len - rows.history.shape[1], 0)), constant_values=-1)
    history = history[:, -policy.max_len:]
    policy.model.eval()
    with torch.no_grad():
        state = policy.model(torch.from_numpy(history))[:, -1]  # (N, dim)
        scores = state @ policy.model.item_emb.weight.T  # (N, n_items): every item is a candidate
        return scores.topk(k, dim=1).indices.numpy().astype(np.int64)


def train_sasrec(train: Rows, valid: Rows, n_items: int, config: OfflineConfig, rng: np.random.Generator,
                 log: Progress) -> tuple[SASRecPolicy, dict[str, float]]:
    """SASRec on the training sequences, kept at the epoch with the best validation NDCG@10."""
    max_len = train.history.shape[1]
    policy = SASRecPolicy(dim=config.sasrec_dim, n_blocks=2, n_heads=1, max_len=max_len,
                          dropout=config.sasrec_dropout, lr=config.sasrec_lr, epochs=config.sasrec_epochs,
                          batch_size=128, threads=None)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    policy.model = SASRec.build(n_items, policy.dim, policy.n_blocks, policy.n_heads, max_len, generator)
    inputs, targets = (torch.from_numpy(a) for a in training_windows(train, max_len))
    alive = torch.arange(n_items)
    optimizer = torch.optim.Adam(policy.model.parameters(), lr=policy.lr)
    best = {"epoch": 0.0, "valid_ndcg@10": -1.0}
    best_state = _snapshot(policy.model)
    bar = log.bar(config.sasrec_epochs, "sasrec epochs")
    for epoch in range(1, config.sasrec_epochs + 1):
        bar.update(1)
        policy.model.train()
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), policy.batch_size):
            batch = order[start:start + policy.batch_size]
            policy.train_step(inputs[batch], targets[batch], alive, optimizer, generator)
        if epoch % config.sasrec_eval_every == 0 or epoch == config.sasrec_epochs:
            score = ranking_metrics(rank_sasrec(policy, valid, 10), valid.target, (10,))[_SELECT_ON]
            if score > best["valid_ndcg@10"]:
                best = {"epoch": float(epoch), "valid_ndcg@10": score}
                best_state = _snapshot(policy.model)
    bar.close()
    log(f"sasrec: best epoch {best['epoch']:.0f} of {config.sasrec_epochs}  valid ndcg@10 "
        f"{best['valid_ndcg@10']:.4f}  ({len(inputs)} training windows)")
    policy.model.load_state_dict(best_state)
    return policy, best


# -- report ---------------------------------------------------------------------------------------------
def _label(model: str) -> str:
    if model == "sasrec":
        return "SASRec"
    if model == "sft":
        return "SFT (generative)"
    if "+" not in model:
        return model
    return f"SFT+{model.split('+', 1)[1].upper()} (generative)"


def _markdown_table(results: dict[str, dict[str, float]], train_pairs: int, models,
                    published: tuple[str, dict[str, dict[str, float]]] = ("", {})) -> str:
    """Test-split table: our models, then the data's published figures (``-``: not reported)."""
    header = "| model | trained on | " + " | ".join(
        m.replace("hr", "HR").replace("ndcg", "NDCG") for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    ours = f"ours, {train_pairs:,} pairs from valid.csv histories"
    for model in models:
        cells = " | ".join(f"{results[model][m]:.4f}" for m in METRICS)
        lines.append(f"| {_label(model)} | {ours} | {cells} |")
    note, figures_by_model = published
    for model, figures in figures_by_model.items():
        cells = " | ".join(f"{figures[m]:.4f}" if m in figures else "-" for m in METRICS)
        lines.append(f"| {model} | {note} | {cells} |")
    return "\n".join(lines)


def _exposure_table(results: dict[str, dict[str, float]], info: dict[str, float], models) -> str:
    """Exposure of the recommended top-10 lists on test, and each model's NDCG@10 gain over SFT."""
    lines = ["| model | coverage@10 | Gini@10 | DGU (Flower) | MGU (Flower) | NDCG@10 - SFT (paired SE) |",
             "|---|---|---|---|---|---|"]
    for model in models:
        r = results[model]
        gain = (f"{info[f'{model}/test_ndcg@10_gain']:+.4f} ({info[f'{model}/test_ndcg@10_gain_se']:.4f})"
                if f"{model}/test_ndcg@10_gain" in info else "")
        lines.append(f"| {_label(model)} | {r['coverage@10']:.4f} | {r['gini@10']:.4f} | {r['dgu@10']:.4f} | "
                     f"{r['mgu@10']:.4f} | {gain} |")
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict[str, dict[str, dict[str, float]]], info: dict[str, float],
                 config: OfflineConfig, source: Path) -> str:
    """Write ``offline.csv`` (model, split, metric, value) and ``offline.md``; return the table.

    Args:
        results: split -> model -> metric -> value; ``test`` is required.
    """
    models = model_names(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "offline.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "split", "metric", "value"])
        for split, by_model in results.items():
            for model in models:
                for metric in METRICS + EXPOSURE_METRICS:
                    writer.writerow([model, split, metric, f"{by_model[model][metric]:.6f}"])
    test = results["test"]
    published = published_figures(source)
    table = _markdown_table(test, int(info["data/train_pairs"]), models, published)
    trained = []
    for method in config.methods:
        key = f"sft+{method}"
        if config.grpo_steps:
            trained.append(
                f"- SFT+{method.upper()}: step {info[f'{key}/step']:.0f} of {config.grpo_steps}, rere_rank reward, "
                f"G = {config.group_size}, {config.grpo_prompts} prompts per step, lr {config.grpo_lr:g}, "
                f"KL weight {config.grpo_beta:g} (valid NDCG@10 {info[f'{key}/valid_ndcg@10']:.4f}; "
                f"the target was in {info[f'{key}/group_hit_rate']:.1%} of the groups).")
        else:
            trained.append(f"- SFT+{method.upper()}: no training step (grpo_steps = 0), the SFT model.")
    lines = [
        "# Offline evaluation: Amazon Industrial_and_Scientific, next item",
        "",
        f"Data: `{source}`. Test split, {info['data/test_rows']:.0f} rows. Generative models rank by "
        f"{config.beams}-beam constrained decoding (a target outside the beams is a miss); SASRec ranks "
        "all items.",
        "",
        table,
        "",
        f"Ours: trained on {info['data/train_pairs']:,.0f} next-item pairs from the histories of valid.csv "
        "(no validation or test target is trained on)"
        + ("; the published models were trained on the full training split, which is not shipped and is much "
           "larger." if published[1] else f". No published figures for this data (no {PUBLISHED_FILE} in it)."),
        "",
        "Exposure of the recommended top-10 lists (test): coverage of the catalogue, Gini of the items' "
        "recommendation counts (zero-count items included), and Flower's group gaps over 8 equal-count "
        "popularity groups of the training interactions (d_g = share of recommendations in g - share of "
        "interactions in g; DGU = max d - min d, MGU = mean |d|). The gain column is the paired difference "
        "against SFT over the test rows.",
        "",
        _exposure_table(test, info, models),
        "",
        "Model selection on validation NDCG@10 "
        f"({info['data/valid_rows']:.0f} rows, {config.valid_beams} beams for the generative models):",
        f"- SASRec: epoch {info['sasrec/epoch']:.0f} of {config.sasrec_epochs} "
        f"(valid NDCG@10 {info['sasrec/valid_ndcg@10']:.4f}).",
        f"- SFT: epoch {info['sft/epoch']:.0f} of {config.policy.sft_epochs} "
        f"(valid NDCG@10 {info['sft/valid_ndcg@10']:.4f}).",
        *trained,
        "",
        "As measured, one seed, no re-run was picked.",
        "",
        f"Seed {config.seed}; wall time {info['time/seconds']:.0f} s. Settings: "
        + ", ".join(f"{k}={v}" for k, v in config.model_dump().items()) + ".",
        "",
    ]
    (out_dir / "offline.md").write_text("\n".join(lines))
    return table


def list_exposure(ranked: np.ndarray, interactions: np.ndarray, n_items: int, k: int = 10,
                  n_groups: int = 8) -> dict[str, float]:
    """Exposure of recommended top-k lists, as Flower (arXiv 2503.07377) reports it.

    Args:
        ranked: ``(N, >=k)`` recommended items, best first (``-1``: empty slot).
        interactions: ``(n_items,)`` interaction counts in the training data; they define 8
            equal-count popularity groups (``metrics.exposure.popularity_groups``) and each group's
            interaction share.
        n_items: Catalogue size.
        k: List length.
        n_groups: Popularity groups.

    Returns:
        ``coverage@k`` (share of the catalogue recommended at least once), ``gini@k`` (Gini of
        the items' recommendation counts over the whole catalogue), ``dgu@k`` = max_g d_g - min_g
        d_g and ``mgu@k`` = mean_g |d_g|, where d_g = share of recommendations in group g - share
        of interactions in group g (Flower's ``gao`` evaluation).
    """
    top = np.asarray(ranked)[:, :k]
    items = top[top >= 0]
    counts = np.bincount(items, minlength=n_items).astype(np.float64)
    groups = exposure_metrics.popularity_groups(interactions, n_groups)
    rec_share = np.bincount(groups[items], minlength=n_groups) / max(len(items), 1)
    total = interactions.sum()
    inter_share = (np.bincount(groups, weights=interactions, minlength=n_groups) / total if total > 0
                   else np.full(n_groups, 1.0 / n_groups))
    gap = rec_share - inter_share
    return {f"coverage@{k}": float((counts > 0).mean()), f"gini@{k}": exposure_metrics.gini(counts),
            f"dgu@{k}": float(gap.max() - gap.min()), f"mgu@{k}": float(np.abs(gap).mean())}


# -- the protocol ---------------------------------------------------------------------------------------
def evaluate(data_dir: str | Path | None = None, out_dir: str | Path = DEFAULT_OUT, seed: int = 0,
             quick: bool = False, sft_epochs: int | None = None, grpo_steps: int | None = None,
             beams: int = 50, progress: bool = True, **overrides) -> dict[str, float]:
    """Run the offline protocol and write ``out_dir/offline.csv`` and ``out_dir/offline.md``.

    Args:
        data_dir: ReRe/MiniOneRec data folder; None for the vendored Industrial_and_Scientific.
        out_dir: Folder for the report (created).
        seed: Seed of everything (same seed, same numbers).
        quick: A tiny run (subsampled rows, small models, few epochs) for tests.
        sft_epochs: SFT epochs (None: the config default).
        grpo_steps: Training steps of each method (None: the config default).
        beams: Beam width of the reported generative rankings (>= 10).
        progress: Print one line per epoch/evaluation and the final table.
        **overrides: Any other ``OfflineConfig`` field (e.g. ``methods=["grpo", "ugr"]``).

    Returns:
        ``"{model}/{split}/{metric}"`` (models ``sasrec``, ``sft``, ``sft+<method>``; split ``test``,
        and ``valid`` with ``report_valid``; metrics ``hr@K``, ``ndcg@K``, ``coverage@10``,
        ``gini@10``, ``dgu@10``, ``mgu@10``) plus ``info/...`` entries: selected epochs and steps,
        paired gains over SFT, data sizes and ``info/time/seconds``.

    Raises:
        UserInputError: a bad data folder or setting (one line).
    """
    from agorasim.run.preflight import check_output

    started = time.perf_counter()
    if sft_epochs is not None:
        overrides["policy"] = {**(overrides.get("policy") or {}), "sft_epochs": sft_epochs}
    config = make_config(seed, quick, grpo_steps=grpo_steps, beams=beams, **overrides)
    check_output(out_dir, "--out")  # before hours of training, not after

    log = Progress(progress, started)
    with torch_threads(config.policy.threads):
        return _evaluate(data_dir, Path(out_dir), config, log, started)


def _evaluate(data_dir: str | Path | None, out_dir: Path, config: OfflineConfig, log: Progress,
              started: float) -> dict[str, float]:
    data = load_amazon(data_dir)
    if data.n_items < max(KS):
        raise UserInputError(f"--data {data.source}: {data.n_items} items; HR@K and NDCG@K up to K={max(KS)} "
                             f"need at least {max(KS)}")
    # one stream per part; every method replays the same stream (same prompt batches, same draws),
    # so the methods differ only in what they do with them
    streams = np.random.SeedSequence(config.seed).spawn(6)
    rng_data, rng_ids, rng_sft, _, rng_sasrec = (np.random.default_rng(s) for s in streams[:5])
    train, valid, test = load_rows(data, config, rng_data)
    info = {"data/train_pairs": float(len(train)), "data/valid_rows": float(len(valid)),
            "data/test_rows": float(len(test)), "data/items": float(data.n_items)}
    log(f"eval: {len(train)} training pairs, {len(valid)} valid rows, {len(test)} test rows, "
        f"{data.n_items} items")
    embeddings = item_embeddings(data, dim=config.embed_dim)
    splits = {"test": test, **({"valid": valid} if config.report_valid else {})}
    results: dict[str, dict[str, dict[str, float]]] = {split: {} for split in splits}
    interactions = training_interactions(train, data.n_items)

    def report(model: str, ranked: dict[str, np.ndarray]) -> None:
        for split, rows in splits.items():
            results[split][model] = {**ranking_metrics(ranked[split], rows.target),
                                     **list_exposure(ranked[split], interactions, data.n_items)}

    policy, best = train_sasrec(train, valid, data.n_items, config, rng_sasrec, log)
    info.update({f"sasrec/{k}": v for k, v in best.items()})
    report("sasrec", {split: rank_sasrec(policy, rows, max(KS)) for split, rows in splits.items()})

    generative = build_generative(embeddings, config, rng_ids, data.titles)
    info["sft/semantic_id_tokens"] = float(sum(generative.ids.level_sizes))
    best = train_sft(generative, train, valid, config, rng_sft, log)
    info.update({f"sft/{k}": v for k, v in best.items()})
    ranked_sft = {split: rank_generative(generative, rows, config.beams) for split, rows in splits.items()}
    report("sft", ranked_sft)
    log(f"sft: test ndcg@10 {results['test']['sft']['ndcg@10']:.4f}")
    sft_state = _snapshot(generative.model)
    exposure = offline_exposure(interactions)
    if config.mindrec:
        from agorasim.run.mindrec_offline import offline_arms

        for arm, ranked in offline_arms(generative, embeddings, train, valid, splits, config, streams, info, log).items():
            report(arm, ranked)
            gain, error = paired_difference(ranked_sft["test"], ranked["test"], test.target)
            info.update({f"{arm}/test_ndcg@10_gain": gain, f"{arm}/test_ndcg@10_gain_se": error})

    ranked_methods = {}
    for method in config.methods:
        key = f"sft+{method}"
        generative.model.load_state_dict(sft_state)
        generator = torch.Generator().manual_seed(int(np.random.default_rng(streams[5]).integers(2**31)))
        best = train_method(generative, method, train, valid, config, np.random.default_rng(streams[3]), generator,
                            exposure, log)
        info.update({f"{key}/{k}": v for k, v in best.items()})
        ranked = {split: rank_generative(generative, rows, config.beams) for split, rows in splits.items()}
        report(key, ranked)
        ranked_methods[_label(key).split(" ")[0]] = ranked["test"]
        gain, error = paired_difference(ranked_sft["test"], ranked["test"], test.target)
        info.update({f"{key}/test_ndcg@10_gain": gain, f"{key}/test_ndcg@10_gain_se": error})
        log(f"{key}: test ndcg@10 {results['test'][key]['ndcg@10']:.4f} ({gain:+.4f} +- {error:.4f} over SFT)")

    grc_section = ""
    if config.grc is not None:
        from agorasim.run.offline_grc import run_arm

        grc_section = run_arm(generative, sft_state, train, valid, splits, config, streams, exposure, ranked_sft,
                              ranked_methods, report, info, log)
    info["time/seconds"] = time.perf_counter() - started
    table = write_report(out_dir, results, info, config, data.source)
    if grc_section:
        with open(out_dir / "offline.md", "a") as f:
            f.write(grc_section)
    log("test split:\n" + table)
    log(f"report: {out_dir / 'offline.md'}  ({info['time/seconds']:.0f} s)")
    metrics = {f"{model}/{split}/{metric}": value for split, by_model in results.items()
               for model, values in by_model.items() for metric, value in values.items()}
    metrics.update({f"info/{k}": v for k, v in info.items()})
    return metrics


def training_interactions(train: Rows, n_items: int) -> np.ndarray:
    """``(n_items,)`` how often each item occurs in the training sequences (Flower's v_i: counts in
    training histories), each transition counted once."""
    users = _pair_users(train.history)
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    items = np.concatenate([train.history[first, -1], train.target])
    return np.bincount(items[items >= 0], minlength=n_items).astype(np.float64)


def offline_exposure(interactions: np.ndarray, n_groups: int = 8):
    """The platform's exposure state offline: popularity groups of the training counts, the
    interaction share of each group as its current share, a uniform target, counts as exposure."""
    from agorasim.policy.base import ExposureState

    groups = exposure_metrics.popularity_groups(interactions, n_groups)
    total = interactions.sum()
    share = (np.bincount(groups, weights=interactions, minlength=n_groups) / total if total > 0
             else np.full(n_groups, 1.0 / n_groups))
    return ExposureState(groups=groups, share=share, target_share=np.full(n_groups, 1.0 / n_groups),
                         item_exposure=interactions.copy(), interactions=interactions.copy(),
                         alive=np.ones(len(interactions), bool))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line for the CLI's error handler, not argparse's exit
        raise UserInputError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agorasim eval", description="Offline next-item evaluation on Amazon data: SASRec, "
                "generative SFT and SFT+<method>, HR@K/NDCG@K and list exposure on the test split.")
    p.add_argument("--data", help="data folder with info.txt, valid.csv, test.csv (default: the vendored "
                   "Industrial_and_Scientific copy)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny run (under a minute) to check the set-up")
    p.add_argument("--sft-epochs", type=int, help="SFT epochs (default 16)")
    p.add_argument("--grpo-steps", type=int, help="training steps of each method (default 50)")
    p.add_argument("--method", help="comma-separated training methods run from the SFT model (rl.method "
                   "names; default grpo)")
    p.add_argument("--beams", type=int, default=50, help="beams of the generative rankings (default 50)")
    p.add_argument("--mindrec", action="store_true", help="also report MindRec (faithful, trie-consistent, "
                   "left to right) at the same beams")
    p.add_argument("--grc", action="store_true", help="add the GRC arm (sft+grc-draft, sft+grc; prefix-match reward)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="any other protocol setting, dotted, value read as YAML; repeatable (e.g. "
                   "policy.pretrained=smollm2, train_users=500, test_rows=300, sft_micro_batch=16)")
    return p


_FLAGGED = {"seed": "--seed", "grpo_steps": "--grpo-steps", "beams": "--beams", "methods": "--method",
            "mindrec": "--mindrec", "policy.sft_epochs": "--sft-epochs"}


def settings_from(texts: list[str]) -> dict[str, Any]:
    """``--set`` texts as nested ``OfflineConfig`` overrides: ``['policy.pretrained=smollm2']`` ->
    ``{'policy': {'pretrained': 'smollm2'}}``. Names are checked later, with the values
    (``make_config``); a setting that has its own flag must be given by the flag (``grc.*``
    settings go with or without ``--grc``: they add the arm)."""
    from agorasim.config import parse_override

    out: dict[str, Any] = {}
    for text in texts:
        key, value = parse_override(text)
        parts = key.split(".")
        flagged = key if key in _FLAGGED else parts[0]
        if flagged in _FLAGGED:
            raise UserInputError(f"eval --set {key}: use {_FLAGGED[flagged]}")
        if not all(parts):
            raise UserInputError(f"eval --set: expected dotted.key=value, got '{text}'")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"eval --set {key}: '{part}' was set to a value above")
        node[parts[-1]] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """``agorasim eval [--data DIR] [--out DIR] [--seed S] [--quick]``; user errors raise
    ``UserInputError`` for the CLI to print."""
    args = parser().parse_args(argv)
    methods = [m.strip() for m in args.method.split(",") if m.strip()] if args.method else None
    if args.method is not None and not methods:
        raise UserInputError(f"eval --method: expected comma-separated method names, got {args.method!r}")
    settings = settings_from(args.settings)
    grc = settings.pop("grc", None)
    if args.grc:
        grc = {"task_reward": "prefix", **(grc if isinstance(grc, dict) else {})}
    evaluate(data_dir=args.data, out_dir=args.out, seed=args.seed, quick=args.quick, sft_epochs=args.sft_epochs,
             grpo_steps=args.grpo_steps, beams=args.beams, methods=methods, mindrec=args.mindrec or None,
             grc=grc, **settings)
    return 0
