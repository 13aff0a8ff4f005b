"""The round, wired in one place: a compiled LangGraph ``StateGraph`` over batched nodes.

    world -> retrieve -> recommend -> promote -> rerank -> respond -> log
          -> learn -> users -> ledger -> providers -> measure

One line per phase, and each role owns its update: the world (provider exits decided last round,
arrivals, who visits), retrieval, the policy (``recommend``, and ``learn`` from the log), the
item agents (``promote``, and ``providers``: bandit rewards and exit decisions), the platform
(``rerank``, and the exposure ``ledger``), the users (``respond``, and ``users``: trust, drift,
fatigue, churn), then ``measure``: the round's metrics row, a pure function of the round's arrays
(``metrics/round.py``). No node writes to disk: the runner writes the run folder after the step.

With ``agents.grounding.enabled`` (MGFRec, ``agents/grounding.py``) a ``ground`` node runs between
``rerank`` and ``respond``: its own compiled subgraph puts grounded items at the top of a share of
the language-model users' slates. With ``platform.explain`` (SELLER, ``platform/explain.py``) an
``explain`` node attaches the platform's explanations just before ``respond``, and a learned
explainer trains on the round's reviews in an ``explainer`` node after ``learn``. Off, the graph is
the one above.
Each node calls one batched method of the market (``env/market.py``) for all active users at once;
the state holds arrays, never per-user dicts. A round with no visiting user skips straight from
``world`` to ``learn`` with empty batches (a conditional edge, not an ``if`` inside the nodes).
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
from langgraph.graph import END, START, StateGraph


class RoundState(TypedDict, total=False):
    round: int
    users: np.ndarray  # (B,) active user ids
    candidates: np.ndarray  # (B, C) retrieved pool
    profiles: np.ndarray  # (B, d) what the platform knows of each user
    ranked: np.ndarray  # (B, K') policy output
    scores: np.ndarray  # (B, K') policy scores
    promotions: Any  # Promotions over the (B, K') ranked items
    eiu: np.ndarray  # (B, K') expected item utility
    slates: np.ndarray  # (B, K) shown slates
    columns: np.ndarray  # (B, K) the slates' columns in ``ranked`` (-1 for empty slots)
    feedback: Any  # FeedbackBatch
    utility: np.ndarray  # (B, K) true utility of shown items
    shown: Any  # Promotions of the shown items
    explanations: Any  # Explanations of the shown items (platform.explain)
    reaction: Any  # the users' Reaction to them
    explain_train: dict  # the explainer's training figures
    train: dict  # policy training metrics
    churned: np.ndarray  # users who churned this round
    item_exposure: np.ndarray  # (n_items,) position-weighted exposure this round
    newly_seen: np.ndarray  # items shown for the first time this round
    leaving: np.ndarray  # providers that leave after this round
    metrics: dict  # the round's metrics row


def build_round_graph(market) -> Any:
    """Compile the round graph over ``market``'s batched methods."""

    def world(state: RoundState) -> RoundState:
        return {"users": market.world_phase()}

    def retrieve(state: RoundState) -> RoundState:
        candidates, profiles = market.retrieve(state["users"])
        return {"candidates": candidates, "profiles": profiles}

    def recommend(state: RoundState) -> RoundState:
        ranked, scores = market.recommend(state["users"], state["candidates"])
        return {"ranked": ranked, "scores": scores}

    def promote(state: RoundState) -> RoundState:
        promotions, eiu = market.promote(state["profiles"], state["ranked"])
        return {"promotions": promotions, "eiu": eiu}

    def rerank(state: RoundState) -> RoundState:
        slates, columns = market.rerank(state["ranked"], state["scores"], state["eiu"])
        return {"slates": slates, "columns": columns}

    def ground(state: RoundState) -> RoundState:
        slates, columns, ranked, promotions = market.ground(state["users"], state["slates"], state["ranked"],
                                                            state["promotions"])
        return {"slates": slates, "columns": columns, "ranked": ranked, "promotions": promotions}

    def explain(state: RoundState) -> RoundState:
        return {"explanations": market.explain(state["users"], state["slates"], state["profiles"])}

    def respond(state: RoundState) -> RoundState:
        feedback, utility, shown, reaction = market.respond(state["users"], state["slates"], state["columns"],
                                                            state["promotions"], state.get("explanations"))
        return {"feedback": feedback, "utility": utility, "shown": shown, "reaction": reaction}

    def log(state: RoundState) -> RoundState:
        market.log(state["users"], state["slates"], state["feedback"])
        return {}

    def learn(state: RoundState) -> RoundState:
        return {"train": market.learn()}

    def explainer(state: RoundState) -> RoundState:
        return {"explain_train": market.train_explainer(state["users"], state["slates"], state["feedback"],
                                                        state.get("reaction"))}

    def users(state: RoundState) -> RoundState:
        return {"churned": market.update_users(state["users"], state["slates"], state["feedback"], state["shown"],
                                               state.get("reaction"))}

    def ledger(state: RoundState) -> RoundState:
        item_exposure, newly_seen = market.update_ledger(state["slates"], state["feedback"])
        return {"item_exposure": item_exposure, "newly_seen": newly_seen}

    def providers(state: RoundState) -> RoundState:
        return {"leaving": market.update_providers(state["slates"], state["feedback"], state["item_exposure"])}

    def measure(state: RoundState) -> RoundState:
        return {"metrics": market.measure(state)}

    def anyone_visits(state: RoundState) -> str:
        return "retrieve" if len(state["users"]) else "empty"

    graph = StateGraph(RoundState)
    phases = [("world", world), ("retrieve", retrieve), ("recommend", recommend), ("promote", promote),
              ("rerank", rerank), ("respond", respond), ("log", log), ("learn", learn), ("users", users),
              ("ledger", ledger), ("providers", providers), ("measure", measure)]
    for name, node in phases:
        graph.add_node(name, node)
    graph.add_edge(START, "world")
    graph.add_conditional_edges("world", anyone_visits, {"retrieve": "retrieve", "empty": "empty_round"})
    graph.add_node("empty_round", lambda state: market.empty_round())
    graph.add_edge("empty_round", "learn")
    # optional phases: grounding after the re-ranker, explanations before the users respond, the
    # explainer's training after the policy's
    before_respond = ["rerank"]
    if market.grounder is not None:
        graph.add_node("ground", ground)
        before_respond.append("ground")
    if market.explainer is not None:
        graph.add_node("explain", explain)
        before_respond.append("explain")
    after_learn = ["learn"]
    if market.explainer is not None and market.explainer.learns:
        graph.add_node("explainer", explainer)
        after_learn.append("explainer")
    chain = [*zip(before_respond, [*before_respond[1:], "respond"]), *zip(after_learn, [*after_learn[1:], "users"])]
    for a, b in [("retrieve", "recommend"), ("recommend", "promote"), ("promote", "rerank"), *chain,
                 ("respond", "log"), ("log", "learn"), ("users", "ledger"),
                 ("ledger", "providers"), ("providers", "measure"), ("measure", END)]:
        graph.add_edge(a, b)
    return graph.compile()
