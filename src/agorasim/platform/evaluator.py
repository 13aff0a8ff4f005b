"""A retrieval-grounded evaluator of items no one has seen yet: PaperEval adapted to the market.

PaperEval (arXiv 2508.05129, ALGORITHMS.md section 10) predicts a new paper's future impact from
its text plus the texts of its most similar *concurrent* papers, reads the input with m learned
reasoning tokens, scores each reasoning token's hidden state with one MLP and trains every step's
score with ListMLE at a temperature annealed across the steps:

    L = - sum_j sum_i log[ exp(s_{r(i)}^(j) / tau_j) / sum_{k >= i} exp(s_{r(k)}^(j) / tau_j) ],
    tau_j = tau_max + (j / m) (tau_min - tau_max),  j = 1..m,

where r orders the batch by the true outcome (best first); inference reads the last step's score.

The adaptation, in the market ([inf] where the paper is silent, each a config field):
- **The item and its outcome.** An item's outcome is what the platform sees of it over its first
  ``horizon`` rounds on the market: its click rate per impression (``outcome=click_rate``) or its
  mean stars (``outcome=rating``), counted here from each round's slates and feedback. Items with
  fewer than ``min_impressions`` impressions in that window have no outcome and are not trained on.
- **Its text** is the item's content vector (what the platform knows of an item: no true
  embedding or quality); each input vector becomes one token of a small transformer encoder.
- **Retrieval.** The ``k`` items most similar by cosine of content (a faiss inner-product index
  over unit vectors) among the items born in the ``window`` rounds up to and including the item's
  own arrival, itself excluded: concurrent and already known when the item arrives, so the
  evaluator never reads the future. Missing neighbours are masked out of attention.
- **Reasoning.** ``steps`` learned embeddings after the item and its neighbours; each one's hidden
  state gives a score ``s^(j)``. ``steps: 0`` (the paper's "without reasoning" ablation) scores the
  item token itself, at ``tau = 1``.
- **Training.** Every ``train_every`` rounds, on the items whose window has closed (the newest
  ``max_items``), ``epochs`` passes of Adam over shuffled batches; ``loss=mse`` (the paper's MSE
  ablation) regresses the final score on the outcome standardised over the training set instead.
- **Evaluation, prequential.** Before each fit, the items whose window closed since the last fit
  are scored by the model as it was (it never trained on them) and compared with their realised
  outcomes: NDCG@10 (gains: the outcomes min-max scaled), Spearman and Kendall (scipy).

Two uses: ``scores`` gives the platform's prior for new items (``platform.boost_score=evaluator``
ranks new items by it in the new-item boost, ``platform/rerankers.py``); the prequential figures go
to the metrics row as ``evaluator/*``. The same retrieval idea audits promotions against the
neighbours' features in ``platform/audit.py``.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import nn

from agorasim.config import EvaluatorConfig
from agorasim.metrics.accuracy import ndcg_at_k


def temperatures(steps: int, tau_max: float, tau_min: float) -> np.ndarray:
    """``tau_j = tau_max + (j / m)(tau_min - tau_max)`` for ``j = 1..m``; one score at 1 when m = 0."""
    if steps == 0:
        return np.ones(1)
    j = np.arange(1, steps + 1)
    return tau_max + j / steps * (tau_min - tau_max)


def listmle(scores: torch.Tensor, outcome: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """ListMLE summed over the steps: ``scores`` (S, B), ``outcome`` (B,), ``taus`` (S,).

    Each step's term is ``sum_i [logsumexp_{k >= i} s_{r(k)} / tau - s_{r(i)} / tau]`` with r the
    batch sorted by outcome, best first (ties keep the batch order)."""
    order = torch.argsort(outcome, descending=True, stable=True)
    s = scores[:, order] / taus[:, None]
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # logsumexp over positions i..B
    return (tail - s).sum()


class EvaluatorNet(nn.Module):
    """The item token, its k neighbour tokens and m reasoning tokens through a transformer
    encoder; the scorer MLP reads each reasoning token (or the item token when m = 0)."""

    def __init__(self, dim: int, cfg: EvaluatorConfig):
        super().__init__()
        self.steps = cfg.steps
        self.embed = nn.Linear(dim, cfg.hidden)
        self.kind = nn.Embedding(2, cfg.hidden)  # 0: the item, 1: a neighbour
        self.reasoning = nn.Parameter(torch.randn(cfg.steps, cfg.hidden) * 0.02) if cfg.steps else None
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, 2 * cfg.hidden, dropout=0.0, activation=nn.GELU(),
                                           batch_first=True, norm_first=True)  # a module: checkpoints refuse functions
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.scorer = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    def forward(self, item: torch.Tensor, neighbours: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(S, B) scores from ``item`` (B, d), ``neighbours`` (B, k, d), ``present`` (B, k) bool."""
        b = item.shape[0]
        tokens = [self.embed(item)[:, None] + self.kind.weight[0], self.embed(neighbours) + self.kind.weight[1]]
        masks = [torch.zeros(b, 1, dtype=torch.bool), ~present]
        if self.steps:
            tokens.append(self.reasoning.expand(b, -1, -1))
            masks.append(torch.zeros(b, self.steps, dtype=torch.bool))
        hidden = self.encoder(torch.cat(tokens, 1), src_key_padding_mask=torch.cat(masks, 1))
        read = hidden[:, -self.steps:] if self.steps else hidden[:, :1]
        return self.scorer(read).squeeze(-1).T


