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
import copy
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agorasim.data.amazon import HISTORY_LEN, AmazonData, item_embeddings, load_amazon, train_pairs
from agorasim.errors import UserInputError
from agorasim.metrics.accuracy import dcg_weights, hr_at_k, ndcg_next_item_at_k
from agorasim.policy.generative import FIRST_CODE_TOKEN, GenerativePolicy, build_model
from agorasim.policy.sasrec import SASRec, SASRecPolicy, next_item_windows, torch_threads
from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens
from agorasim.policy.trie import CatalogueTrie, token_logprobs
from agorasim.rl import RewardContext, combine, compute_rewards, policy_loss

KS = (1, 3, 5, 10)
MODELS = ("sasrec", "sft", "sft+grpo")
METRICS = tuple(f"{name}@{k}" for name in ("hr", "ndcg") for k in KS)
DEFAULT_OUT = Path("runs") / "offline"
PUBLISHED_NOTE = "published, trained on the full training split (larger than ours)"
# Test-split figures of the data README (ReRe / MiniOneRec papers), 50-beam constrained decoding
# for the generative models; a missing entry is not reported there.
PUBLISHED: dict[str, dict[str, float]] = {
    "SASRec": {"ndcg@10": 0.0806, "hr@10": 0.1088},
    "TIGER": {"ndcg@10": 0.0908, "hr@10": 0.1321},
    "D3": {"ndcg@10": 0.1082},
    "MiniOneRec": {"ndcg@10": 0.1167, "hr@10": 0.1586},
}
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
    # -- semantic ids and the LM -----------------------------------------------------------------
    embed_dim: int = Field(32, ge=2, le=384, description="PCA dimension of the title embeddings")
    levels: int = Field(3, ge=1, description="residual k-means levels L of the semantic ids")
    codebook_size: int = Field(
        64, ge=2, description="codes per level; 64^3 paths for 3.7k items keep most codes in use")
    hidden: int = Field(128, ge=8, description="LM width (Qwen2 hidden_size)")
    layers: int = Field(2, ge=1, description="LM transformer layers")
    heads: int = Field(4, ge=1, description="LM attention heads (must divide hidden)")
    # -- SFT ------------------------------------------------------------------------------------
    sft_epochs: int = Field(16, ge=1, description="SFT epochs over the training pairs")
    sft_lr: float = Field(3e-3, gt=0, description="AdamW (peak) learning rate of SFT")
    sft_batch: int = Field(256, ge=1, description="training pairs per SFT step")
    sft_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="SFT learning rate: constant, or one epoch of linear warm-up then "
        "cosine decay to 0 at the last epoch")
    valid_beams: int = Field(
        20, ge=10, description="beams when scoring validation NDCG@10 for selection (>= 10)")
    # -- GRPO -----------------------------------------------------------------------------------
    grpo_steps: int = Field(50, ge=0, description="GRPO steps after SFT (0: SFT+GRPO = skipped)")
    grpo_prompts: int = Field(
        256, ge=1, description="training prompts rolled out per step; groups without the target "
        "(all rewards 0, advantage 0) are dropped before the update, as DAPO's dynamic sampling")
    group_size: int = Field(16, ge=2, description="G: top-G constrained beams per prompt (ReRe)")
    grpo_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of GRPO")
    grpo_beta: float = Field(
        0.05, ge=0, description="weight of the k3 KL to the selected SFT model (keeps the small-data "
        "policy near it)")
    grpo_eval_every: int = Field(10, ge=1, description="GRPO steps between validation scores")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm (SFT and GRPO)")
    # -- SASRec ---------------------------------------------------------------------------------
    sasrec_dim: int = Field(64, ge=2, description="SASRec embedding width")
    sasrec_epochs: int = Field(200, ge=1, description="SASRec epochs over the training windows")
    sasrec_lr: float = Field(2e-3, gt=0, description="SASRec Adam learning rate")
    sasrec_dropout: float = Field(0.2, ge=0, lt=1, description="SASRec dropout in training")
    sasrec_eval_every: int = Field(10, ge=1, description="SASRec epochs between validation scores")
    # -- report ---------------------------------------------------------------------------------
    beams: int = Field(50, ge=10, description="beams of the reported generative rankings (>= 10)")
    report_valid: bool = Field(
        False, description="also report the selected models on the validation rows, with the test "
        "decoding (costs two more 50-beam passes)")
    threads: int | None = Field(
        1, ge=1, description="torch intra-op threads during the run (None: torch's setting). The "
        "models are tiny: on 2 shared cores the quick run took 51 s with 2 threads, 6 s with 1")


