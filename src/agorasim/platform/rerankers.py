"""Re-rankers: the platform agent's ways of building the K-item slate from the policy's K'.

All of them work on the whole batch of users at once: a loop over the K slate positions, never
over users, and return the chosen *columns* of the candidate block (``Reranker.rerank``), so
whatever travels with a candidate (its promotion, its score) is found by the same index. Padding
candidates (-1, relevance -inf) are never selected; a row with fewer than K real candidates ends
in -1.

* ``NoRerank`` keeps the policy's order (the trivial implementation).
* ``TriRecReranker`` greedily trades relevance against exposure fairness between popularity
  groups, weighted by the items' expected utility (TriRec style, see DESIGN.md section 6).
* ``ControllerReranker`` moves TriRec's fairness weight each round to hold exposure Gini at a
  target.
* ``MMRReranker`` trades relevance against similarity to the slate so far (diversity).
* ``NewItemBoost`` lifts recently arrived items.
"""

from __future__ import annotations

import numpy as np

from agorasim.platform.base import Reranker, RerankRequest

# Below this relative spread a row of scores counts as constant: terms that are equal in exact
# arithmetic (e.g. the fairness gain of two groups under a uniform state) differ by rounding
# noise, and min-max normalisation would blow that noise up to a 0-vs-1 difference.
_CONSTANT_TOL = 1e-12

# Floor of the normalised expected item utility, so EIU ** l_item stays positive and the worst
# item of a row still keeps its relevance and fairness terms (they are multiplied, not added).
_EIU_FLOOR = 1e-3


def _check(name: str, value: float, low: float = 0.0, high: float = np.inf) -> float:
    """Return ``value`` as float, or raise a one-line ValueError naming the parameter."""
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _minmax(x: np.ndarray, mask: np.ndarray, constant: float = 0.0) -> np.ndarray:
    """Min-max normalise each row of ``x`` over its ``mask`` entries into [0, 1].

    Rows whose masked values are (numerically) all equal get ``constant``; entries outside the
    mask are 0.
    """
    x = np.where(mask, x, 0.0)
    lo = np.where(mask, x, np.inf).min(axis=1, keepdims=True)
    hi = np.where(mask, x, -np.inf).max(axis=1, keepdims=True)
    any_valid = np.isfinite(lo)
    lo = np.where(any_valid, lo, 0.0)
    hi = np.where(any_valid, hi, 0.0)
    span = hi - lo
    spread = span > _CONSTANT_TOL * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
    normalised = (x - lo) / np.where(spread, span, 1.0)
    return np.where(mask, np.where(spread, normalised, constant), 0.0)


