"""Matrix factorisation trained with Bayesian personalised ranking (BPR), in numpy.

Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from Implicit Feedback", eq. 4 with an
item bias: for a click (u, i) and an item j drawn uniformly from the items alive at refit,

    x_uij = p_u . (q_i - q_j) + b_i - b_j,    loss = -ln sigmoid(x_uij) + reg/2 (|p_u|^2 + |q_i|^2 + |q_j|^2)

Mini-batch SGD with per-row Adagrad step sizes: the gradient of each triple is computed in closed
form, summed per touched row and applied to those rows only, so a step costs O(batch) whatever the
table sizes, and an item that appears many times in a batch cannot take a huge step. Parameters
are warm-started from the previous refit; the Adagrad accumulators start fresh at every refit so
late refits can still move. The tables grow as users and items arrive.
"""

from __future__ import annotations

import numpy as np

from agorasim.policy.baselines import RefittingPolicy
from agorasim.policy.observation import CatalogueView, LogView
from agorasim.policy.params import BPRParams

_SCORE_CHUNK = 4096  # users scored at once; bounds the (B, C, dim) gather to ~50 MB at C=100


def _adagrad_step(table: np.ndarray, accum: np.ndarray, rows: np.ndarray, grads: np.ndarray,
                  lr: float) -> None:
    """Sum ``grads`` per distinct row of ``rows``, then take an Adagrad step on those rows in place."""
    unique, inverse = np.unique(rows, return_inverse=True)
    summed = np.zeros((len(unique),) + grads.shape[1:], np.float32)
    np.add.at(summed, inverse, grads)
    accum[unique] += summed * summed
    table[unique] -= lr * summed / (np.sqrt(accum[unique]) + 1e-8)


class BPRPolicy(RefittingPolicy):
    """BPR matrix factorisation over click pairs; negatives are items alive at refit.

    A user with no row yet (arrived after the last refit) is scored by item bias alone; an item
    with no row yet scores 0 until the next refit.

    Args:
        refit_every: rounds between refits (>= 1).
        dim: latent factors per user and item.
        lr: Adagrad step size (the first step of a row moves each coordinate by about ``lr``).
        reg: L2 weight on the factors of each sampled triple (per triple, as in the paper).
        epochs: passes over all clicks per refit.
        batch_size: triples per step.
        init_std: standard deviation of the factors of new users and items.
    """

    name = "bpr"
    Params = BPRParams

    def __init__(self, refit_every: int = 5, dim: int = 32, lr: float = 0.05, reg: float = 1e-3,
                 epochs: int = 10, batch_size: int = 1024, init_std: float = 0.1):
        super().__init__(refit_every)
        for field, value in (("dim", dim), ("epochs", epochs), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if lr <= 0 or reg < 0 or init_std < 0:
            raise ValueError(f"need lr > 0, reg >= 0, init_std >= 0; got {lr=}, {reg=}, {init_std=}")
        self.dim, self.lr, self.reg = int(dim), float(lr), float(reg)
        self.epochs, self.batch_size, self.init_std = int(epochs), int(batch_size), float(init_std)
        self.user_factors = np.zeros((0, self.dim), np.float32)  # p_u
        self.item_factors = np.zeros((0, self.dim), np.float32)  # q_i
        self.item_bias = np.zeros(0, np.float32)  # b_i

    def _grow(self, n_users: int, n_items: int, rng: np.random.Generator) -> None:
        """Add rows for new users and items: small random factors, zero bias."""

        def new_rows(count: int) -> np.ndarray:
            return (self.init_std * rng.standard_normal((count, self.dim))).astype(np.float32)

        if n_users > len(self.user_factors):
            added = n_users - len(self.user_factors)
            self.user_factors = np.concatenate([self.user_factors, new_rows(added)])
        if n_items > len(self.item_factors):
            added = n_items - len(self.item_factors)
            self.item_factors = np.concatenate([self.item_factors, new_rows(added)])
            self.item_bias = np.concatenate([self.item_bias, np.zeros(added, np.float32)])

    def fit(self, log: LogView, catalogue: CatalogueView, rng: np.random.Generator) -> dict[str, float]:
        # one draw from the policy's stream per refit, whatever the refit consumes
        rng = np.random.default_rng(int(rng.integers(2**31)))
        users, items, _ = log.clicks()
        users, items = users.astype(np.int64), items.astype(np.int64)
        self._grow(int(users.max()) + 1 if len(users) else 0, catalogue.n, rng)
        alive = catalogue.alive_ids()
        if len(users) == 0 or len(alive) == 0:
            return {}
        assert items.max() < catalogue.n, "a click names an item the catalogue does not have"

        P, Q, b = self.user_factors, self.item_factors, self.item_bias
        P_acc, Q_acc, b_acc = np.zeros_like(P), np.zeros_like(Q), np.zeros_like(b)
        n = len(users)
        for _ in range(self.epochs):
            order = rng.permutation(n)
            negatives = alive[rng.integers(len(alive), size=n)]
            loss_sum, correct = 0.0, 0
            for start in range(0, n, self.batch_size):
                batch = order[start:start + self.batch_size]
                u, i, j = users[batch], items[batch], negatives[start:start + self.batch_size]
                p_u, q_i, q_j = P[u], Q[i], Q[j]
                x = np.einsum("bd,bd->b", p_u, q_i - q_j) + b[i] - b[j]
                loss_sum += float(np.logaddexp(0.0, -x).sum())  # -ln sigmoid(x), overflow-safe
                correct += int((x > 0).sum())
                # d(-ln sigmoid(x))/dx = -sigmoid(-x); then the chain rule through x_uij
                g = (-0.5 * (1.0 - np.tanh(0.5 * x)))[:, None].astype(np.float32)  # -sigmoid(-x)
                _adagrad_step(P, P_acc, u, g * (q_i - q_j) + self.reg * p_u, self.lr)
                _adagrad_step(Q, Q_acc, np.concatenate([i, j]),
                              np.concatenate([g * p_u + self.reg * q_i, -g * p_u + self.reg * q_j]), self.lr)
                _adagrad_step(b, b_acc, np.concatenate([i, j]), np.concatenate([g[:, 0], -g[:, 0]]), self.lr)
        # the last epoch's numbers; pair_accuracy estimates the training AUC, P(x_uij > 0)
        return {"train/loss": loss_sum / n, "train/pair_accuracy": correct / n, "train/pairs": float(n)}

    def score(self, users: np.ndarray, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        n_users, n_items = len(self.user_factors), len(self.item_factors)
        scores = np.zeros(candidates.shape, np.float32)
        if n_items == 0:
            return scores
        known_item = (candidates >= 0) & (candidates < n_items)
        rows = np.where(known_item, candidates, 0)
        # a user without a row gets a zero vector, so its scores are the item biases alone
        user_vec = np.zeros((len(users), self.dim), np.float32)
        known_user = (users >= 0) & (users < n_users)
        user_vec[known_user] = self.user_factors[users[known_user]]
        for start in range(0, len(users), _SCORE_CHUNK):
            chunk = slice(start, start + _SCORE_CHUNK)
            affinity = np.einsum("bd,bcd->bc", user_vec[chunk], self.item_factors[rows[chunk]])
            scores[chunk] = affinity + self.item_bias[rows[chunk]]
        return np.where(known_item, scores, 0.0)
