"""Synthetic world generator (DESIGN section 4): items, users and a social graph.

Items live around category centres: a top-level centre per category, a sub-centre per
subcategory, and the item's true vector ``phi_i`` near its sub-centre, all unit norm. Users' tastes
mix one or two category centres. Structured attributes (brand, price band, features) are drawn
per item and rendered into a title, so language-model agents and reports have real text to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from agorasim.config import MarketConfig, UserAgentsConfig

N_FEATURES = 12
FEATURES = ("durable", "lightweight", "waterproof", "eco-friendly", "compact", "rechargeable",
            "heavy-duty", "ergonomic", "certified", "quiet", "fast-setup", "long-warranty")
PRICE_BANDS = ("budget", "value", "standard", "premium", "luxury")
CATEGORY_NOUNS = (
    ("Drill", "Saw", "Sander", "Router"), ("Kettle", "Blender", "Toaster", "Mixer"),
    ("Tent", "Backpack", "Lantern", "Stove"), ("Headphones", "Speaker", "Charger", "Cable"),
    ("Notebook", "Pen Set", "Planner", "Marker"), ("Sneakers", "Jacket", "Gloves", "Cap"),
    ("Yoga Mat", "Dumbbell", "Jump Rope", "Foam Roller"), ("Filament", "Resin", "Nozzle", "Build Plate"),
)
BRAND_SYLLABLES = ("Ak", "Bel", "Cor", "Dun", "Ev", "Fal", "Gor", "Hal", "Ist", "Jun", "Kel", "Lor",
                   "Mav", "Nor", "Orr", "Pel", "Quin", "Ros", "Sul", "Tor", "Ul", "Vex", "Wyn", "Zed")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def brand_name(provider: int) -> str:
    s = BRAND_SYLLABLES
    return s[provider % len(s)] + s[(provider // len(s) + 7) % len(s)].lower() + (
        str(provider // (len(s) ** 2)) if provider >= len(s) ** 2 else "")


def category_noun(top: int, sub: int) -> str:
    if top < len(CATEGORY_NOUNS) and sub < len(CATEGORY_NOUNS[top]):
        return CATEGORY_NOUNS[top][sub]
    return f"Item type {top}.{sub}"


def render_title(provider: int, top: int, sub: int, price_band: int, features: int) -> str:
    """A catalogue title from structured attributes, e.g. 'Akcor premium Drill, durable, quiet'."""
    claims = [FEATURES[f] for f in range(N_FEATURES) if features >> f & 1][:3]
    return f"{brand_name(provider)} {PRICE_BANDS[price_band]} {category_noun(top, sub)}" + (
        ", " + ", ".join(claims) if claims else "")


@dataclass
class WorldSpec:
    """The latent geometry new items and users are drawn from (fixed for a run)."""

    top_centres: np.ndarray  # (n_categories, d)
    sub_centres: np.ndarray  # (n_categories, n_subcategories, d)
    provider_home: np.ndarray  # (n_providers,) home top category of each provider
    feature_rates: np.ndarray | None = None  # (n_categories, n_subcategories, F) with market.features=category

    @classmethod
    def sample(cls, rng: np.random.Generator, cfg: MarketConfig) -> WorldSpec:
        top = _unit(rng.normal(size=(cfg.n_categories, cfg.dim)))
        sub = _unit(top[:, None, :] + 0.6 * rng.normal(size=(cfg.n_categories, cfg.n_subcategories, cfg.dim))
                    / np.sqrt(cfg.dim) * np.sqrt(cfg.dim) / 2)
        home = rng.integers(0, cfg.n_categories, cfg.n_providers)
        rates = feature_rates(rng, cfg.n_categories, cfg.n_subcategories) if cfg.features == "category" else None
        return cls(top, sub, home, rates)

    def add_providers(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Register ``count`` new providers; returns their ids."""
        start = len(self.provider_home)
        self.provider_home = np.concatenate(
            [self.provider_home, rng.integers(0, len(self.top_centres), count)])
        return np.arange(start, start + count)


def feature_rates(rng: np.random.Generator, n_top: int, n_sub: int) -> np.ndarray:
    """(n_top, n_sub, F) feature rates of each subcategory for ``market.features=category``: each
    feature common (0.8) or rare (0.05) in a subcategory, common with probability 0.3, so the mean
    rate stays near the independent world's 0.3 while similar items share their features."""
    return np.where(rng.random((n_top, n_sub, N_FEATURES)) < 0.3, 0.8, 0.05)