class ItemEvaluator:
    """The platform's evaluator of new items: its outcome counts, its model and its figures.

    Args:
        cfg: the ``platform.evaluator`` section.
        dim: content dimension of the catalogue.
        seed: seeds the model's initial weights (training draws from the rng given to ``fit``).
    """

    def __init__(self, cfg: EvaluatorConfig, dim: int, seed: int):
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = EvaluatorNet(dim, cfg)
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.impressions = np.zeros(0)
        self.clicks = np.zeros(0)
        self.stars = np.zeros(0)
        self.evaluated = np.zeros(0, dtype=bool)  # held-out figures already taken for the item
        self.fits = 0
        self.last: dict[str, float] = {}
        self.fitted_round = -1  # the round of the last fit, whose held-out figures ``last`` holds

    def due(self, round: int) -> bool:
        """Whether the evaluator fits at the end of ``round`` (every ``train_every`` rounds)."""
        return (round + 1) % self.cfg.train_every == 0

    def figures(self, round: int) -> dict[str, float]:
        """The held-out figures of the fit at the end of ``round`` ({} when it did not fit then)."""
        return self.last if self.fitted_round == round else {}

    # -- outcome bookkeeping ------------------------------------------------------------------
    def observe(self, round: int, slates: np.ndarray, choice: np.ndarray, stars: np.ndarray,
                born: np.ndarray) -> None:
        """Count the round's impressions, clicks and stars of items still in their first
        ``horizon`` rounds (``born``: arrival round of every item)."""
        n = len(born)
        grow = n - len(self.impressions)
        if grow > 0:
            self.impressions, self.clicks, self.stars = (np.pad(a, (0, grow)) for a in
                                                          (self.impressions, self.clicks, self.stars))
            self.evaluated = np.pad(self.evaluated, (0, grow))
        shown = slates[slates >= 0]
        young = round - born[shown] < self.cfg.horizon
        self.impressions += np.bincount(shown[young], minlength=n)
        rows = np.flatnonzero(choice >= 0)
        clicked = slates[rows, choice[rows]]
        keep = round - born[clicked] < self.cfg.horizon
        self.clicks += np.bincount(clicked[keep], minlength=n)
        self.stars += np.bincount(clicked[keep], weights=stars[rows][keep], minlength=n)

    def outcomes(self, round: int, born: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the new items whose window closed by the end of ``round`` with enough
        impressions, and their outcomes."""
        n = len(self.impressions)
        born = born[:n]
        closed = (born > 0) & (born + self.cfg.horizon <= round + 1) & (self.impressions >= self.cfg.min_impressions)
        if self.cfg.outcome == "rating":
            closed &= self.clicks > 0
        ids = np.flatnonzero(closed)
        if self.cfg.outcome == "click_rate":
            return ids, self.clicks[ids] / self.impressions[ids]
        return ids, self.stars[ids] / self.clicks[ids]

    # -- retrieval ------------------------------------------------------------------------------
    def neighbours(self, ids: np.ndarray, content: np.ndarray, born: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) ids of each item's k most similar concurrent items (born in the ``window``
        rounds up to its own arrival, itself excluded), -1 where there are fewer."""
        k = self.cfg.k
        out = np.full((len(ids), k), -1, dtype=np.int64)
        if k == 0 or len(ids) == 0:
            return out, np.zeros((len(ids), k))
        unit = content / np.linalg.norm(content, axis=1, keepdims=True).clip(1e-12)
        unit = unit.astype(np.float32)
        sims = np.zeros((len(ids), k))
        for r in np.unique(born[ids]):
            rows = np.flatnonzero(born[ids] == r)
            pool = np.flatnonzero((born <= r) & (born >= r - self.cfg.window) & (born > 0))
            index = faiss.IndexFlatIP(unit.shape[1])
            index.add(unit[pool])
            found_sim, found = index.search(unit[ids[rows]], min(k + 1, len(pool)))
            found = np.where(found >= 0, pool[np.maximum(found, 0)], -1)
            for row, hits, hit_sims in zip(rows, found, found_sim):
                keep = (hits >= 0) & (hits != ids[row])
                take = hits[keep][:k]
                out[row, : len(take)] = take
                sims[row, : len(take)] = hit_sims[keep][:k]
        return out, sims

    def _inputs(self, ids: np.ndarray, content: np.ndarray, born: np.ndarray):
        found, _ = self.neighbours(ids, content, born)
        item = torch.as_tensor(content[ids], dtype=torch.float32)
        neighbours = torch.as_tensor(content[np.maximum(found, 0)], dtype=torch.float32).reshape(
            len(ids), self.cfg.k, content.shape[1])
        return item, neighbours, torch.as_tensor(found >= 0)

    # -- scoring and training -------------------------------------------------------------------
    def scores(self, ids: np.ndarray, content: np.ndarray, born: np.ndarray) -> np.ndarray:
        """The last reasoning step's score of each item (higher: a better predicted outcome)."""
        if len(ids) == 0:
            return np.zeros(0)
        self.net.eval()
        with torch.inference_mode():
            return self.net(*self._inputs(ids, content, born))[-1].double().numpy()

    def fit(self, round: int, content: np.ndarray, born: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        """Evaluate the items closed since the last fit (held out), then train on every closed item
        (the newest ``max_items``). Returns the held-out figures (empty before the first fit, or when
        fewer than 3 new items closed)."""
        cfg = self.cfg
        ids, outcome = self.outcomes(round, born)
        fresh = ~self.evaluated[ids]
        figures: dict[str, float] = {}
        if self.fits and fresh.sum() >= 3:
            figures = evaluate(self.scores(ids[fresh], content, born), outcome[fresh])
        self.evaluated[ids] = True
        self.last, self.fitted_round = figures, round
        if len(ids) < 2:
            return figures
        order = np.argsort(born[ids], kind="stable")[-cfg.max_items:]
        ids, outcome = ids[order], outcome[order]
        item, neighbours, present = self._inputs(ids, content, born)
        y = torch.as_tensor(outcome, dtype=torch.float32)
        taus = torch.as_tensor(temperatures(cfg.steps, cfg.tau_max, cfg.tau_min), dtype=torch.float32)
        standard = (y - y.mean()) / y.std().clamp_min(1e-6)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        self.net.train()
        for _ in range(cfg.epochs):
            for batch in torch.randperm(len(ids), generator=generator).split(cfg.batch_size):
                if len(batch) < 2:
                    continue
                s = self.net(item[batch], neighbours[batch], present[batch])
                if cfg.loss == "listmle":
                    loss = listmle(s, y[batch], taus) / len(batch)
                else:
                    loss = ((s[-1] - standard[batch]) ** 2).mean()
                self.optimiser.zero_grad(set_to_none=True)
                loss.backward()
                self.optimiser.step()
        self.fits += 1
        return figures


def evaluate(predicted: np.ndarray, realised: np.ndarray) -> dict[str, float]:
    """NDCG@10 of the predicted order with the realised outcomes (min-max scaled) as gains, and the
    Spearman and Kendall rank correlations (nan when either side is constant)."""
    from scipy import stats  # here, not at import: scipy.stats costs every run ~0.4 s of start-up

    lo, hi = realised.min(), realised.max()
    gains = (realised - lo) / (hi - lo) if hi > lo else np.ones_like(realised)
    ranked = gains[np.argsort(-predicted, kind="stable")][None]
    ideal = np.sort(gains)[::-1][None]
    constant = np.ptp(predicted) == 0 or hi == lo
    return {"evaluator/ndcg@10": ndcg_at_k(ranked, ideal, 10),
            "evaluator/spearman": float("nan") if constant else float(stats.spearmanr(predicted, realised)[0]),
            "evaluator/kendall": float("nan") if constant else float(stats.kendalltau(predicted, realised)[0]),
            "evaluator/n": float(len(realised))}
