"""Multi-round grounding (MGFRec): describe what the user may want, ground it, let the user critique.

Before the final slate is shown, a share of the language-model users goes through a small loop,
run as its own compiled LangGraph ``StateGraph`` over the whole batch of those users::

    describe -> ground -> critique --(someone unsatisfied and fewer than R rounds)--> describe
                                   \\-------------------------------------------------> END

describe   the recommender side writes one line describing the product each user may want next,
           from the user's persona (traits and liked titles), recent history titles and the
           critique lines of earlier rounds (``prompts.description_messages``); one batched call
           to the user backend's engine. A failed or empty answer falls back to the liked titles.
ground     the descriptions are embedded with all-MiniLM-L6-v2 (``data/embed.py``) and searched
           in a faiss inner-product index over the alive items' title embeddings (cached across
           rounds, new items added as they arrive); each user gets the top ``per_round`` alive
           items not yet grounded for them in this loop. Only catalogue items can come back.
critique   the user agent judges its grounded items exactly as it judges a slate (same prompt,
           same validation and bounded re-asks, ``backends/llm.py``); a user is satisfied once
           they click an item rated at least ``accept_rating``. Their judgements become short
           critique lines ("Item <title>: rated 3, reason ...") for the next description.

The best grounded items of each user (clicked first, then by rating, then in grounding order; at
most ``per_round``) go to the top of the platform's slate; the rest keeps the platform's order,
without duplicates and with the same length K. Grounded items the platform never ranked carry no
promotion (``append_unpromoted``): their providers did not get to promote them this round.

Which users are grounded is fixed by a hash of the user id (independent of the one that picks
the language-model users), so the same users are grounded all run. Calls are counted by a
``Meter("grounding")``; ``flush`` adds ``grounding/*`` metrics to the round's row.

Reference: MGFRec, multi-round grounding and feedback for LLM recommenders (../shared/papers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import faiss
import numpy as np
from langgraph.graph import END, START, StateGraph

from agorasim.agents import prompts
from agorasim.agents.backends.base import SlateRequest, UserBackend
from agorasim.agents.backends.llm import LLMUserBackend, ask_until_valid, hash_share, user_context
from agorasim.agents.engines import ChatRequest, Engine, Meter
from agorasim.agents.feedback import LLMJudgement
from agorasim.agents.items import Promotions
from agorasim.data import embed
from agorasim.errors import UserInputError

# A multiplicative hash of the user id other than the one of ``is_llm_user``, so the grounded
# users are a ``share`` of the language-model users rather than a nested prefix of them.
GROUND_HASH = np.uint64(0xD6E8FEB86659FD93)
DESCRIPTION_TOKENS = 48  # "one short line": longer answers are cut to their first line anyway
MAX_DESCRIPTION_CHARS = 300
MAX_CRITIQUE_LINES = 10  # the most recent critique lines a description prompt carries
NO_WISH = "a useful everyday product"
_DESCRIBE, _CRITIQUE = 1, 2  # salts of the request seeds


def is_grounded_user(users: np.ndarray, share: float) -> np.ndarray:
    """Users whose slates are grounded: a fixed hash of the id below ``share``."""
    return hash_share(users, share, GROUND_HASH)


def embed_texts(texts: list[str], cache: bool = False) -> np.ndarray:
    """(n, 384) unit-norm all-MiniLM-L6-v2 vectors of ``texts``: catalogue titles are cached on
    disk by ``data/embed.py``; descriptions, which never repeat, are not."""
    return embed.embed_titles(texts) if cache else embed.encode_texts(texts)


def place_on_top(top: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """``top`` items (B, T) first, then the slate's own items in order; duplicates and padding
    (-1) dropped, cut or -1 padded to the slate length K."""
    k = slates.shape[1]
    merged = np.concatenate([top, slates], 1)
    n = merged.shape[1]
    earlier = np.tril(np.ones((n, n), bool), -1)  # earlier[j, i]: column i comes before column j
    repeated = ((merged[:, :, None] == merged[:, None, :]) & earlier).any(2)
    keep = (merged >= 0) & ~repeated
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(merged, order, 1)
    return np.where(np.take_along_axis(keep, order, 1), out, -1)


def append_unpromoted(ranked: np.ndarray, promotions: Promotions,
                      slates: np.ndarray) -> tuple[np.ndarray, Promotions]:
    """Extend the ranked block (B, K') with the slate items it lacks, each with an empty promotion
    (no claims, no pull, accuracy 1), so every shown item finds its own promotion column."""
    missing = (slates >= 0) & ~(slates[:, :, None] == ranked[:, None, :]).any(2)
    if not missing.any():
        return ranked, promotions
    extra = np.where(missing, slates, -1)
    zeros = np.zeros(slates.shape, promotions.claimed.dtype)
    grow = lambda a, fill: np.concatenate([a, fill], 1)  # noqa: E731
    return grow(ranked, extra), Promotions(
        grow(promotions.claimed, zeros), grow(promotions.unsupported, zeros),
        grow(promotions.hype, np.zeros(slates.shape)), grow(promotions.accuracy, np.ones(slates.shape)))


class GroundingState(TypedDict, total=False):
    round: int
    world: Any
    users: np.ndarray  # (G,) grounded user ids
    persona: list  # (G,) persona text
    history: list  # (G,) recent history titles
    fallback: list  # (G,) the description used when the call fails: the liked titles
    critique: list  # (G,) critique lines so far
    descriptions: list  # (G,) this round's descriptions ("" for users who are done)
    batch: np.ndarray  # (G, P) this round's grounded items, -1 padded
    pool: np.ndarray  # (G, R*P) every item grounded so far, in grounding order
    clicked: np.ndarray  # (G, R*P) the user clicked it
    rating: np.ndarray  # (G, R*P) the user's rating 0-10, nan where not rated
    active: np.ndarray  # (G,) still looking (not satisfied, something left to ground)
    satisfied: np.ndarray  # (G,) clicked an item rated >= accept_rating
    iterations: np.ndarray  # (G,) describe-ground-critique rounds run per user
    iteration: int  # rounds run so far


class Grounder:
    """The MGFRec loop for the batch of grounded users of a round.

    Args:
        cfg: ``agents.grounding``.
        backend: the language-model user backend (renders the critique prompt).
        engine: the engine of the user backend's kind (describes and critiques).
        llm_cfg: ``agents.llm``; seed: the run seed.
        embed_fn: texts -> unit vectors (n, D); None: ``embed_texts`` (MiniLM).
    """

    def __init__(self, cfg, backend: LLMUserBackend, engine: Engine, llm_cfg, seed: int = 0,
                 embed_fn: Callable[[list[str]], np.ndarray] | None = None):
        self.cfg, self.backend, self.engine, self.llm_cfg, self.seed = cfg, backend, engine, llm_cfg, seed
        self.embed_fn = embed_fn
        self.meter = Meter("grounding", llm_cfg.price_in, llm_cfg.price_out)
        self._stats = self._zero()
        self._vectors: np.ndarray | None = None  # (n, D) title embeddings of items 0..n-1
        self._index, self._ids, self._key = None, np.zeros(0, np.int64), None
        self._graph = None

    def __getstate__(self):  # the compiled graph and the faiss index are rebuilt on demand
        state = self.__dict__.copy()
        state.update(_graph=None, _index=None, _ids=np.zeros(0, np.int64), _key=None)
        return state

    @staticmethod
    def _zero() -> dict[str, int]:
        return {"users": 0, "iterations": 0, "satisfied": 0, "fallbacks": 0, "critique_fallbacks": 0,
                "reasks": 0, "placed": 0}

    @property
    def graph(self):
        if self._graph is None:
            self._graph = self._build_graph()
        return self._graph

    def select(self, users: np.ndarray) -> np.ndarray:
        """Rows of ``users`` whose slates are grounded: language-model users picked by the hash."""
        return self.backend.llm_rows(users) & is_grounded_user(users, self.cfg.share)

    # -- the loop ------------------------------------------------------------------------------
    def ground(self, world, users: np.ndarray, slates: np.ndarray) -> np.ndarray:
        """The slates (B, K) with each grounded user's best grounded items on top (others as given)."""
        rows = np.flatnonzero(self.select(users))
        self._stats["users"] += len(rows)
        if len(rows) == 0:
            return slates
        state = self.run(world, users[rows])
        top = self.best(state["pool"], state["clicked"], state["rating"], min(self.cfg.per_round, slates.shape[1]))
        out = slates.copy()
        out[rows] = place_on_top(top, slates[rows])
        self._stats["iterations"] += int(state["iterations"].sum())
        self._stats["satisfied"] += int(state["satisfied"].sum())
        self._stats["placed"] += int((top >= 0).sum())
        return out

    def run(self, world, users: np.ndarray) -> GroundingState:
        """The loop for ``users`` (all grounded): one invocation of the subgraph; its final state."""
        return self.graph.invoke(self._start(world, users), {"recursion_limit": 3 * self.cfg.rounds + 5})

    @staticmethod
    def best(pool: np.ndarray, clicked: np.ndarray, rating: np.ndarray, n: int) -> np.ndarray:
        """(G, n) best grounded items per user: clicked first, then by rating (unrated last), ties
        in grounding order; -1 padded."""
        if pool.shape[1] < n:
            pool = np.pad(pool, ((0, 0), (0, n - pool.shape[1])), constant_values=-1)
            clicked = np.pad(clicked, ((0, 0), (0, n - clicked.shape[1])))
            rating = np.pad(rating, ((0, 0), (0, n - rating.shape[1])), constant_values=np.nan)
        score = np.where(pool >= 0, 100.0 * clicked + np.nan_to_num(rating, nan=-1.0) + 1.0, -np.inf)
        order = np.argsort(-score, axis=1, kind="stable")[:, :n]
        return np.where(np.take_along_axis(pool >= 0, order, 1), np.take_along_axis(pool, order, 1), -1)

    def _start(self, world, users: np.ndarray) -> GroundingState:
        """The loop's initial state: what the description prompt says about each user."""
        persona, history, liked = user_context(world, users, self.llm_cfg.history_titles)
        g, width = len(users), self.cfg.rounds * self.cfg.per_round
        return GroundingState(
            round=world.round, world=world, users=users, persona=persona, history=history,
            fallback=["; ".join(titles) or NO_WISH for titles in liked], critique=[[] for _ in range(g)],
            descriptions=[""] * g, batch=np.full((g, self.cfg.per_round), -1, np.int64),
            pool=np.full((g, width), -1, np.int64), clicked=np.zeros((g, width), bool),
            rating=np.full((g, width), np.nan), active=np.ones(g, bool), satisfied=np.zeros(g, bool),
            iterations=np.zeros(g, np.int64), iteration=0)

    def _build_graph(self):
        graph = StateGraph(GroundingState)
        graph.add_node("describe", self._describe)
        graph.add_node("ground", self._ground)
        graph.add_node("critique", self._critique)
        graph.add_edge(START, "describe")
        graph.add_edge("describe", "ground")
        graph.add_edge("ground", "critique")
        graph.add_conditional_edges("critique", self._again, {"describe": "describe", "done": END})
        return graph.compile()

    def _again(self, state: GroundingState) -> str:
        return "describe" if state["active"].any() and state["iteration"] < self.cfg.rounds else "done"

    # -- nodes -------------------------------------------------------------------------------
    def _describe(self, state: GroundingState) -> GroundingState:
        rows = np.flatnonzero(state["active"])
        users, cfg = state["users"], self.llm_cfg
        requests = [ChatRequest(
            messages=prompts.description_messages(state["persona"][r], state["history"][r],
                                                  state["critique"][r][-MAX_CRITIQUE_LINES:]),
            max_tokens=min(cfg.max_tokens, DESCRIPTION_TOKENS), temperature=cfg.temperature, top_p=cfg.top_p,
            seed=self._seed(state["round"], int(users[r]), state["iteration"], 0, _DESCRIBE)) for r in rows]
        responses = self.engine.generate(requests) if requests else []
        self.meter.add(responses)
        descriptions = [""] * len(users)
        for r, response in zip(rows, responses):
            text = _first_line(response.text) if response.error is None else ""
            if not text:
                self._stats["fallbacks"] += 1
                text = state["fallback"][r]
            descriptions[r] = text
        return {"descriptions": descriptions}

    def _ground(self, state: GroundingState) -> GroundingState:
        rows = np.flatnonzero(state["active"])
        per_round, it = self.cfg.per_round, state["iteration"]
        batch = np.full((len(state["users"]), per_round), -1, np.int64)
        index, ids = self._catalogue_index(state["world"].catalogue)
        # each earlier round grounded at most per_round items per user: the top per_round * (it + 1)
        # hits always hold per_round new ones (when the catalogue has them)
        k = min(len(ids), per_round * (it + 1))
        if len(rows) and k:
            queries = np.ascontiguousarray(self._embed([state["descriptions"][r] for r in rows]), np.float32)
            _, hits = index.search(queries, k)
            found = np.where(hits >= 0, ids[np.maximum(hits, 0)], -1)
            seen = (found[:, :, None] == state["pool"][rows][:, None, :]).any(2)
            fresh = (found >= 0) & ~seen
            order = np.argsort(~fresh, axis=1, kind="stable")[:, :per_round]
            picked = np.where(np.take_along_axis(fresh, order, 1), np.take_along_axis(found, order, 1), -1)
            batch[rows, : picked.shape[1]] = picked
        pool = state["pool"].copy()
        pool[:, it * per_round: (it + 1) * per_round] = batch
        return {"batch": batch, "pool": pool}

    def _critique(self, state: GroundingState) -> GroundingState:
        world, users, batch, it = state["world"], state["users"], state["batch"], state["iteration"]
        per_round = self.cfg.per_round
        active = state["active"] & (batch >= 0).any(1)  # nothing left to ground: the user is done
        iterations = state["iterations"] + state["active"]
        rows = np.flatnonzero(active)
        clicked, rating = state["clicked"].copy(), state["rating"].copy()
        satisfied = state["satisfied"].copy()
        critique = [list(lines) for lines in state["critique"]]
        if len(rows):
            slates = batch[rows]
            request = SlateRequest(users=users[rows], slates=slates, true_utility=np.zeros(slates.shape),
                                   hype=np.zeros(slates.shape), trust=world.population.trust[users[rows]],
                                   round=state["round"], world=world)
            messages, _ = self.backend.render(request, np.arange(len(rows)))
            answers = self._judge(messages, request, it)
            titles = world.catalogue.titles
            for r, judgements in zip(rows, answers):
                if judgements is None:
                    self._stats["critique_fallbacks"] += 1
                    continue
                column = {int(item): it * per_round + j for j, item in enumerate(batch[r]) if item >= 0}
                for judgement in judgements:
                    c = column[judgement.item_id]
                    clicked[r, c] = judgement.click
                    rating[r, c] = np.nan if judgement.rating is None else judgement.rating
                    critique[r].append(_critique_line(titles[judgement.item_id], judgement))
                    if judgement.click and judgement.rating is not None and judgement.rating >= self.cfg.accept_rating:
                        satisfied[r] = True
        return {"clicked": clicked, "rating": rating, "critique": critique, "satisfied": satisfied,
                "active": active & ~satisfied, "iterations": iterations, "iteration": it + 1}

    # -- helpers -----------------------------------------------------------------------------
    def _judge(self, messages: list, request: SlateRequest, iteration: int) -> list[list[LLMJudgement] | None]:
        """The user agents' judgements of their grounded items (``ask_until_valid``: batched,
        bounded re-asks, counted on the grounding meter); None where none was valid."""
        slates = [[int(x) for x in row if x >= 0] for row in request.slates]
        results, reasks = ask_until_valid(
            self.engine, self.meter, self.llm_cfg, messages, slates,
            lambda i, attempt: self._seed(request.round, int(request.users[i]), iteration, attempt, _CRITIQUE))
        self._stats["reasks"] += reasks
        return results

    def _seed(self, round: int, user: int, iteration: int, attempt: int, salt: int) -> int:
        return int((self.seed * 1_000_003 + round * 10_007 + user * 101 + iteration * 17 + attempt
                    + salt * 7_919) % 2**31)

    def _embed(self, texts: list[str], cache: bool = False) -> np.ndarray:
        if self.embed_fn is not None:
            return self.embed_fn(texts)
        return embed_texts(texts, cache)

    def _catalogue_index(self, catalogue) -> tuple[Any, np.ndarray]:
        """Inner-product index over the alive items' title embeddings (titles embedded once, new
        items as they arrive; the index rebuilt only when the alive set changes)."""
        done = 0 if self._vectors is None else len(self._vectors)
        if self._vectors is None or catalogue.n > done:
            fresh = np.asarray(self._embed(list(catalogue.titles[done: catalogue.n]), cache=True), np.float32)
            self._vectors = fresh if self._vectors is None else np.concatenate([self._vectors, fresh])
        alive = catalogue.alive_ids()
        key = (catalogue.n, len(alive), int(alive.sum()))
        if key != self._key:
            index = faiss.IndexFlatIP(self._vectors.shape[1])
            index.add(np.ascontiguousarray(self._vectors[alive]))
            self._index, self._ids, self._key = index, alive, key
        return self._index, self._ids

    def flush(self) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, timings) of the round so far, then reset."""
        s = self._stats
        metrics, timings = self.meter.flush()
        users = s["users"]
        metrics.update({
            "grounding/users": float(users),
            "grounding/iterations": s["iterations"] / users if users else float("nan"),
            "grounding/satisfied": s["satisfied"] / users if users else float("nan"),
            "grounding/placed": s["placed"] / users if users else float("nan"),
            "grounding/fallbacks": float(s["fallbacks"]),
            "grounding/critique_fallbacks": float(s["critique_fallbacks"]),
            "grounding/reasks": float(s["reasks"]),
        })
        self._stats = self._zero()
        return metrics, timings


def _first_line(text: str) -> str:
    """The first non-empty line of an answer, without quotes, at most MAX_DESCRIPTION_CHARS."""
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if line:
            return line[:MAX_DESCRIPTION_CHARS]
    return ""


def _critique_line(title: str, judgement: LLMJudgement) -> str:
    rated = "not rated" if judgement.rating is None else f"rated {judgement.rating:g}"
    action = "opened, " if judgement.click else ""
    reason = f", reason {judgement.reason}" if judgement.reason else ""
    return f"Item {title}: {action}{rated}{reason}."


def build_grounder(agents_cfg, backend: UserBackend, engines, seed: int = 0) -> Grounder | None:
    """The grounder of ``agents.grounding``, None when it is off.

    Raises:
        UserInputError: grounding is on but the user agents are the utility model (nobody to
            critique, no model to describe).
    """
    cfg = agents_cfg.grounding
    if not cfg.enabled:
        return None
    kind = agents_cfg.users.backend
    if kind == "utility" or not isinstance(backend, LLMUserBackend):
        raise UserInputError(
            "agents.grounding needs a language-model user backend: set agents.users.backend to one of "
            f"fake, hf, vllm, openai (got {kind}) or agents.grounding.enabled=false")
    return Grounder(cfg, backend, engines.get(kind), agents_cfg.llm, seed)
