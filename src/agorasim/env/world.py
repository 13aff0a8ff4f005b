"""The world: catalogue, population, social graph and the interaction log, plus the derived
quantities every role reads (popularity, freshness, social proof, user profiles)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from agorasim.data.synthetic import WorldSpec
from agorasim.env.state import Catalogue, InteractionLog, Population


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class World:
    """Everything that exists in the market, as arrays.

    Attributes:
        catalogue: items (grows with arrivals).
        population: users (grows with arrivals).
        spec: latent geometry new synthetic items and users are drawn from.
        edges: (E, 2) undirected friendships.
        log: every impression served.
        round: the current round (starts at 0).
        new_item_horizon: rounds an item counts as new.
        novelty_halflife: rounds for an item's freshness to halve.
        social_window: rounds of friends' clicks that count as social proof.
    """

    catalogue: Catalogue
    population: Population
    spec: WorldSpec
    edges: np.ndarray
    log: InteractionLog = field(default_factory=InteractionLog)
    round: int = 0
    new_item_horizon: int = 10
    novelty_halflife: float = 10.0
    social_window: int = 5
    reserve: dict | None = None  # real-data items not yet listed (Amazon arrivals)
    _friends: sp.csr_matrix | None = None
    _recent: sp.csr_matrix | None = None

    # -- items -----------------------------------------------------------------------------
    def popularity(self) -> np.ndarray:
        """Clicks received so far, per item (all items, dead included)."""
        return self.catalogue.view("interactions")

    def age(self, items: np.ndarray) -> np.ndarray:
        return self.round - self.catalogue.born[items]

    def freshness(self, items: np.ndarray) -> np.ndarray:
        """``0.5 ** (age / halflife)``: 1 for a brand-new item (novelty term of utility)."""
        return np.exp2(-self.age(items) / self.novelty_halflife)

    def is_new(self) -> np.ndarray:
        """(n_items,) item arrived within the new-item horizon (initial catalogue excluded)."""
        born = self.catalogue.view("born")
        return (born > 0) & (self.round - born < self.new_item_horizon)

    # -- users -----------------------------------------------------------------------------
    def profiles(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the platform knows of each user: the mean content vector of their history
        (unit norm) and whether they have any history."""
        history = self.population.history[users]
        valid = history >= 0
        content = self.catalogue.content[np.maximum(history, 0)] * valid[..., None]
        return unit_rows(content.sum(1)), valid.any(1)

    def add_edges(self, edges: np.ndarray) -> None:
        self.edges = np.concatenate([self.edges, edges])
        self._friends = None

    def friend_matrix(self) -> sp.csr_matrix:
        """Row-normalised adjacency (users x users), rebuilt only when friendships change."""
        n = self.population.n
        if self._friends is None or self._friends.shape[0] != n:
            e = self.edges
            rows = np.concatenate([e[:, 0], e[:, 1]])
            cols = np.concatenate([e[:, 1], e[:, 0]])
            adj = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
            adj.data[:] = 1.0  # duplicate edges count once
            degree = np.asarray(adj.sum(1)).ravel()
            self._friends = sp.diags(1.0 / np.maximum(degree, 1.0)).astype(np.float32) @ adj
        return self._friends

    def refresh_social(self) -> None:
        """Recent clicks (users x items) over the social window, rebuilt once per round."""
        clicks = self.log.arrays(since_round=self.round - self.social_window)
        m = clicks["click"] > 0
        shape = (self.population.n, self.catalogue.n)
        recent = sp.csr_matrix((np.ones(int(m.sum()), np.float32), (clicks["user"][m], clicks["item"][m])), shape=shape)
        recent.data[:] = 1.0
        self._recent = recent

    def _friends_clicks(self, users: np.ndarray) -> sp.csr_matrix | None:
        """(B, n_items) share of each user's friends who clicked each item recently (sparse)."""
        if self._recent is None or self._recent.shape != (self.population.n, self.catalogue.n):
            self.refresh_social()
        if self._recent.nnz == 0 or len(self.edges) == 0:
            return None
        return (self.friend_matrix()[users] @ self._recent).tocsr()

    def social_matrix(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Dense (B, n) social proof of every item in ``items`` (n,) for every user."""
        proof = self._friends_clicks(users)
        if proof is None:
            return np.zeros((len(users), len(items)), np.float32)
        return proof[:, items].toarray()

    def social_proof(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Share of each user's friends who clicked the item within the social window."""
        proof = self._friends_clicks(users)
        if proof is None:
            return np.zeros(items.shape, np.float32)
        rows = np.repeat(np.arange(len(users)), items.shape[1])
        values = np.asarray(proof[rows, np.maximum(items, 0).ravel()]).reshape(items.shape)
        return np.where(items >= 0, values, 0.0).astype(np.float32)
