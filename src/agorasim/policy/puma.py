"""PUMA: per-user soft prompts, and their migration across a model upgrade (arXiv 2601.12034).

A user's *soft prompt* is one learned vector ``p_u`` in the LM's embedding space. It is put in the
rating prompt ``[BOS] p_u codes(item) <rate>`` and the LM's logits of the five rating tokens
``<r1>..<r5>`` at the last position are read (PUMA's "1".."5" answer tokens). The loss is PUMA's
``0.2 CE(logits, stars) + 0.8 MSE(head(logits), stars)``, the head an MLP 5 -> 32 -> 12 -> 1 (ReLU,
as the authors' ``RatingPredictor``). The LM is frozen while prompts train; only prompts and head
move. Each new LM first gets a short *population* rating SFT (``rating_sft``: the same prompt with a
zero user vector, all LM weights trained) so its rating tokens mean stars, the role a pretrained
LLM's digit tokens play in the paper.

**How serving uses the prompts.** The policy's trie-constrained beams (its next-item candidates)
are re-scored per user: score = beam log-probability + ``rescore_weight`` x the stars the rating
head predicts for the item under the user's prompt; the slate is the beams in that order. Users
without a trained prompt (new users, everybody after a cold upgrade) are served by the beam order
alone. A better prompt therefore changes what the user is served, so utility dips when prompts are
lost at an upgrade and recovers as they are retrained or migrated.

**The users' feedback.** Each round the policy asks the feedback oracle for the ratings its
visitors give the items they were shown (``judge``: the expected stars of each shown item, rounded
to whole stars for the CE target), and keeps the last ``ratings_per_user`` per user, a share
``holdout`` of them out of training. This is the counterfactual mode of in-loop training (``rl``):
a rating per shown item, not only per click.

**Migration at an upgrade** (``migrate``; arms of the ``policy-upgrade`` scenario):

* ``cold``: fresh prompts, untrained; every user is served without personalisation until a visit
  retrains their prompt (``online_epochs``).
* ``retrain``: every user's prompt trained again from a random start on the new model, all their
  ratings, ``prompt_epochs`` epochs (the expensive baseline).
* ``puma``: the adapter ``Adapter`` (PUMA's Phi) and a new rating head are trained on the ratings
  of ``budget`` users chosen by ``select_users`` (source prompts and new LM frozen), then every
  user's new prompt is ``Phi(old prompt)``.
* ``puma-random``: the same adapter on ``budget`` users drawn at random.

Chained upgrades (A -> B -> C) apply the same step at each upgrade: the source of the second is the
prompt on B (migrated, then trained online), so C's prompts are Phi_BC(...Phi_AB(p_A)...).

Differences from the authors' code (stated, and config options where they are choices): the
adapter's hidden width is ``adapter_hidden`` (256, not 4096); in the second pass of user selection
the remaining budget is split by cluster size once, not from a running remainder; the adapter's
learning rate and epochs are larger (tiny models, few ratings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

RATE = "<rate>"
RATING_TOKENS = tuple(f"<r{s}>" for s in range(1, 6))
SPECIAL_TOKENS = (RATE, *RATING_TOKENS)
CE_WEIGHT, MSE_WEIGHT = 0.2, 0.8  # PUMA's loss weights (paper, Eq. of stage 1)
PROMPT_INIT = 0.1  # soft prompts start uniform in [-0.1, 0.1] (the authors' init_range)


class RatingVocabulary:
    """The rating tokens PUMA adds to the LM's vocabulary; stands in ``build_lm``'s list of methods
    (which contribute ``special_tokens`` and ``extra_positions``)."""

    special_tokens = SPECIAL_TOKENS

    def extra_positions(self, depth: int) -> int:
        return 0  # the rating prompt (BOS, prompt, item codes, <rate>) is shorter than a history prompt


class RatingHead(nn.Module):
    """PUMA's rating predictor: the five rating-token logits -> stars (MLP 5 -> 32 -> 12 -> 1)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits).squeeze(-1) + 3.0  # centred on 3 stars, so an untrained head is not far off


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class Adapter(nn.Module):
    """PUMA's prompt adapter Phi: source prompts (d_s) -> target prompts (d_t).

    x1 = x + MLP(LN x); h = MLP_up(LN x1) (d_s -> hidden -> d_t); x2 = h + MLP(LN h);
    out = MLP(LN x2). SiLU activations, dropout in every MLP (authors' ``AdapterModel``).
    """

    def __init__(self, d_source: int, d_target: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.d_source, self.d_target = d_source, d_target
        self.norm_in, self.res_in = nn.LayerNorm(d_source), _mlp(d_source, hidden, d_source, dropout)
        self.norm_up, self.up = nn.LayerNorm(d_source), _mlp(d_source, hidden, d_target, dropout)
        self.norm_h, self.res_out = nn.LayerNorm(d_target), _mlp(d_target, hidden, d_target, dropout)
        self.norm_out, self.out = nn.LayerNorm(d_target), _mlp(d_target, hidden, d_target, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x + self.res_in(self.norm_in(x))
        h = self.up(self.norm_up(x1))
        x2 = h + self.res_out(self.norm_h(h))
        return self.out(self.norm_out(x2))


# -- the rating prompt ------------------------------------------------------------------------------
@dataclass
class RatingLM:
    """What the rating prompt needs from a generative policy: its LM, the item tokens, the ids of
    BOS and of the rating tokens (``RatingLM.of(policy)``)."""

    model: nn.Module
    tokens: np.ndarray  # (n_items, L+1) token ids of every item
    bos: int
    rate: int
    answers: list[int]  # ids of <r1>..<r5>
    device: str = "cpu"

    @classmethod
    def of(cls, policy) -> RatingLM:
        return cls(policy.model, policy.tokens, policy.bos, policy.special_token(RATE),
                   [policy.special_token(t) for t in RATING_TOKENS], policy.device)

    @property
    def dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def logits(self, prompts: torch.Tensor, items: np.ndarray) -> torch.Tensor:
        """``(N, 5)`` logits of the rating tokens after ``[BOS] p_u codes(item) <rate>``."""
        n = len(items)
        ids = np.concatenate([np.full((n, 1), self.bos), self.tokens[items], np.full((n, 1), self.rate)], 1)
        embed = self.model.get_input_embeddings()(torch.from_numpy(ids.astype(np.int64)).to(self.device))
        x = torch.cat([embed[:, :1], prompts[:, None, :].to(embed.dtype), embed[:, 1:]], 1)
        return self.model(inputs_embeds=x).logits[:, -1, self.answers].float()


def rating_loss(lm: RatingLM, head: RatingHead, prompts: torch.Tensor, items: np.ndarray,
                stars: torch.Tensor) -> torch.Tensor:
    """PUMA's stage-1 loss: 0.2 CE over the five rating tokens (target: whole stars) + 0.8 MSE of
    the head's stars."""
    logits = lm.logits(prompts, items)
    target = (torch.round(stars).clamp(1, 5) - 1).long()
    ce = nn.functional.cross_entropy(logits, target)
    mse = nn.functional.mse_loss(head(logits), stars)
    return CE_WEIGHT * ce + MSE_WEIGHT * mse


@torch.no_grad()
def predict_stars(lm: RatingLM, head: RatingHead, prompts: torch.Tensor, items: np.ndarray,
                  chunk: int = 4096) -> np.ndarray:
    """``(N,)`` predicted stars of each (prompt, item) row, clipped to [1, 5]."""
    lm.model.eval()
    head.eval()
    out = [head(lm.logits(prompts[s:s + chunk], items[s:s + chunk])).clamp(1, 5)
           for s in range(0, len(items), chunk)]
    return torch.cat(out).cpu().numpy().astype(np.float64) if out else np.zeros(0)


class _Frozen:
    """Context: the LM's weights take no gradient (the prompts' and adapter's training)."""

    def __init__(self, model: nn.Module):
        self.model, self.flags = model, []

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.model.parameters(), self.flags):
            p.requires_grad_(flag)


def _batches(n: int, batch: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator).numpy()
    for start in range(0, n, batch):
        yield order[start:start + batch]


def train_prompts(lm: RatingLM, head: RatingHead, table: torch.Tensor, users: np.ndarray, items: np.ndarray,
                  stars: np.ndarray, epochs: int, lr: float, batch: int, generator: torch.Generator,
                  prompts_learn: bool = True) -> int:
    """Train the prompts of ``users`` (rows of ``table``, updated in place) and ``head`` on their
    ratings, the LM frozen; returns the optimiser steps. Only the rows in the data are optimised
    (a fresh Adam over them), so other users' prompts never drift on stale moments.
    ``prompts_learn=False``: the head alone learns (the prompts stay as they are)."""
    if len(users) == 0 or epochs == 0:
        return 0
    rows, index = np.unique(users, return_inverse=True)
    own = table[torch.from_numpy(rows)].clone().requires_grad_(prompts_learn)
    optimizer = torch.optim.Adam([own, *head.parameters()] if prompts_learn else list(head.parameters()), lr=lr)
    target = torch.as_tensor(stars, dtype=torch.float32)
    steps = 0
    head.train()
    with _Frozen(lm.model):
        for _ in range(epochs):
            for part in _batches(len(items), batch, generator):
                optimizer.zero_grad()
                loss = rating_loss(lm, head, own[torch.from_numpy(index[part])], items[part], target[part])
                loss.backward()
                optimizer.step()
                steps += 1
    if prompts_learn:
        table[torch.from_numpy(rows)] = own.detach()
    return steps


def rating_sft(lm: RatingLM, items: np.ndarray, stars: np.ndarray, epochs: int, lr: float, batch: int,
               generator: torch.Generator) -> int:
    """Population rating SFT of a new LM (every weight trains, the user slot a zero vector): CE of
    the whole stars on the rating tokens. Returns the optimiser steps."""
    if len(items) == 0 or epochs == 0:
        return 0
    model = lm.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    target = torch.as_tensor(np.clip(np.round(stars), 1, 5) - 1, dtype=torch.long)
    zero = torch.zeros(1, lm.dim, device=lm.device)
    model.train()
    steps = 0
    for _ in range(epochs):
        for part in _batches(len(items), batch, generator):
            optimizer.zero_grad()
            logits = lm.logits(zero.expand(len(part), -1), items[part])
            nn.functional.cross_entropy(logits, target[part].to(logits.device)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            steps += 1
    model.eval()
    return steps


def train_adapter(lm: RatingLM, source: torch.Tensor, users: np.ndarray, items: np.ndarray, stars: np.ndarray,
                  hidden: int, dropout: float, epochs: int, lr: float, batch: int, seed: int
                  ) -> tuple[Adapter, RatingHead, int]:
    """PUMA stage 2: the adapter Phi and a new rating head trained on ``users``' ratings through the
    frozen target LM, from the frozen source prompts ``source`` (rows by user id). Returns
    (adapter, head, optimiser steps). Dropout draws from a torch RNG seeded by ``seed`` (forked, so
    the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = Adapter(source.shape[1], lm.dim, hidden, dropout)
        head = RatingHead()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW([*adapter.parameters(), *head.parameters()], lr=lr)
        target = torch.as_tensor(stars, dtype=torch.float32)
        src = source.detach()
        steps = 0
        adapter.train()
        head.train()
        with _Frozen(lm.model):
            for _ in range(epochs):
                for part in _batches(len(items), batch, generator):
                    optimizer.zero_grad()
                    prompts = adapter(src[torch.from_numpy(users[part])])
                    rating_loss(lm, head, prompts, items[part], target[part]).backward()
                    optimizer.step()
                    steps += 1
    adapter.eval()
    return adapter, head, steps


@torch.no_grad()
def apply_adapters(adapters: list[Adapter], prompts: torch.Tensor) -> torch.Tensor:
    """Chained migration: the adapters applied in order (A -> B -> C ...)."""
    for adapter in adapters:
        adapter.eval()
        prompts = adapter(prompts)
    return prompts


# -- user selection -----------------------------------------------------------------------------------
def bin_quota(n: int, bins: int) -> np.ndarray:
    """Users to take from each rating-variance bin out of ``n``: weights exp(-x^2/2) + 0.1 on
    x = linspace(-2, 2, bins), floored, the rounding remainder to the last bin (authors'
    ``select_users_with_clustering_and_variance_sampling``). ``bin_quota(50, 5) = [3, 11, 18, 11, 7]``."""
    if bins <= 1:
        return np.array([n], np.int64)
    x = np.linspace(-2, 2, bins)
    weights = np.exp(-x ** 2 / 2) + 0.1
    quota = (weights / weights.sum() * n).astype(np.int64)
    quota[-1] = n - quota[:-1].sum()
    return quota


def variance_bins(variance: np.ndarray, bins: int) -> np.ndarray:
    """Equal-count bins of ``variance`` (``pandas.qcut``, repeated edges dropped: fewer bins when
    values repeat); all in bin 0 when they cannot be cut."""
    import pandas as pd

    if len(variance) < 2 or bins <= 1:
        return np.zeros(len(variance), np.int64)
    try:
        labels = pd.qcut(variance, q=bins, labels=False, duplicates="drop")
    except ValueError:
        return np.zeros(len(variance), np.int64)
    return np.asarray(labels, np.int64)


def stratified_pick(candidates: np.ndarray, variance: np.ndarray, n: int, bins: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``candidates`` (fewer when a bin runs short) drawn per variance bin by ``bin_quota``."""
    labels = variance_bins(variance, bins)
    present = np.unique(labels)
    quota = bin_quota(n, len(present))
    picked = []
    for label, want in zip(present, quota):
        members = candidates[labels == label]
        take = min(int(want), len(members))
        if take:
            picked.append(rng.choice(members, take, replace=False))
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """Cluster of each row of ``x``: Lloyd's k-means from a k-means++ start (Arthur and
    Vassilvitskii 2007), ``rng`` drawing the start; an emptied cluster keeps its centre."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
    centres = np.asarray(centres)
    labels = np.full(len(x), -1)
    for _ in range(iterations):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                centres[c] = x[labels == c].mean(0)
    return labels


def select_users(prompts: np.ndarray, variance: np.ndarray, budget: int, clusters: int = 15, bins: int = 5,
                 min_per_cluster: int = 50, seed: int = 0) -> np.ndarray:
    """PUMA's user selection: sorted rows of ``prompts`` (one per eligible user) to train on.

    1. k-means (``clusters``; ``kmeans``) on the source prompts;
    2. from each cluster, ``min(min_per_cluster, size, budget // clusters)`` users drawn per
       rating-variance bin (``stratified_pick``; the last cap is ours, so that a budget smaller
       than ``clusters x min_per_cluster`` still reaches every cluster);
    3. the rest of the budget split by cluster size, drawn the same way from the users not taken;
    4. any shortfall (short bins, rounding) filled at random.
    """
    n = len(prompts)
    if budget >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    k = max(1, min(clusters, n))
    labels = kmeans(prompts.astype(np.float64), k, rng)
    variance = np.nan_to_num(np.asarray(variance, np.float64))
    chosen = np.zeros(n, bool)
    sizes = np.bincount(labels, minlength=k)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        want = min(min_per_cluster, len(members), max(1, budget // k), budget - int(chosen.sum()))
        if want > 0:
            chosen[stratified_pick(members, variance[members], want, bins, rng)] = True
    remaining = budget - int(chosen.sum())
    if remaining > 0:
        for c in range(k):
            members = np.flatnonzero((labels == c) & ~chosen)
            want = min(int(remaining * sizes[c] / n), len(members))
            if want > 0:
                chosen[stratified_pick(members, variance[members], want, bins, rng)] = True
    short = budget - int(chosen.sum())
    if short > 0:
        chosen[rng.choice(np.flatnonzero(~chosen), short, replace=False)] = True
    return np.flatnonzero(chosen)


def random_users(n: int, budget: int, seed: int = 0) -> np.ndarray:
    """The random-selection control: ``budget`` of ``n`` rows, sorted."""
    if budget >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, budget, replace=False))


# -- the ratings and prompts the policy keeps -------------------------------------------------------------
class Ratings:
    """The last ``per_user`` ratings of each user (a ring per user), a share held out of training."""

    def __init__(self, per_user: int, holdout: float):
        self.per_user, self.holdout = per_user, holdout
        self.items = np.full((0, per_user), -1, np.int64)
        self.stars = np.zeros((0, per_user), np.float32)
        self.held = np.zeros((0, per_user), bool)
        self.count = np.zeros(0, np.int64)

    def grow(self, n_users: int) -> None:
        extra = n_users - len(self.count)
        if extra > 0:
            self.items = np.concatenate([self.items, np.full((extra, self.per_user), -1, np.int64)])
            self.stars = np.concatenate([self.stars, np.zeros((extra, self.per_user), np.float32)])
            self.held = np.concatenate([self.held, np.zeros((extra, self.per_user), bool)])
            self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])

    def add(self, users: np.ndarray, items: np.ndarray, stars: np.ndarray, rng: np.random.Generator) -> None:
        """Append ratings (rows in any order; within a user, later rows are newer)."""
        if len(users) == 0:
            return
        self.grow(int(users.max()) + 1)
        order = np.argsort(users, kind="stable")
        users, items, stars = users[order], items[order], stars[order]
        first = np.searchsorted(users, users)  # rank of each row within its user's block
        slot = (self.count[users] + np.arange(len(users)) - first) % self.per_user
        self.items[users, slot] = items
        self.stars[users, slot] = stars
        self.held[users, slot] = rng.random(len(users)) < self.holdout
        np.add.at(self.count, users, 1)

    def rows(self, users: np.ndarray | None = None, held: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, stars) of the training (or held-out) ratings of ``users`` (None: all)."""
        users = np.arange(len(self.count)) if users is None else np.asarray(users, np.int64)
        users = users[users < len(self.count)]
        items, keep = self.items[users], (self.items[users] >= 0) & (self.held[users] == held)
        r, c = np.nonzero(keep)
        return users[r], items[r, c], self.stars[users][r, c].astype(np.float64)

    def variance(self, users: np.ndarray) -> np.ndarray:
        """Variance of each user's training ratings (0 with fewer than two)."""
        u, _, s = self.rows(users)
        index = np.searchsorted(users, u)
        n = np.bincount(index, minlength=len(users)).astype(np.float64)
        mean = np.bincount(index, s, len(users)) / np.maximum(n, 1)
        sq = np.bincount(index, s ** 2, len(users)) / np.maximum(n, 1)
        return np.where(n >= 2, np.maximum(sq - mean ** 2, 0.0), 0.0)


class SoftPrompts:
    """One prompt per user in an LM's embedding space, the rating head, and which users' prompts
    are trained (``ready``: those are served personalised)."""

    def __init__(self, dim: int):
        self.table = torch.zeros(0, dim)
        self.head = RatingHead()
        self.ready = np.zeros(0, bool)

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def grow(self, n_users: int, generator: torch.Generator) -> None:
        extra = n_users - len(self.table)
        if extra > 0:
            fresh = (torch.rand(extra, self.dim, generator=generator) * 2 - 1) * PROMPT_INIT
            self.table = torch.cat([self.table, fresh])
            self.ready = np.concatenate([self.ready, np.zeros(extra, bool)])

    @classmethod
    def fresh(cls, dim: int, n_users: int, seed: int) -> SoftPrompts:
        """Untrained prompts and head (seeded, the global torch RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            prompts = cls(dim)
        prompts.grow(n_users, torch.Generator().manual_seed(seed))
        return prompts


def rmse_mae(predicted: np.ndarray, stars: np.ndarray) -> tuple[float, float]:
    if len(stars) == 0:
        return float("nan"), float("nan")
    err = predicted - stars
    return float(np.sqrt(np.mean(err ** 2))), float(np.mean(np.abs(err)))


# -- migration at an upgrade ----------------------------------------------------------------------------
def migrate(arm: str, cfg, old: SoftPrompts, lm: RatingLM, ratings: Ratings, seed: int) -> tuple[SoftPrompts, dict]:
    """The new model's prompts by ``arm`` (cold, retrain, puma, puma-random; see the module
    docstring) and the migration's cost: ``puma/steps`` (optimiser steps), ``puma/users`` (users
    whose ratings trained it), ``time/puma_seconds``."""
    started = time.perf_counter()
    n = len(old.table)
    new = SoftPrompts.fresh(lm.dim, n, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    steps, trained_on = 0, 0
    if arm == "retrain":
        users, items, stars = ratings.rows(np.arange(n))
        steps = train_prompts(lm, new.head, new.table, users, items, stars, cfg.prompt_epochs, cfg.prompt_lr,
                              cfg.batch, generator)
        new.ready[np.unique(users)] = True
        trained_on = len(np.unique(users))
    elif arm in ("puma", "puma-random"):
        eligible = np.flatnonzero(old.ready)
        if len(eligible):
            if arm == "puma":
                picked = select_users(old.table[eligible].numpy(), ratings.variance(eligible), cfg.budget,
                                      cfg.clusters, cfg.bins, cfg.min_per_cluster, seed)
            else:
                picked = random_users(len(eligible), cfg.budget, seed)
            users, items, stars = ratings.rows(eligible[picked])
            adapter, head, steps = train_adapter(lm, old.table, users, items, stars, cfg.adapter_hidden, cfg.dropout,
                                                 cfg.adapter_epochs, cfg.adapter_lr, cfg.batch, seed + 2)
            new.table[torch.from_numpy(eligible)] = apply_adapters([adapter], old.table[torch.from_numpy(eligible)])
            new.head, new.ready = head, old.ready.copy()
            trained_on = len(picked)
    return new, {"puma/steps": float(steps), "puma/users": float(trained_on),
                 "time/puma_seconds": time.perf_counter() - started}

