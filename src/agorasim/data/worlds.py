"""Build the world a run starts from (synthetic or real Amazon) and grow it with arrivals."""

from __future__ import annotations

import numpy as np

from agorasim.config import Config, MarketConfig, UserAgentsConfig
from agorasim.data import synthetic
from agorasim.env.state import Catalogue, Population
from agorasim.env.world import World, unit_rows
from agorasim.errors import UserInputError


def _noisy(rng: np.random.Generator, embedding: np.ndarray, noise: float) -> np.ndarray:
    """Observable content vector: the true vector plus isotropic noise of norm ~``noise``."""
    dim = embedding.shape[1]
    return unit_rows(embedding + noise * rng.normal(size=embedding.shape) / np.sqrt(dim))


def _list_items(world: World, rng: np.random.Generator, cfg: MarketConfig, columns: dict) -> np.ndarray:
    count = len(columns["titles"])
    columns["content"] = _noisy(rng, columns["embedding"], cfg.content_noise)
    return world.catalogue.add(
        born=np.full(count, world.round), alive=np.ones(count, bool), interactions=np.zeros(count),
        first_exposure=np.full(count, -1), **columns)


def build_world(config: Config, rng: np.random.Generator) -> World:
    """The world at round 0, from ``config.market``."""
    cfg = config.market
    if cfg.world == "amazon":
        return _amazon_world(config, rng)
    spec = synthetic.WorldSpec.sample(rng, cfg)
    world = World(catalogue=Catalogue.empty(cfg.dim, 2), population=Population.empty(cfg.dim, cfg.history_length),
                  spec=spec, edges=np.zeros((0, 2), np.int64), new_item_horizon=cfg.new_item_horizon,
                  novelty_halflife=config.agents.users.novelty_halflife, social_window=cfg.social_window)
    # every provider lists at least one item, the rest go to providers at random
    providers = np.concatenate([np.arange(cfg.n_providers),
                                rng.integers(0, cfg.n_providers, max(cfg.n_items - cfg.n_providers, 0))])[: cfg.n_items]
    _list_items(world, rng, cfg, synthetic.sample_items(rng, spec, providers))
    world.population.add(born=np.zeros(cfg.n_users, np.int64),
                         **synthetic.sample_users(rng, spec, cfg.n_users, config.agents.users))
    world.edges = synthetic.social_edges(rng, cfg.n_users, cfg)
    return world


def add_items(world: World, cfg: MarketConfig, rng: np.random.Generator, count: int,
              active_providers: np.ndarray) -> np.ndarray:
    """List ``count`` arriving items; some belong to new providers. Returns new provider ids."""
    if count == 0:
        return np.zeros(0, np.int64)
    if world.reserve is not None:  # real data: arrivals come from the held-back catalogue
        return _release_reserve(world, rng, count)
    is_new = rng.random(count) < cfg.new_provider_prob
    if len(active_providers) == 0:
        is_new[:] = True
    new_providers = world.spec.add_providers(rng, int(is_new.sum()))
    owners = np.where(is_new, 0, active_providers[rng.integers(0, max(len(active_providers), 1), count)])
    owners[is_new] = new_providers
    _list_items(world, rng, cfg, synthetic.sample_items(rng, world.spec, owners))
    return new_providers


def add_users(world: World, cfg: MarketConfig, users_cfg: UserAgentsConfig, rng: np.random.Generator,
              count: int) -> None:
    """Users arrive with a fresh taste (synthetic) or a real user's taste (Amazon) and a few friends."""
    if count == 0:
        return
    anchor = None
    if world.reserve is not None:
        donors = rng.integers(0, len(world.reserve["anchors"]), count)
        anchor = world.reserve["anchors"][donors]
    n_before = world.population.n
    new = world.population.add(born=np.full(count, world.round),
                               **synthetic.sample_users(rng, world.spec, count, users_cfg, anchor))
    if cfg.social_graph != "none":
        world.add_edges(synthetic.attach_users(rng, new, n_before, cfg.social_degree))


