"""Conformance checks every recommender policy must pass, shipped as a library function.

It lives in ``env/`` because it builds a world (a catalogue and an interaction log) to play the
policy against; the policy itself only ever sees the ``Observation`` of it.

A new policy's test calls ``check_policy(MyPolicy(...))``. It plays a few rounds of a tiny random
world (items arriving and leaving, random slates and clicks) through ``update``, then asks for one
batch of recommendations with padded candidate pools, an unknown user, an empty history and items
newer than the last refit, and checks the ``Policy`` contract:

- ``(items, scores)`` are both (B, k); items come from the row's candidates (scoring policies), are
  distinct, alive, and -1 (score -inf) appears only at the end of a row and only when the row has
  fewer than k valid items; scores never increase along a row and are finite for real items;
- ``update`` returns ``{"namespace/name": finite number}`` and leaves the catalogue alone;
- the same seeds give the same metrics, items and scores (so no wall-clock values in metrics);
- the policy survives a checkpoint (``run/checkpoint.py``'s allow-list unpickler), before and after
  training, and the restored copy recommends the same;
- torch's and numpy's global RNGs and torch's thread count are as they were.

Every round the policy first serves (``recommend``) and then learns (``update``), as in the market,
and it is bound to ``StubOracle``, a deterministic feedback oracle, so the training path of a
policy that learns from verified rewards (the generative policy's GRPO and seed-method steps) runs
inside the check too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from agorasim.env.state import Catalogue, InteractionLog
from agorasim.policy.base import ExposureState, Policy, RecommendRequest
from agorasim.policy.observation import Observation
from agorasim.run import checkpoint


def _expect(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def add_random_items(catalogue: Catalogue, count: int, rng: np.random.Generator,
                     round: int = 0) -> np.ndarray:
    """List ``count`` items with random columns (whatever columns the catalogue has); returns ids."""
    columns = {}
    for f in fields(catalogue):
        template = getattr(catalogue, f.name)
        if not isinstance(template, np.ndarray):
            continue
        shape = (count,) + template.shape[1:]
        if template.dtype == bool:
            column = np.ones(shape, bool)
        elif np.issubdtype(template.dtype, np.floating):
            column = rng.standard_normal(shape)
        else:
            column = rng.integers(0, 4, size=shape)
        columns[f.name] = column.astype(template.dtype)
    for name in ("embedding", "content"):
        if name in columns and columns[name].ndim == 2:
            columns[name] /= np.linalg.norm(columns[name], axis=1, keepdims=True)
    known = {"alive": True, "born": round, "interactions": 0, "first_exposure": -1}
    for name, value in known.items():
        if name in columns:
            columns[name] = np.full(count, value, columns[name].dtype)
    return catalogue.add([f"item {catalogue.n + i}" for i in range(count)], **columns)


class StubOracle:
    """A deterministic feedback oracle over a catalogue: ratings and clicks from a fixed hash of
    (user, item), exposure from the catalogue's interaction counts (no randomness, no state)."""

    def __init__(self, catalogue: Catalogue, n_groups: int = 4):
        self.catalogue, self.n_groups = catalogue, n_groups

    def judge(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        users = np.asarray(users, np.int64)[:, None]
        items = np.asarray(items, np.int64)
        score = ((users * 7919 + np.maximum(items, 0) * 104729) % 1000) / 1000.0  # in [0, 1)
        valid = items >= 0
        return {"rating": np.where(valid, 10.0 * score, 0.0), "click": np.where(valid, score, 0.0)}

    def exposure_state(self) -> ExposureState:
        n = self.catalogue.n
        counts = self.catalogue.interactions[:n].astype(np.float64)
        groups = np.minimum(np.argsort(np.argsort(-counts, kind="stable"), kind="stable") * self.n_groups // max(n, 1),
                            self.n_groups - 1)
        share = np.bincount(groups, weights=counts + 1.0, minlength=self.n_groups)
        return ExposureState(groups=groups, share=share / share.sum(),
                             target_share=np.full(self.n_groups, 1.0 / self.n_groups), item_exposure=counts + 1.0,
                             interactions=counts, alive=self.catalogue.alive[:n].copy())


@dataclass
class _Episode:
    metrics: list
    request: RecommendRequest
    items: np.ndarray
    scores: np.ndarray
    n_items: int


def _play(policy: Policy, n_items: int, n_users: int, n_rounds: int, seed: int, k: int) -> _Episode:
    """Run the tiny world for ``n_rounds`` rounds of ``update``, then one ``recommend``."""
    world_seed, update_seed, recommend_seed = np.random.SeedSequence(seed).spawn(3)
    world, update_rng = np.random.default_rng(world_seed), np.random.default_rng(update_seed)
    history_length, slate_size = 6, 5
    catalogue = Catalogue.empty(dim=8, depth=2)
    add_random_items(catalogue, n_items, world)
    log = InteractionLog()
    history = np.full((n_users, history_length), -1, np.int64)
    metrics = []
    policy.bind(StubOracle(catalogue))
    serve_rng = np.random.default_rng(recommend_seed.spawn(1)[0])
    for round in range(n_rounds):
        if round == 1:  # arrivals between refits
            add_random_items(catalogue, 5, world, round)
        if round == 2:  # exits: some items stop being listed
            catalogue.alive[world.choice(catalogue.n, size=catalogue.n // 10, replace=False)] = False
        alive = catalogue.alive_ids()
        # serve first, as the market does (a policy may learn from what it served)
        pool = np.broadcast_to(alive, (n_users, len(alive)))
        policy.recommend(RecommendRequest(users=np.arange(n_users), history=history.copy(), candidates=pool,
                                          alive=catalogue.view("alive").copy(), k=k, round=round), serve_rng)
        slates = alive[np.argsort(world.random((n_users, len(alive))), axis=1)[:, :slate_size]]
        clicked_at = np.where(world.random(n_users) < 0.6, world.integers(slate_size, size=n_users), -1)
        click = (np.arange(slate_size) == clicked_at[:, None]).astype(np.int8)
        rating = np.where(click > 0, world.integers(1, 6, size=click.shape), np.nan).astype(np.float32)
        log.append(round=np.full(slates.size, round), user=np.repeat(np.arange(n_users), slate_size),
                   item=slates.ravel(), position=np.tile(np.arange(slate_size), n_users),
                   click=click.ravel(), rating=rating.ravel())
        clicked_items = slates[click > 0]
        np.add.at(catalogue.interactions, clicked_items, 1.0)
        clickers = np.flatnonzero(clicked_at >= 0)
        history[clickers] = np.concatenate([history[clickers, 1:], clicked_items[:, None]], axis=1)

        before = {name: catalogue.view(name).copy() for name in ("alive", "interactions")}
        out = policy.update(Observation.of(log, catalogue, round), update_rng)
        _expect(all(np.array_equal(before[name], catalogue.view(name)) for name in before),
                f"{type(policy).__name__}.update changed the catalogue")
        _expect(isinstance(out, dict), f"update must return a dict of metrics, got {type(out).__name__}")
        for key, value in out.items():
            _expect(isinstance(key, str) and "/" in key,
                    f"metric key {key!r} must be namespaced, e.g. 'train/loss'")
            _expect(isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value),
                    f"metric {key!r} must be a finite number, got {value!r}")
        # time/* keys are wall-clock by contract (train.csv only); everything else must repeat
        metrics.append({key: value for key, value in out.items() if not key.startswith("time/")})

    # after the last update: items the policy has never seen, and a few more exits
    new_items = add_random_items(catalogue, 4, world, n_rounds)
    old_alive = np.setdiff1d(catalogue.alive_ids(), new_items)
    catalogue.alive[world.choice(old_alive, size=3, replace=False)] = False
    old_alive = np.setdiff1d(catalogue.alive_ids(), new_items)

    n_candidates = 12
    candidates = np.empty((n_users + 1, n_candidates), np.int64)
    for row in range(n_users + 1):
        pool = world.permutation(old_alive)[:n_candidates]
        if row == 1:  # the new items compete with known ones
            pool[:len(new_items)] = new_items
        pool = world.permutation(pool)
        n_pad = n_candidates - (k - 2) if row == 0 else int(world.integers(0, 4))  # row 0: too few
        pool[world.choice(n_candidates, size=n_pad, replace=False)] = -1
        candidates[row] = pool
    users = np.r_[np.arange(n_users), n_users + 3]  # the last user never appeared in the log
    request = RecommendRequest(
        users=users, history=np.vstack([history, np.full(history_length, -1)]), candidates=candidates,
        alive=catalogue.view("alive").copy(), k=k, round=n_rounds)
    items, scores = policy.recommend(request, np.random.default_rng(recommend_seed))
    return _Episode(metrics, request, np.asarray(items), np.asarray(scores), catalogue.n)


def _check_output(name: str, episode: _Episode, from_candidates: bool) -> None:
    request, items, scores = episode.request, episode.items, episode.scores
    shape = (len(request.users), request.k)
    _expect(items.shape == shape and scores.shape == shape,
            f"{name}: items {items.shape} and scores {scores.shape} must both be {shape}")
    _expect(np.issubdtype(items.dtype, np.integer), f"{name}: items must be integer ids, got {items.dtype}")
    real = items >= 0
    _expect(np.all(items >= -1), f"{name}: negative ids other than -1 padding")
    _expect(np.all(items < episode.n_items), f"{name}: ids beyond the catalogue")
    _expect(np.all(request.alive[items[real]]), f"{name}: recommended a dead item")
    _expect(np.all(real[:, :-1] >= real[:, 1:]), f"{name}: -1 padding must come after all real items")
    _expect(np.all(np.isfinite(scores[real])), f"{name}: real items must have finite scores")
    _expect(np.all(scores[~real] == -np.inf), f"{name}: -1 padding must have score -inf")
    _expect(np.all(scores[:, :-1] >= scores[:, 1:]), f"{name}: scores must not increase along a row")
    for row in range(shape[0]):
        chosen = items[row][real[row]]
        _expect(len(np.unique(chosen)) == len(chosen), f"{name}: row {row} repeats an item")
        if from_candidates:
            _expect(np.isin(chosen, request.candidates[row]).all(),
                    f"{name}: row {row} has items not in its candidates")
            valid = request.candidates[row][request.candidates[row] >= 0]
        else:
            valid = np.flatnonzero(request.alive)
        _expect(len(chosen) == min(request.k, len(valid)),
                f"{name}: row {row} returned {len(chosen)} items, expected min(k, {len(valid)} valid)")


def check_policy(policy: Policy, n_items: int = 60, n_users: int = 20, rounds: int = 3, seed: int = 0,
                 *, k: int = 5, from_candidates: bool = True) -> list[dict]:
    """Raise AssertionError (saying what broke) unless ``policy`` honours the ``Policy`` contract.

    Args:
        policy: an untrained or trained policy; it is copied (by pickling), never modified.
        n_items: initial catalogue size of the tiny world.
        n_users: users in the tiny world (plus one unknown user in the request).
        rounds: rounds of ``update``; raised to ``policy.refit_every`` so at least one refit happens.
        seed: seed of the world and of the rngs handed to the policy.
        k: items per user to recommend.
        from_candidates: items must come from the request's candidates (False for a generative
            policy that decodes from the whole catalogue).

    Returns:
        The metrics ``update`` returned each round (``time/*`` removed), for checks of their own.
    """
    name = type(policy).__name__
    torch_rng, numpy_rng, threads = torch.get_rng_state(), np.random.get_state(), torch.get_num_threads()
    trusted = (type(policy).__module__,)  # the class under test is code its author runs
    blueprint = checkpoint.dumps(policy)
    n_rounds = max(rounds, int(getattr(policy, "refit_every", 1)))
    trained = checkpoint.loads(blueprint, trusted)
    first = _play(trained, n_items, n_users, n_rounds, seed, k)
    second = _play(checkpoint.loads(blueprint, trusted), n_items, n_users, n_rounds, seed, k)
    _check_output(name, first, from_candidates)

    _expect(first.metrics == second.metrics, f"{name}: update metrics differ between identical runs "
            f"(wall-clock or global-RNG values?): {first.metrics} vs {second.metrics}")
    _expect(np.array_equal(first.items, second.items) and np.array_equal(first.scores, second.scores),
            f"{name}: recommendations differ between identical runs")

    restored = checkpoint.loads(checkpoint.dumps(trained), trusted)
    expected = trained.recommend(first.request, np.random.default_rng(seed))
    got = restored.recommend(first.request, np.random.default_rng(seed))
    _expect(np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]),
            f"{name}: the unpickled policy recommends differently")

    _expect(torch.get_num_threads() == threads, f"{name}: left torch's thread count changed")
    _expect(torch.equal(torch_rng, torch.get_rng_state()), f"{name}: changed torch's global RNG state")
    np_after = np.random.get_state()
    _expect(numpy_rng[0] == np_after[0] and np.array_equal(numpy_rng[1], np_after[1])
            and numpy_rng[2:] == np_after[2:], f"{name}: changed numpy's global RNG state")
    return first.metrics