def _top_k(candidates: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row's top-k ``candidates`` by ``scores`` (padding -inf, last; -1 where a
    row has fewer than k real candidates); ties keep column order."""
    scores = np.where(candidates >= 0, scores, -np.inf)
    k_eff = min(k, candidates.shape[1])
    # stable sort keeps the policy's order among ties, so the result is deterministic
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    columns = np.where(np.isfinite(np.take_along_axis(scores, order, axis=1)), order, -1)
    return _pad_columns(columns, k)


def _pad_columns(columns: np.ndarray, k: int) -> np.ndarray:
    """Pad (B, k') columns with -1 on the right to (B, k), as int64."""
    columns = columns.astype(np.int64, copy=False)
    if columns.shape[1] < k:
        columns = np.pad(columns, ((0, 0), (0, k - columns.shape[1])), constant_values=-1)
    return columns


def _position_weight(pos: int) -> float:
    """DCG position weight 1/log2(pos+2) of slate position ``pos`` (0 = top); the same weight the
    ledger records as exposure."""
    return 1.0 / np.log2(pos + 2.0)


class NoRerank(Reranker):
    """The policy's slate unchanged: the first k real candidates in policy order."""

    name = "none"

    def rerank(self, request: RerankRequest) -> np.ndarray:
        candidates = np.asarray(request.candidates)
        # all scores equal: the stable sort keeps the policy's order, padding goes last
        return _top_k(candidates, np.zeros(candidates.shape), request.k)


class TriRecReranker(Reranker):
    """Greedy relevance/fairness/item-utility re-ranking, position by position (TriRec style).

    At slate position ``pos`` with weight ``w = 1/log2(pos+2)`` every remaining candidate j of
    group g_j is scored

        [a_pos * rel_j + (1 - a_pos) * fairness_weight * (lambda_dgu * dDGU_j
                                                        + lambda_mgu * dMGU_j)] * EIU_j ** l_item

    with ``a_pos = a_min + (a_max - a_min) * (w(pos) / w(0)) ** p`` (relevance dominates the top
    positions, where exposure is largest). The exposure state E (G,) is the ledger's windowed
    group exposure (the same for every user of the round) plus the exposure of this user's slate
    so far; shares s = E / sum(E) (uniform when sum(E) = 0), and s'_j the shares after adding w
    to g_j. ``dDGU_j = |s - t|_1 - |s'_j - t|_1`` is how much j shrinks the L1 gap to the target
    shares t; ``dMGU_j`` is the same for the group g* with the largest gap only. rel, dDGU, dMGU
    are min-max normalised over the row's remaining candidates (constant rows give 0); EIU into
    [1e-3, 1] (constant rows give 1, a neutral factor). The highest score wins; ties go to the
    earliest candidate column, i.e. the policy's order.

    Args:
        a_min: relevance weight at the deepest positions, in [0, 1].
        a_max: relevance weight at the top position, in [a_min, 1].
        p: how fast the relevance weight decays with the position weight (>= 0; 0 keeps a_max).
        lambda_dgu: weight of the all-groups gap term dDGU (>= 0).
        lambda_mgu: weight of the worst-group gap term dMGU (>= 0).
        l_item: exponent of the expected item utility (>= 0; 0 ignores item utility).
        fairness_weight: multiplier of the fairness terms (>= 0); a controller may change the
            attribute between rounds. 0 reduces the score to rel * EIU ** l_item.
    """

    name = "trirec"
    uses_item_utility = True

    def __init__(self, a_min: float = 0.2, a_max: float = 1.0, p: float = 1.0,
                 lambda_dgu: float = 0.5, lambda_mgu: float = 0.5, l_item: float = 0.5,
                 fairness_weight: float = 1.0):
        self.a_min = _check("a_min", a_min, 0.0, 1.0)
        self.a_max = _check("a_max", a_max, self.a_min, 1.0)
        self.p = _check("p", p)
        self.lambda_dgu = _check("lambda_dgu", lambda_dgu)
        self.lambda_mgu = _check("lambda_mgu", lambda_mgu)
        self.l_item = _check("l_item", l_item)
        self.fairness_weight = _check("fairness_weight", fairness_weight)

    def relevance_weight(self, pos: int) -> float:
        """a_pos: the share of the score given to relevance at slate position ``pos``."""
        # w(0) = 1/log2(2) = 1, so w(pos)/w(0) = w(pos)
        return self.a_min + (self.a_max - self.a_min) * _position_weight(pos) ** self.p

    def rerank(self, request: RerankRequest) -> np.ndarray:
        candidates = np.asarray(request.candidates)
        n_users, n_candidates = candidates.shape
        valid = candidates >= 0
        candidate_group = np.asarray(request.groups)[np.where(valid, candidates, 0)]
        target = np.asarray(request.target, dtype=np.float64)
        n_groups = target.shape[0]
        round_exposure = np.asarray(request.group_exposure, dtype=np.float64)
        relevance = np.where(valid, request.relevance, 0.0).astype(np.float64)
        item_utility = np.where(valid, request.item_utility, 0.0).astype(np.float64)

        rows = np.arange(n_users)
        remaining = valid.copy()
        slate_exposure = np.zeros((n_users, n_groups))  # this user's slate so far, per group
        columns = np.full((n_users, request.k), -1, dtype=np.int64)
        for pos in range(min(request.k, n_candidates)):
            w = _position_weight(pos)
            a = self.relevance_weight(pos)
            d_dgu, d_mgu = self._fairness_gains(round_exposure + slate_exposure, target,
                                                candidate_group, w)
            fairness = self.lambda_dgu * _minmax(d_dgu, remaining) \
                + self.lambda_mgu * _minmax(d_mgu, remaining)
            utility = _EIU_FLOOR + (1.0 - _EIU_FLOOR) * _minmax(item_utility, remaining, 1.0)
            score = (a * _minmax(relevance, remaining)
                     + (1.0 - a) * self.fairness_weight * fairness) * utility ** self.l_item
            score = np.where(remaining, score, -np.inf)

            pick = score.argmax(axis=1)  # first maximum: ties keep the policy's order
            has = remaining[rows, pick]
            columns[:, pos] = np.where(has, pick, -1)
            picked_rows, picked_cols = rows[has], pick[has]
            remaining[picked_rows, picked_cols] = False
            # one pick per row, so plain fancy-index += adds exactly once
            slate_exposure[picked_rows, candidate_group[picked_rows, picked_cols]] += w
        return columns

    @staticmethod
    def _fairness_gains(exposure: np.ndarray, target: np.ndarray, candidate_group: np.ndarray,
                        w: float) -> tuple[np.ndarray, np.ndarray]:
        """dDGU and dMGU (B, K') of adding exposure ``w`` to each candidate's group.

        Args:
            exposure: (B, G) current group exposure E per user.
            target: (G,) target shares t.
            candidate_group: (B, K') group of every candidate.
            w: position weight of the slot being filled.
        """
        n_groups = target.shape[0]
        total = exposure.sum(axis=1, keepdims=True)
        share = np.where(total > 0, exposure / np.where(total > 0, total, 1.0), 1.0 / n_groups)
        gap = np.abs(share - target)  # (B, G)

        # after adding w to group g_j, every group's share is E/(T+w) except g_j's, (E+w)/(T+w);
        # so the new L1 gap is the "elsewhere" gap sum corrected at g_j only: O(B*G + B*K')
        # instead of materialising (B, K', G)
        gap_elsewhere = np.abs(exposure / (total + w) - target)
        gap_own = np.abs((exposure + w) / (total + w) - target)
        correction = np.take_along_axis(gap_own - gap_elsewhere, candidate_group, axis=1)
        l1_after = gap_elsewhere.sum(axis=1, keepdims=True) + correction
        d_dgu = gap.sum(axis=1, keepdims=True) - l1_after

        worst = gap.argmax(axis=1)[:, None]  # g*, the group with the largest gap
        worst_gap = np.take_along_axis(gap, worst, axis=1)
        worst_after = np.where(candidate_group == worst,
                               np.take_along_axis(gap_own, worst, axis=1),
                               np.take_along_axis(gap_elsewhere, worst, axis=1))
        d_mgu = worst_gap - worst_after
        return d_dgu, d_mgu


class ControllerReranker(Reranker):
    """TriRec whose fairness weight is steered each round to hold exposure Gini at a target.

    After every round ``end_round`` reads ``metrics["exposure/gini"]`` and steps

        weight <- clip(weight + gain * (gini - target_gini), min_weight, max_weight)

    More fairness when exposure is more concentrated than the target, less when it is below, so
    the platform gives up only as much relevance as it needs. The weight accumulates the error
    (an integral controller written in incremental form, the proportional step acting on the
    change), so it comes to rest only where Gini meets the target, with no steady offset, or at
    a bound; the clip also stops wind-up while the target is out of reach.

    Args:
        target_gini: exposure Gini to hold, in [0, 1].
        gain: weight change per unit of Gini error per round (>= 0).
        min_weight: lower bound of the fairness weight (>= 0).
        max_weight: upper bound of the fairness weight (>= min_weight).
        initial_weight: fairness weight of the first round, in [min_weight, max_weight].
        **trirec_params: the other ``TriRecReranker`` parameters (not ``fairness_weight``).

    Attributes:
        trirec: the wrapped re-ranker; its ``fairness_weight`` is the controlled variable.
        weight_history: the weight after each ``end_round`` (initial weight first).
    """

    name = "controller"
    uses_item_utility = True
    forwards_to = TriRecReranker  # where **trirec_params go (read by make_reranker's checks)

    def __init__(self, target_gini: float = 0.5, gain: float = 2.0, min_weight: float = 0.0,
                 max_weight: float = 4.0, initial_weight: float = 1.0, **trirec_params):
        if "fairness_weight" in trirec_params:
            raise ValueError("controller takes initial_weight, not fairness_weight")
        self.target_gini = _check("target_gini", target_gini, 0.0, 1.0)
        self.gain = _check("gain", gain)
        self.min_weight = _check("min_weight", min_weight)
        self.max_weight = _check("max_weight", max_weight, self.min_weight)
        weight = _check("initial_weight", initial_weight, self.min_weight, self.max_weight)
        self.trirec = TriRecReranker(fairness_weight=weight, **trirec_params)
        self.weight_history: list[float] = [weight]

    @property
    def fairness_weight(self) -> float:
        """The current fairness weight of the wrapped TriRec."""
        return self.trirec.fairness_weight

    def rerank(self, request: RerankRequest) -> np.ndarray:
        return self.trirec.rerank(request)

    def end_round(self, metrics: dict[str, float]) -> None:
        """Step the fairness weight toward the Gini target (a NaN Gini leaves it unchanged)."""
        if "exposure/gini" not in metrics:
            raise KeyError("controller re-ranker needs the metric 'exposure/gini' in end_round")
        gini = float(metrics["exposure/gini"])
        if np.isfinite(gini):
            weight = self.fairness_weight + self.gain * (gini - self.target_gini)
            self.trirec.fairness_weight = float(np.clip(weight, self.min_weight, self.max_weight))
        self.weight_history.append(self.fairness_weight)


class MMRReranker(Reranker):
    """Maximal marginal relevance (Carbonell & Goldstein, 1998), greedily per position.

    score_j = lambda_ * rel_j - (1 - lambda_) * max_{i in slate} cos(e_j, e_i), where rel is
    min-max normalised over the row's real candidates (constant rows give 0) and the similarity
    term is 0 while the slate is empty. Ties go to the earliest candidate column.

    Args:
        lambda_: relevance weight in [0, 1]; 1 is the policy's order, 0 pure diversity.
    """

    name = "mmr"

    # bound on B_chunk * K' * d floats held at once (about 128 MB in float64)
    _max_chunk_elements = 16_000_000

    def __init__(self, lambda_: float = 0.7):
        self.lambda_ = _check("lambda_", lambda_, 0.0, 1.0)

    def rerank(self, request: RerankRequest) -> np.ndarray:
        candidates = np.asarray(request.candidates)
        embedding = np.asarray(request.embedding, dtype=np.float64)
        norms = np.linalg.norm(embedding, axis=1, keepdims=True)
        unit = embedding / np.where(norms > 0, norms, 1.0)  # zero vectors: similarity 0
        n_users, n_candidates = candidates.shape
        # rows in chunks so the (rows, K', d) candidate vectors stay bounded
        chunk = max(1, self._max_chunk_elements // max(1, n_candidates * unit.shape[1]))
        columns = [self._rerank_rows(candidates[start:start + chunk],
                                     np.asarray(request.relevance)[start:start + chunk],
                                     unit, request.k)
                   for start in range(0, n_users, chunk)]
        if not columns:
            return np.full((0, request.k), -1, dtype=np.int64)
        return np.concatenate(columns, axis=0)

    def _rerank_rows(self, candidates: np.ndarray, relevance: np.ndarray, unit: np.ndarray,
                     k: int) -> np.ndarray:
        n_users, n_candidates = candidates.shape
        valid = candidates >= 0
        # (B, K', d); padding gets item 0's vector, harmless: it is never picked and its
        # similarity is never read
        vectors = unit[np.where(valid, candidates, 0)]
        relevance = _minmax(np.where(valid, relevance, 0.0).astype(np.float64), valid)

        rows = np.arange(n_users)
        remaining = valid.copy()
        max_similarity = np.zeros((n_users, n_candidates))
        columns = np.full((n_users, k), -1, dtype=np.int64)
        for pos in range(min(k, n_candidates)):
            score = self.lambda_ * relevance - (1.0 - self.lambda_) * max_similarity
            score = np.where(remaining, score, -np.inf)
            pick = score.argmax(axis=1)
            has = remaining[rows, pick]
            columns[:, pos] = np.where(has, pick, -1)
            remaining[rows[has], pick[has]] = False
            similarity = np.einsum("bkd,bd->bk", vectors, vectors[rows, pick])
            if pos == 0:
                max_similarity = np.where(has[:, None], similarity, 0.0)
            else:
                max_similarity = np.where(has[:, None], np.maximum(max_similarity, similarity),
                                          max_similarity)
        return columns


class NewItemBoost(Reranker):
    """Lifts new items: top k by min-max normalised relevance + a bonus for new items.

    Relevance is normalised over the row's real candidates (constant rows give 0), so the bonus
    is in units of the row's relevance range: 1 puts any new item level with the best old one.
    Ties keep the policy's order.

    ``score="age"``: every new item gets ``boost``. ``score="evaluator"``: the new items the
    evaluator has scored (``request.item_prior``) share the same mean bonus by rank, the new item
    ranked r-th of n from the worst getting ``2 boost (r + 1/2) / n`` (from ``boost / n`` to
    ``2 boost - boost / n``); new items without a score get ``boost``.

    Args:
        boost: mean score added to new candidates (>= 0).
        score: ``age`` or ``evaluator``.
    """

    name = "new-item-boost"

    def __init__(self, boost: float = 0.5, score: str = "age"):
        self.boost = _check("boost", boost)
        if score not in ("age", "evaluator"):
            raise ValueError(f"new-item-boost: score must be age or evaluator, got {score!r}")
        self.score = score

    def bonus(self, request: RerankRequest) -> np.ndarray:
        """(n_items,) the bonus of every item (0 for old ones)."""
        is_new = np.asarray(request.is_new, dtype=bool)
        bonus = np.where(is_new, self.boost, 0.0)
        prior = request.item_prior
        if self.score == "evaluator" and prior is not None:
            scored = np.flatnonzero(is_new & np.isfinite(prior))
            if len(scored):
                rank = np.empty(len(scored))
                rank[np.argsort(prior[scored], kind="stable")] = np.arange(len(scored))
                bonus[scored] = 2 * self.boost * (rank + 0.5) / len(scored)
        return bonus

    def rerank(self, request: RerankRequest) -> np.ndarray:
        candidates = np.asarray(request.candidates)
        valid = candidates >= 0
        relevance = np.where(valid, request.relevance, 0.0).astype(np.float64)
        bonus = np.where(valid, self.bonus(request)[np.where(valid, candidates, 0)], 0.0)
        score = _minmax(relevance, valid) + bonus
        return _top_k(candidates, score, request.k)