def _amazon_world(config: Config, rng: np.random.Generator) -> World:
    """Real items and users: titles from the Amazon files, true item vectors from
    all-MiniLM-L6-v2 projected to d, categories from faiss k-means over those vectors, quality
    from the items' mean star rating, users' tastes from their real histories."""
    import faiss

    from agorasim.data import amazon

    cfg = config.market
    data = amazon.load_amazon(cfg.data_dir)
    n_items = len(data.titles)
    need = max(config.platform.k, cfg.n_categories * cfg.n_subcategories)
    if n_items < need:
        raise UserInputError(f"market.data_dir {data.source}: {n_items} items; a slate of platform.k="
                             f"{config.platform.k} and {cfg.n_categories}x{cfg.n_subcategories} categories "
                             f"need at least {need}")
    embedding = amazon.item_embeddings(data, dim=cfg.dim)
    # categories: coarse k-means, then k-means within each coarse cluster's residuals
    seed = int(rng.integers(2**31))
    coarse = faiss.Kmeans(cfg.dim, cfg.n_categories, niter=20, seed=seed, verbose=False)
    coarse.train(embedding)
    _, top = coarse.index.search(embedding, 1)
    residual = np.ascontiguousarray(embedding - coarse.centroids[top[:, 0]], dtype=np.float32)
    fine = faiss.Kmeans(cfg.dim, cfg.n_subcategories, niter=20, seed=seed + 1, verbose=False)
    fine.train(residual)
    _, sub = fine.index.search(residual, 1)
    # quality: mean stars of each item over all rows it appears in (4 stars = 0 utility)
    stars_sum, stars_n = np.zeros(n_items), np.zeros(n_items)
    for split in (data.valid, data.test):
        np.add.at(stars_sum, split.target, split.target_rating)
        np.add.at(stars_n, split.target, 1)
    quality = np.where(stars_n > 0, (stars_sum / np.maximum(stars_n, 1) - 4.0) / 2.0, 0.0).astype(np.float32)
    # providers: the brand word that starts each title; rare brands share providers
    brands = [t.split()[0].lower() if t.split() else "" for t in data.titles]
    names, brand_ids, counts = np.unique(brands, return_inverse=True, return_counts=True)
    rank = np.empty(len(names), np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(names))
    provider = np.minimum(rank[brand_ids], cfg.n_providers - 1)
    feature_rate = 0.3
    if cfg.features == "category":  # rates of the item's k-means (coarse, fine) category
        rates = synthetic.feature_rates(rng, len(coarse.centroids), len(fine.centroids))
        feature_rate = rates[top[:, 0], sub[:, 0]]
    spec = synthetic.WorldSpec(top_centres=unit_rows(coarse.centroids),
                               sub_centres=unit_rows(coarse.centroids[:, None, :] + fine.centroids[None, :, :]),
                               provider_home=np.zeros(int(provider.max()) + 1, np.int64))
    world = World(catalogue=Catalogue.empty(cfg.dim, 2), population=Population.empty(cfg.dim, cfg.history_length),
                  spec=spec, edges=np.zeros((0, 2), np.int64), new_item_horizon=cfg.new_item_horizon,
                  novelty_halflife=config.agents.users.novelty_halflife, social_window=cfg.social_window)
    columns = dict(
        titles=list(data.titles), embedding=embedding, quality=quality, provider=provider,
        category=np.stack([top[:, 0], sub[:, 0]], 1).astype(np.int64), brand=brand_ids.astype(np.int64),
        price_band=rng.integers(0, len(synthetic.PRICE_BANDS), n_items),
        features=(rng.random((n_items, synthetic.N_FEATURES)) < feature_rate) @ (1 << np.arange(synthetic.N_FEATURES)),
    )
    # hold back the items first seen last for arrivals, when the scenario asks for arrivals
    first_seen = np.full(n_items, np.iinfo(np.int64).max)
    for split in (data.valid, data.test):
        np.minimum.at(first_seen, split.target, split.timestamp)
    order = np.argsort(first_seen, kind="stable")
    n_reserve = min(cfg.new_items_per_round * config.run.rounds, n_items // 5)
    listed = np.sort(order[: n_items - n_reserve])
    reserved = order[n_items - n_reserve:]
    take = lambda ids: {k: ([v[i] for i in ids] if k == "titles" else v[ids]) for k, v in columns.items()}  # noqa: E731
    _list_items(world, rng, cfg, take(listed))
    spec.provider_home = np.zeros(int(provider.max()) + 1, np.int64)
    # users: each real user's latest known history; taste anchored on its items' true vectors
    user_ids, histories = amazon.bootstrap_users(data)
    user_ids, histories = user_ids[: cfg.n_users], histories[: cfg.n_users]
    position = np.full(n_items, -1)
    position[listed] = np.arange(len(listed))
    histories = np.where(histories >= 0, position[np.maximum(histories, 0)], -1)  # catalogue row ids
    valid = histories >= 0
    anchor = unit_rows((world.catalogue.embedding[np.maximum(histories, 0)] * valid[..., None]).sum(1))
    users = world.population.add(born=np.zeros(len(user_ids), np.int64),
                                 **synthetic.sample_users(rng, spec, len(user_ids), config.agents.users, anchor))
    h = min(histories.shape[1], cfg.history_length)
    packed = np.full((len(users), cfg.history_length), -1)
    packed[:, -h:] = _left_pad(histories)[:, -h:]
    world.population.history[users] = packed
    world.edges = synthetic.social_edges(rng, len(users), cfg)
    world.reserve = {"columns": take(reserved), "next": 0, "anchors": anchor, "cfg": cfg}
    return world


def _left_pad(histories: np.ndarray) -> np.ndarray:
    """Move the -1 entries of each row to the left, keeping the order of the items."""
    order = np.argsort(histories >= 0, axis=1, kind="stable")
    return np.take_along_axis(histories, order, 1)


def _release_reserve(world: World, rng: np.random.Generator, count: int) -> np.ndarray:
    reserve = world.reserve
    start = reserve["next"]
    stop = min(start + count, len(reserve["columns"]["titles"]))
    if stop > start:
        ids = np.arange(start, stop)
        columns = {k: ([v[i] for i in ids] if k == "titles" else v[ids]) for k, v in reserve["columns"].items()}
        _list_items(world, rng, reserve["cfg"], columns)
        reserve["next"] = stop
    return np.zeros(0, np.int64)