def sample_items(rng: np.random.Generator, spec: WorldSpec, providers: np.ndarray) -> dict:
    """Columns for one new item per entry of ``providers`` (Catalogue.add keyword arguments).

    Providers mostly list items in their home category (80%), sometimes elsewhere.
    """
    count = len(providers)
    n_top, n_sub, dim = spec.sub_centres.shape
    home = spec.provider_home[providers]
    top = np.where(rng.random(count) < 0.8, home, rng.integers(0, n_top, count))
    sub = rng.integers(0, n_sub, count)
    embedding = _unit(spec.sub_centres[top, sub] + 0.35 * rng.normal(size=(count, dim)) / np.sqrt(dim) * 2)
    price_band = rng.integers(0, len(PRICE_BANDS), count)
    # each feature present with probability 0.3 (or its subcategory's rate), as a bit mask
    rate = 0.3 if spec.feature_rates is None else spec.feature_rates[top, sub]
    features = (rng.random((count, N_FEATURES)) < rate) @ (1 << np.arange(N_FEATURES))
    quality = rng.normal(0.0, 0.5, count).astype(np.float32)
    titles = [render_title(int(p), int(t), int(s), int(b), int(f))
              for p, t, s, b, f in zip(providers, top, sub, price_band, features)]
    return dict(
        titles=titles, embedding=embedding, quality=quality, provider=providers.astype(np.int64),
        category=np.stack([top, sub], 1).astype(np.int64), brand=providers.astype(np.int64),
        price_band=price_band.astype(np.int64), features=features.astype(np.int64),
    )


def sample_users(rng: np.random.Generator, spec: WorldSpec, count: int, cfg: UserAgentsConfig,
                 taste_anchor: np.ndarray | None = None) -> dict:
    """Columns for ``count`` new users (Population.add keyword arguments).

    Taste mixes one or two category centres (or ``taste_anchor`` rows, e.g. the mean of a real
    user's history) with noise, scaled to ``cfg.taste_scale``.
    """
    n_top, _, dim = spec.sub_centres.shape
    if taste_anchor is None:
        first = spec.top_centres[rng.integers(0, n_top, count)]
        second = spec.top_centres[rng.integers(0, n_top, count)]
        mix = rng.random((count, 1)) * (rng.random((count, 1)) < 0.5)  # half the users single-minded
        taste_anchor = (1 - 0.5 * mix) * first + 0.5 * mix * second
    taste = cfg.taste_scale * _unit(taste_anchor + 0.3 * rng.normal(size=(count, dim)) / np.sqrt(dim) * 2)
    exp_draw = lambda mean: rng.exponential(mean, count).astype(np.float32) if mean > 0 else np.zeros(count, np.float32)  # noqa: E731
    activity_shape = 2.0  # Beta(2, 2(1-m)/m) has mean m: a few heavy users, many light ones
    if cfg.activity >= 1:  # everyone visits every round
        activity = np.ones(count)
    else:
        activity = rng.beta(activity_shape, activity_shape * (1 - cfg.activity) / cfg.activity, count)
    return dict(
        taste=taste, activity=activity.astype(np.float32),
        conformity=exp_draw(cfg.conformity), social=exp_draw(cfg.social), novelty=exp_draw(cfg.novelty),
        trust=np.full(count, cfg.trust, np.float32),
        patience=np.maximum(1, rng.poisson(cfg.patience, count)).astype(np.int64),
        satisfaction=np.zeros(count, np.float32), fatigue=np.zeros(count, np.int64),
        active=np.ones(count, bool),
    )


def social_edges(rng: np.random.Generator, n_users: int, cfg: MarketConfig) -> np.ndarray:
    """Undirected friendship edges (E, 2) from a networkx generator, seeded from ``rng``."""
    if cfg.social_graph == "none" or n_users < 3:
        return np.zeros((0, 2), np.int64)
    seed = int(rng.integers(2**31))
    degree = min(cfg.social_degree, n_users - 1)
    if cfg.social_graph == "watts-strogatz":
        graph = nx.watts_strogatz_graph(n_users, max(2, degree - degree % 2), cfg.social_rewire, seed=seed)
    else:
        graph = nx.barabasi_albert_graph(n_users, max(1, degree // 2), seed=seed)
    edges = np.array(graph.edges(), dtype=np.int64).reshape(-1, 2)
    return edges


def attach_users(rng: np.random.Generator, new_users: np.ndarray, n_existing: int, degree: int) -> np.ndarray:
    """Edges for arriving users: each befriends ``degree // 2`` uniformly drawn earlier users."""
    per_user = max(1, degree // 2)
    if n_existing == 0 or len(new_users) == 0:
        return np.zeros((0, 2), np.int64)
    friends = rng.integers(0, n_existing, (len(new_users), per_user))
    return np.stack([np.repeat(new_users, per_user), friends.ravel()], 1).astype(np.int64)