def quick_config(seed: int = 0) -> OfflineConfig:
    """A run of well under a minute on a 2-core CPU, for tests: few rows, tiny models."""
    return OfflineConfig(seed=seed, train_users=300, valid_rows=150, test_rows=150, hidden=32, layers=1,
                         heads=2, sft_epochs=4, sft_lr=1e-2, sft_batch=128, grpo_steps=3,
                         grpo_prompts=32, group_size=16, grpo_eval_every=1, sasrec_dim=16, sasrec_epochs=4,
                         sasrec_eval_every=2)


def make_config(seed: int = 0, quick: bool = False, **overrides) -> OfflineConfig:
    """The run's config: defaults (or ``quick_config``) with ``overrides``, validated once.

    Raises:
        UserInputError: an unknown field or a value out of range (one line naming it).
    """
    base = (quick_config(seed) if quick else OfflineConfig(seed=seed)).model_dump()
    try:
        config = OfflineConfig.model_validate({**base, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UserInputError(f"eval: unknown setting '{where}': allowed: "
                                 f"{', '.join(OfflineConfig.model_fields)}") from None
        raise UserInputError(f"eval {where}: {first['msg']} (got {first.get('input')!r})") from None
    if config.hidden % config.heads:
        raise UserInputError(f"eval heads: must divide hidden ({config.hidden}), got {config.heads}")
    return config


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

    def take(self, index: np.ndarray) -> "Rows":
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
def build_generative(embeddings: np.ndarray, config: OfflineConfig, rng: np.random.Generator) -> GenerativePolicy:
    """A ``GenerativePolicy`` with semantic ids, trie and an untrained LM for a fixed catalogue."""
    policy = GenerativePolicy(levels=config.levels, codebook_size=config.codebook_size, hidden=config.hidden,
                              layers=config.layers, heads=config.heads, prompt_items=HISTORY_LEN,
                              max_len=HISTORY_LEN,
                              sft_epochs=config.sft_epochs, sft_lr=config.sft_lr, sft_batch=config.sft_batch)
    policy.ids = SemanticIds(levels=config.levels, codebook_size=min(config.codebook_size, len(embeddings)))
    try:
        codes = policy.ids.fit(embeddings, seed=int(rng.integers(2**31)))
    except ValueError as error:  # too many identical titles for the codebook: a setting to change
        raise UserInputError(f"eval codebook_size: {error}") from None
    policy.tokens = codes_to_tokens(codes, policy.ids.level_sizes, FIRST_CODE_TOKEN)
    policy.trie = CatalogueTrie(codes, policy.ids.level_sizes, FIRST_CODE_TOKEN)
    vocab = FIRST_CODE_TOKEN + int(sum(policy.ids.level_sizes))
    # BOS + prompt items + SEP + the generated item, each item L+1 tokens; 8 spare positions
    positions = 2 + (policy.prompt_items + 1) * (config.levels + 1) + 8
    policy.model = build_model(vocab, config.hidden, config.layers, config.heads, positions, "qwen2",
                               seed=int(rng.integers(2**31)))
    policy.ready = True
    return policy


def rank_generative(policy: GenerativePolicy, rows: Rows, beams: int, chunk: int = 256) -> np.ndarray:
    """``(N, beams)`` items by constrained beam search, best first.

    Like ``GenerativePolicy._beam_search`` but always in the trie's shared-prompt layout: for
    this model (42-token prompts) it was 3x faster at 50 beams than the expanded layout the
    trie picks by default for wide beams (1 CPU thread, 1,024 prompts: 3.9 s against 11.3 s),
    and it gives the same beams.
    """
    policy.model.eval()
    items = [np.zeros((0, beams), np.int64)]
    with torch.inference_mode():
        for start in range(0, len(rows), chunk):
            ids, mask = policy.prompts(rows.history[start:start + chunk])
            found, _ = policy.trie.beam_search(policy.model, ids, mask, num_beams=beams, shared_prompt=True)
            items.append(found.numpy().astype(np.int64))
    return np.concatenate(items)


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


def train_sft(policy: GenerativePolicy, train: Rows, valid: Rows, config: OfflineConfig,
              rng: np.random.Generator, log: Callable[[str], None]) -> dict[str, float]:
    """SFT epochs; leaves the model at the epoch with the best validation NDCG@10.

    Returns:
        ``epoch`` (1-based) kept, its validation NDCG@10 and its mean training loss.
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.sft_lr)
    steps_per_epoch = -(-len(train) // config.sft_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, steps_per_epoch, config.sft_epochs, config.sft_schedule))
    best = {"epoch": 0.0, "valid_ndcg@10": -1.0, "loss": float("nan")}
    best_state = _snapshot(policy.model)
    for epoch in range(1, config.sft_epochs + 1):
        policy.model.train()
        losses = []
        order = torch.randperm(len(train), generator=generator).numpy()
        for start in range(0, len(order), config.sft_batch):
            batch = order[start:start + config.sft_batch]
            loss = policy._sequence_nll(train.history[batch], train.target[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        score = ranking_metrics(rank_generative(policy, valid, config.valid_beams), valid.target, (10,))
        log(f"sft epoch {epoch:3d}  loss {np.mean(losses):.4f}  valid ndcg@10 {score[_SELECT_ON]:.4f}")
        if score[_SELECT_ON] > best["valid_ndcg@10"]:
            best = {"epoch": float(epoch), "valid_ndcg@10": score[_SELECT_ON], "loss": float(np.mean(losses))}
            best_state = _snapshot(policy.model)
    policy.model.load_state_dict(best_state)
    return best


def grpo_step(policy: GenerativePolicy, prompts: Rows, config: OfflineConfig, optimizer: torch.optim.Optimizer,
              reference: torch.nn.Module | None = None) -> dict[str, float]:
    """One GRPO update on a batch of training prompts with ReRe's ranking reward.

    Rollout: the top-G constrained beams of each prompt (ReRe). Reward: ``rere_rank`` against the
    prompt's held-out next item. Groups whose rewards are all equal (target not among the beams)
    have advantage 0 everywhere and are dropped before the forward/backward pass, so the loss
    averages over informative groups only (DAPO's dynamic sampling, Yu et al. 2025, section 3.2).
    One update per batch (mu = 1), so ``old_logp = logp.detach()`` and nothing is clipped.
    """
    ids, mask = policy.prompts(prompts.history)
    policy.model.eval()
    with torch.inference_mode():
        items, beam_scores = policy.trie.beam_search(policy.model, ids, mask, num_beams=config.group_size,
                                                     shared_prompt=True)
    items = items.numpy().astype(np.int64)
    weights = {"rere_rank": 1.0}
    ctx = RewardContext(items=items, target=prompts.target, beam_scores=beam_scores.float().numpy())
    rewards = compute_rewards(ctx, weights)
    advantages = combine(rewards, weights)
    informative = np.flatnonzero(np.ptp(rewards["rere_rank"], axis=1) > 0)
    stats = {"hit_rate": float((items == prompts.target[:, None]).any(1).mean()), "groups": float(len(informative))}
    if len(informative) == 0:
        return {**stats, "loss": 0.0}
    items, advantages = items[informative], advantages[informative]
    ids, mask = ids[informative], mask[informative]
    depth = config.levels + 1
    valid = items >= 0
    completions = torch.from_numpy(policy.tokens[np.maximum(items, 0)].reshape(-1, depth))
    token_mask = torch.from_numpy(np.repeat(valid.reshape(-1, 1), depth, 1))
    advantage = torch.as_tensor(advantages.reshape(-1), dtype=torch.float32)
    ref_logp = None
    if reference is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(reference, ids, mask, completions)
    policy.model.train()
    logp = token_logprobs(policy.model, ids, mask, completions)
    loss, loss_stats = policy_loss(logp, logp.detach(), advantage, token_mask, "grpo", ref_logp=ref_logp,
                                   beta=config.grpo_beta, group_size=config.group_size)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), config.grad_clip)
    optimizer.step()
    return {**stats, "loss": float(loss.detach()), **loss_stats}


def train_grpo(policy: GenerativePolicy, train: Rows, valid: Rows, config: OfflineConfig,
               rng: np.random.Generator, log: Callable[[str], None]) -> dict[str, float]:
    """GRPO from the current (SFT) model; leaves it at the step with the best validation NDCG@10.

    Returns:
        ``step`` kept (0 when ``grpo_steps`` is 0), its validation NDCG@10, mean hit rate of the
        groups over all steps.
    """
    if config.grpo_steps == 0:
        return {"step": 0.0, "valid_ndcg@10": float("nan"), "group_hit_rate": float("nan")}
    best = {"step": 0.0, "valid_ndcg@10": -1.0}
    best_state = _snapshot(policy.model)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.grpo_lr, weight_decay=0.0)
    reference = None
    if config.grpo_beta > 0:
        reference = copy.deepcopy(policy.model).eval()
        reference.requires_grad_(False)
    hit_rates = []
    n_prompts = min(config.grpo_prompts, len(train))
    for step in range(1, config.grpo_steps + 1):
        batch = np.sort(rng.choice(len(train), n_prompts, replace=False))
        stats = grpo_step(policy, train.take(batch), config, optimizer, reference)
        hit_rates.append(stats["hit_rate"])
        if step % config.grpo_eval_every == 0 or step == config.grpo_steps:
            score = ranking_metrics(rank_generative(policy, valid, config.valid_beams), valid.target, (10,))
            log(f"grpo step {step:4d}  group hit rate {stats['hit_rate']:.3f}  groups {stats['groups']:.0f}  "
                f"valid ndcg@10 {score[_SELECT_ON]:.4f}")
            if score[_SELECT_ON] > best["valid_ndcg@10"]:
                best = {"step": float(step), "valid_ndcg@10": score[_SELECT_ON]}
                best_state = _snapshot(policy.model)
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
                 log: Callable[[str], None]) -> tuple[SASRecPolicy, dict[str, float]]:
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
    for epoch in range(1, config.sasrec_epochs + 1):
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
    log(f"sasrec: best epoch {best['epoch']:.0f} of {config.sasrec_epochs}  valid ndcg@10 "
        f"{best['valid_ndcg@10']:.4f}  ({len(inputs)} training windows)")
    policy.model.load_state_dict(best_state)
    return policy, best


# -- report ---------------------------------------------------------------------------------------------
def _markdown_table(results: dict[str, dict[str, float]], train_pairs: int) -> str:
    """Test-split table: our models, then the published figures (``-``: not reported)."""
    names = {"sasrec": "SASRec", "sft": "SFT (generative)", "sft+grpo": "SFT+GRPO (generative)"}
    header = "| model | trained on | " + " | ".join(
        m.replace("hr", "HR").replace("ndcg", "NDCG") for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    ours = f"ours, {train_pairs:,} pairs from valid.csv histories"
    for model in MODELS:
        cells = " | ".join(f"{results[model][m]:.4f}" for m in METRICS)
        lines.append(f"| {names[model]} | {ours} | {cells} |")
    for model, figures in PUBLISHED.items():
        cells = " | ".join(f"{figures[m]:.4f}" if m in figures else "-" for m in METRICS)
        lines.append(f"| {model} | {PUBLISHED_NOTE} | {cells} |")
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict[str, dict[str, dict[str, float]]], info: dict[str, float],
                 config: OfflineConfig, source: Path) -> str:
    """Write ``offline.csv`` (model, split, metric, value) and ``offline.md``; return the table.

    Args:
        results: split -> model -> metric -> value; ``test`` is required.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "offline.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "split", "metric", "value"])
        for split, by_model in results.items():
            for model in MODELS:
                for metric in METRICS:
                    writer.writerow([model, split, metric, f"{by_model[model][metric]:.6f}"])
    test = results["test"]
    table = _markdown_table(test, int(info["data/train_pairs"]))
    if config.grpo_steps:
        grpo = (f"- SFT+GRPO: step {info['sft+grpo/step']:.0f} of {config.grpo_steps}, rere_rank reward, "
                f"G = {config.group_size} beams, {config.grpo_prompts} prompts per step, lr {config.grpo_lr:g}, "
                f"KL weight {config.grpo_beta:g} (valid NDCG@10 {info['sft+grpo/valid_ndcg@10']:.4f}; "
                f"the target was in {info['sft+grpo/group_hit_rate']:.1%} of the groups).")
    else:
        grpo = "- SFT+GRPO: no GRPO step (grpo_steps = 0), the SFT model."
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
        "(no validation or test target is trained on); the published models were trained on the full "
        "training split, which is not shipped and is much larger.",
        "",
        "Model selection on validation NDCG@10 "
        f"({info['data/valid_rows']:.0f} rows, {config.valid_beams} beams for the generative models):",
        f"- SASRec: epoch {info['sasrec/epoch']:.0f} of {config.sasrec_epochs} "
        f"(valid NDCG@10 {info['sasrec/valid_ndcg@10']:.4f}).",
        f"- SFT: epoch {info['sft/epoch']:.0f} of {config.sft_epochs} "
        f"(valid NDCG@10 {info['sft/valid_ndcg@10']:.4f}).",
        grpo,
        "",
        f"Test NDCG@10 of SFT+GRPO minus SFT: {info['sft+grpo/test_ndcg@10_gain']:+.4f} "
        f"(paired standard error {info['sft+grpo/test_ndcg@10_gain_se']:.4f} over the test rows; "
        "as measured, one seed, no re-run was picked).",
        "",
        f"Seed {config.seed}; wall time {info['time/seconds']:.0f} s. Settings: "
        + ", ".join(f"{k}={v}" for k, v in config.model_dump().items()) + ".",
        "",
    ]
    (out_dir / "offline.md").write_text("\n".join(lines))
    return table


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
        grpo_steps: GRPO steps (None: the config default).
        beams: Beam width of the reported generative rankings (>= 10).
        progress: Print one line per epoch/evaluation and the final table.
        **overrides: Any other ``OfflineConfig`` field.

    Returns:
        ``"{model}/{split}/{metric}"`` (models ``sasrec``, ``sft``, ``sft+grpo``; split ``test``,
        and ``valid`` with ``report_valid``; metrics ``hr@K``, ``ndcg@K``) plus ``info/...`` entries: selected epochs
        and steps, data sizes and ``info/time/seconds``.

    Raises:
        UserInputError: a bad data folder or setting (one line).
    """
    started = time.perf_counter()
    config = make_config(seed, quick, sft_epochs=sft_epochs, grpo_steps=grpo_steps, beams=beams, **overrides)

    def log(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    with torch_threads(config.threads):
        return _evaluate(data_dir, Path(out_dir), config, log, started)


def _evaluate(data_dir: str | Path | None, out_dir: Path, config: OfflineConfig, log: Callable[[str], None],
              started: float) -> dict[str, float]:
    data = load_amazon(data_dir)
    rng_data, rng_ids, rng_sft, rng_grpo, rng_sasrec = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(5))
    train, valid, test = load_rows(data, config, rng_data)
    info = {"data/train_pairs": float(len(train)), "data/valid_rows": float(len(valid)),
            "data/test_rows": float(len(test)), "data/items": float(data.n_items)}
    log(f"eval: {len(train)} training pairs, {len(valid)} valid rows, {len(test)} test rows, "
        f"{data.n_items} items")
    embeddings = item_embeddings(data, dim=config.embed_dim)
    splits = {"test": test, **({"valid": valid} if config.report_valid else {})}
    results: dict[str, dict[str, dict[str, float]]] = {split: {} for split in splits}

    policy, best = train_sasrec(train, valid, data.n_items, config, rng_sasrec, log)
    info.update({f"sasrec/{k}": v for k, v in best.items()})
    for split, rows in splits.items():
        results[split]["sasrec"] = ranking_metrics(rank_sasrec(policy, rows, max(KS)), rows.target)

    generative = build_generative(embeddings, config, rng_ids)
    info["sft/semantic_id_tokens"] = float(sum(generative.ids.level_sizes))
    best = train_sft(generative, train, valid, config, rng_sft, log)
    info.update({f"sft/{k}": v for k, v in best.items()})
    ranked_sft = {split: rank_generative(generative, rows, config.beams) for split, rows in splits.items()}
    for split, rows in splits.items():
        results[split]["sft"] = ranking_metrics(ranked_sft[split], rows.target)
    log(f"sft: test ndcg@10 {results['test']['sft']['ndcg@10']:.4f}")

    best = train_grpo(generative, train, valid, config, rng_grpo, log)
    info.update({f"sft+grpo/{k}": v for k, v in best.items()})
    for split, rows in splits.items():
        ranked = rank_generative(generative, rows, config.beams)
        results[split]["sft+grpo"] = ranking_metrics(ranked, rows.target)
        if split == "test":
            gain, error = paired_difference(ranked_sft[split], ranked, rows.target)
            info.update({"sft+grpo/test_ndcg@10_gain": gain, "sft+grpo/test_ndcg@10_gain_se": error})

    info["time/seconds"] = time.perf_counter() - started
    table = write_report(out_dir, results, info, config, data.source)
    log("test split:\n" + table)
    log(f"report: {out_dir / 'offline.md'}  ({info['time/seconds']:.0f} s)")
    metrics = {f"{model}/{split}/{metric}": value for split, by_model in results.items()
               for model, values in by_model.items() for metric, value in values.items()}
    metrics.update({f"info/{k}": v for k, v in info.items()})
    return metrics


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line for the CLI's error handler, not argparse's exit
        raise UserInputError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="agorasim eval", description="Offline next-item evaluation on Amazon data: SASRec, "
                "generative SFT and SFT+GRPO, HR@K/NDCG@K on the test split.")
    p.add_argument("--data", help="data folder with info.txt, valid.csv, test.csv (default: the vendored "
                   "Industrial_and_Scientific copy)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny run (under a minute) to check the set-up")
    p.add_argument("--sft-epochs", type=int, help="SFT epochs (default 16)")
    p.add_argument("--grpo-steps", type=int, help="GRPO steps (default 50)")
    p.add_argument("--beams", type=int, default=50, help="beams of the generative rankings (default 50)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``agorasim eval [--data DIR] [--out DIR] [--seed S] [--quick]``; user errors raise
    ``UserInputError`` for the CLI to print."""
    args = parser().parse_args(argv)
    evaluate(data_dir=args.data, out_dir=args.out, seed=args.seed, quick=args.quick, sft_epochs=args.sft_epochs,
             grpo_steps=args.grpo_steps, beams=args.beams)
    return 0
