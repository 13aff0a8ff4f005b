"""The market: a ``mesa.Model`` whose population lives in numpy arrays.

``Market.step()`` runs one round, which is one invocation of the compiled LangGraph round graph
(``env/round_graph.py``). Each graph node calls one method below, and every method works on the
whole batch of active users. Providers are thin mesa agents over the item agents' arrays.
"""

from __future__ import annotations

import mesa
import numpy as np

from agorasim.agents import prompts
from agorasim.agents.backends import make_backend
from agorasim.agents.engines import Engines
from agorasim.agents.feedback import FeedbackBatch
from agorasim.agents.grounding import append_unpromoted, build_grounder
from agorasim.agents.items import STRATEGIES, ItemAgents, Promotions, PromotionWriter, audit_claims
from agorasim.agents.users import UserAgents
from agorasim.config import Config
from agorasim.data import worlds
from agorasim.env.retrieval import Retriever
from agorasim.env.round_graph import build_round_graph
from agorasim.metrics import accuracy, exposure
from agorasim.metrics.round import EXPLANATION_KEYS, RoundArrays, explanation_row, round_row
from agorasim.platform import ExposureLedger, RerankRequest, make_reranker, take_columns
from agorasim.platform.audit import NeighbourAuditor, audit_row
from agorasim.platform.estimates import expected_item_utility, group_targets, popularity_groups
from agorasim.platform.evaluator import ItemEvaluator
from agorasim.platform.explain import ExplainRequest, Explanations, build_explainer, item_aspects
from agorasim.policy import RecommendRequest, make_policy
from agorasim.policy.base import ExposureState
from agorasim.policy.observation import Observation

RNG_STREAMS = ("mesa", "arrivals", "activity", "retrieval", "policy", "items", "users", "eval", "evaluator", "explain")


class ProviderAgent(mesa.Agent):
    """One provider (item agent): a view over ``ItemAgents`` arrays and the catalogue."""

    def __init__(self, model: Market, provider_id: int):
        super().__init__(model)
        self.provider_id = provider_id

    @property
    def strategy(self) -> str:
        return STRATEGIES[self.model.items.strategy[self.provider_id]][0]

    @property
    def item_ids(self) -> np.ndarray:
        cat = self.model.world.catalogue
        return np.flatnonzero((cat.view("provider") == self.provider_id) & cat.view("alive"))

    def exit(self) -> None:
        """Leave the market: delist every item and deregister from the model."""
        self.model.world.catalogue.alive[self.item_ids] = False
        self.remove()


class Market(mesa.Model):
    """The simulated marketplace.

    Args:
        config: the validated run config.
    """

    def __init__(self, config: Config):
        streams = np.random.SeedSequence(config.run.seed).spawn(len(RNG_STREAMS))
        self.rngs = {name: np.random.default_rng(s) for name, s in zip(RNG_STREAMS, streams)}
        super().__init__(rng=self.rngs["mesa"])
        self.config = config
        self.world = worlds.build_world(config, self.rngs["arrivals"])
        agents = config.agents
        self.engines = Engines(agents.llm, agents.cache)  # built lazily, shared across roles
        self.users = UserAgents(agents.users, make_backend(agents.users.backend, agents.users, self.engines,
                                                           agents.llm, config.run.seed))
        n_providers = len(self.world.spec.provider_home)
        self.items = ItemAgents(agents.items, n_providers)
        writer = agents.items.writer
        self.writer = PromotionWriter(agents.items.promotion, None if writer == "template" else self.engines.get(writer),
                                      agents.llm, config.run.seed)
        self.grounder = build_grounder(agents, self.users.backend, self.engines, config.run.seed)  # None: off
        self.last_timings: dict[str, float] = {}  # wall-clock extras of the last round (timings.csv)
        for provider in range(n_providers):
            ProviderAgent(self, provider)
        self.policy = build_policy(config)
        self.policy.bind(self)
        self.reranker = make_reranker(config.platform.reranker, **reranker_params(config))
        self.ledger = ExposureLedger(config.platform.ledger_window)
        self.evaluator = build_evaluator(config, self.world.catalogue.content.shape[1])  # None: off
        self.retriever = Retriever(config.env.retrieval)
        p = config.platform
        self.auditor = NeighbourAuditor(p.audit_k, p.audit_threshold) if p.audit == "neighbours" else None
        cat = self.world.catalogue
        self.explainer = build_explainer(config.platform.explain, config.platform.explanation, cat.embedding.shape[1],
                                         cat.content.shape[1], self.engines, agents.llm, config.run.seed)  # None: off
        self.cumulative_exposure = np.zeros(0)
        self.leaving = np.zeros(0, np.int64)  # providers leaving after this round (delisted next round)
        self.last_round: dict = {}  # the last round's row and arrays, for the run folder's writer
        self.rows: list[dict] = []  # metrics rows so far (also kept in checkpoints)
        self.train_rows: list[dict] = []  # policy training rows (train/* and time/*)
        self.group_rows: list[dict] = []  # exposure share of each popularity group and its target (groups.csv)
        self._graph = None

    # -- pickling: the compiled graph is rebuilt after loading --
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graph"] = None
        state["last_round"] = {}
        return state

    def __setstate__(self, state):
        state.setdefault("explainer", None)  # a checkpoint from before explanations
        self.__dict__.update(state)
        self.policy.bind(self)  # the policy's oracle reference is not pickled

    @property
    def graph(self):
        if self._graph is None:
            self._graph = build_round_graph(self)
        return self._graph

    def step(self) -> None:
        """One round (mesa wraps this to count ``self.steps``); its metrics row is ``rows[-1]``."""
        self.graph.invoke({"round": self.world.round})
        self.world.round += 1

    # -- nodes -----------------------------------------------------------------------------
    def world_phase(self) -> np.ndarray:
        """Last round's provider exits, arrivals, activity draw and social state; returns the
        active users (sorted ids)."""
        w, cfg = self.world, self.config.market
        rng = self.rngs["arrivals"]
        if len(self.leaving):  # providers that decided to leave last round delist their items
            leaving = set(self.leaving.tolist())
            self.agents.select(lambda a: a.provider_id in leaving).do("exit")
            self.leaving = np.zeros(0, np.int64)
        if w.round > 0:
            new_providers = worlds.add_items(w, cfg, rng, cfg.new_items_per_round, np.flatnonzero(self.items.active))
            for provider in new_providers:
                ProviderAgent(self, int(provider))
            if len(new_providers):
                self.items.add_providers(len(new_providers))
            worlds.add_users(w, cfg, self.config.agents.users, rng, cfg.new_users_per_round)
        pop = w.population
        visiting = pop.view("active") & (self.rngs["activity"].random(pop.n) < pop.view("activity"))
        w.refresh_social()
        return np.flatnonzero(visiting)

    def retrieve(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pools, and the user profiles they were searched with."""
        w, cfg = self.world, self.config.policy
        profiles, has_history = w.profiles(users)
        pools = self.retriever.candidates(
            profiles, has_history, w.catalogue.content[: w.catalogue.n], w.catalogue.alive_ids(),
            w.popularity(), cfg.pool_size, cfg.explore, self.rngs["retrieval"])
        return pools, profiles

    def recommend(self, users: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.world
        request = RecommendRequest(users=users, history=w.population.history[users], candidates=candidates,
                                   alive=w.catalogue.view("alive"), k=self.config.platform.candidates, round=w.round)
        return self.policy.recommend(request, self.rngs["policy"])

    def promote(self, profiles: np.ndarray, ranked: np.ndarray) -> tuple[Promotions, np.ndarray]:
        """Item agents promote themselves to each user; returns promotions and expected item
        utility EIU = sigmoid(3 * content match with the user's profile + believed pull), the pull
        discounted by the platform's audit (``platform.audit``, ``platform/audit.py``)."""
        cat = self.world.catalogue
        self.items.choose_strategies(self.rngs["items"])
        safe = np.maximum(ranked, 0)
        promotions = self.items.promote(cat.provider[safe], cat.features[safe], ranked >= 0, self.rngs["items"])
        if not self.reranker.uses_item_utility:
            return promotions, np.ones(ranked.shape)
        believed = promotions.hype
        if self.config.platform.audit == "attributes":
            believed = promotions.hype * promotions.accuracy
        elif self.auditor is not None:
            believed = promotions.hype * self.audit(ranked, promotions.claimed).supported_share(promotions.claimed)
        return promotions, expected_item_utility(profiles, cat.content[safe], believed)

    def audit(self, items: np.ndarray, claimed: np.ndarray):
        """The neighbour audit of the promotions ``claimed`` of ``items`` (B, K), against the
        features of the items listed now."""
        cat = self.world.catalogue
        return self.auditor.audit(items, claimed, cat.content[: cat.n], cat.features[: cat.n], cat.alive_ids())

    def rerank(self, ranked: np.ndarray, scores: np.ndarray, eiu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The platform's slates: (slates, their columns in ``ranked``)."""
        w, cfg = self.world, self.config.platform
        groups = self._groups()
        cat = w.catalogue
        request = RerankRequest(
            candidates=ranked, relevance=scores, item_utility=eiu, groups=groups,
            group_exposure=self.ledger.group_exposure(groups, cfg.n_groups),
            target=self._target(groups), is_new=w.is_new(), embedding=cat.content[: cat.n], k=cfg.k,
            item_prior=self._item_prior())
        columns = self.reranker.rerank(request)
        return take_columns(ranked, columns), columns

    def ground(self, users: np.ndarray, slates: np.ndarray, ranked: np.ndarray,
               promotions: Promotions) -> tuple[np.ndarray, np.ndarray, np.ndarray, Promotions]:
        """MGFRec multi-round grounding (``agents/grounding.py``) for the grounded share of the
        language-model users: their best grounded items go to the top of their slates. Returns the
        new slates, their columns, and ``ranked``/``promotions`` extended with the grounded items
        the policy did not rank (shown without a promotion)."""
        slates = self.grounder.ground(self.world, users, slates)
        ranked, promotions = append_unpromoted(ranked, promotions, slates)
        return slates, _columns_of(ranked, slates), ranked, promotions

    def explain(self, users: np.ndarray, slates: np.ndarray, profiles: np.ndarray) -> Explanations:
        """The platform's explanation of every shown item (``platform/explain.py``), from what it
        knows: the items' listed aspects and content, the users' purchase histories and their
        profiles (the ones retrieval searched with)."""
        w, cat = self.world, self.world.catalogue
        history = w.population.history[users]
        request = ExplainRequest(
            users=users, slates=slates, listed=self.listed_aspects(slates), profile=profiles, history=history,
            content=cat.content[: cat.n], titles=cat.titles, writes=self.users.backend.llm_rows(users), round=w.round)
        return self.explainer.explain(request, self.rngs["explain"])

    def listed_aspects(self, items: np.ndarray) -> np.ndarray:
        """(..., d) the aspects the catalogue lists for ``items`` (none for padding, -1)."""
        cat = self.world.catalogue
        listed = item_aspects(cat.embedding[np.maximum(items, 0)], self.config.platform.explanation.aspect_threshold)
        return listed & (items >= 0)[..., None]

    def respond(self, users: np.ndarray, slates: np.ndarray, columns: np.ndarray, promotions: Promotions,
                explanations: Explanations | None = None):
        """The users' feedback on their slates; ``columns`` find each shown item's promotion. With
        explanations, the users' reaction to them (``UserAgents.react``) comes back too (else None)."""
        shown = promotions.take(columns)
        text = self.promotion_text(users, slates, shown)
        reaction = explanation_text = None
        if explanations is not None:
            listed, e = self.listed_aspects(slates), self.config.platform.explanation
            reasons = self.users.reasons(self.world, users, slates, listed, e.n_aspects, e.reasons)
            reaction = self.users.react(self.world, users, slates, explanations.aspects, listed, reasons)
            explanation_text = explanations.text
        feedback, utility = self.users.respond(self.world, users, slates, shown.hype, self.rngs["users"], text,
                                               reaction, explanation_text)
        return feedback, utility, shown, reaction

    def promotion_text(self, users: np.ndarray, slates: np.ndarray, shown: Promotions) -> np.ndarray | None:
        """(B, K) promotion texts of the shown items, written only for language-model users (the
        utility model reads the promotions' claims and pull directly). With a language-model
        writer the factuality audit re-reads the claims from the text, in place in ``shown``."""
        reads = self.users.backend.llm_rows(users)
        if not reads.any() or self.config.agents.items.promotion == "off":
            return None
        cat, pop = self.world.catalogue, self.world.population
        rows, slots = np.nonzero((slates >= 0) & reads[:, None])
        items = slates[rows, slots]
        last = pop.history[users[rows], -1]
        audience = [cat.titles[i] if i >= 0 else "a new shopper" for i in last]
        texts = self.writer.write(cat.titles, items, self.items.strategy[cat.provider[items]], shown.claimed[rows, slots],
                                  cat.features[items], cat.price_band[items], audience)
        out = np.full(slates.shape, "", dtype=object)
        out[rows, slots] = texts
        if self.writer.audits_text:
            claimed = np.array([prompts.claims_in_text(t) for t in texts], np.int64)
            unsupported, _, accuracy = audit_claims(claimed, cat.features[items])
            shown.claimed[rows, slots], shown.unsupported[rows, slots] = claimed, unsupported
            shown.accuracy[rows, slots] = accuracy
        return out

    def log(self, users: np.ndarray, slates: np.ndarray, feedback: FeedbackBatch) -> None:
        """Append the round's impressions to the log and count clicks as popularity, before the
        policy learns, so it learns from this round's feedback too."""
        w, cat = self.world, self.world.catalogue
        rows, slots = np.nonzero(slates >= 0)
        clicked = feedback.choice[rows] == slots
        stars = np.where(clicked, feedback.stars[rows], np.nan)
        w.log.append(round=np.full(len(rows), w.round), user=users[rows], item=slates[rows, slots],
                     position=slots, click=clicked.astype(np.int8), rating=stars.astype(np.float32))
        cat.interactions[: cat.n] += np.bincount(slates[rows, slots][clicked], minlength=cat.n)
        window = self.config.run.log_window
        if window is not None:
            w.log.compact(w.round - window + 1)

    def empty_round(self) -> dict:
        """State of a round in which nobody visits (the update phases see empty batches)."""
        k = self.config.platform.k
        none = np.zeros((0, k), np.int64)
        return {"slates": none, "utility": np.zeros((0, k)),
                "feedback": FeedbackBatch(np.zeros(0, np.int64), np.zeros(0), none),
                "shown": Promotions(none, none, np.zeros((0, k)), np.ones((0, k)))}

    def learn(self) -> dict[str, float]:
        w = self.world
        return self.policy.update(Observation.of(w.log, w.catalogue, w.round), self.rngs["policy"])

    def train_explainer(self, users: np.ndarray, slates: np.ndarray, feedback: FeedbackBatch, reaction) -> dict:
        """The explainer learns from the round's reviews: each click's true reasons for its item,
        with the history the user had when served (before the users' update)."""
        if reaction is None:  # nobody visited
            return {}
        w, cat = self.world, self.world.catalogue
        rows = np.flatnonzero(feedback.choice >= 0)
        slots = feedback.choice[rows]
        items = slates[rows, slots]
        return self.explainer.learn(w.population.history[users[rows]], items, reaction.reasons[rows, slots],
                                    cat.content[: cat.n], self.listed_aspects(items), w.round, self.rngs["explain"])

    def update_users(self, users: np.ndarray, slates: np.ndarray, feedback: FeedbackBatch,
                     shown: Promotions, reaction=None) -> np.ndarray:
        """The users' own update (trust, drift, fatigue, churn); returns who churned. Trust moves
        toward the truth of every claim about the consumed item: its promotion's and, with
        explanations, its explanation's."""
        accuracy = shown.accuracy
        if reaction is not None:
            claims = np.bitwise_count(shown.claimed.astype(np.uint64)).astype(np.float64)
            accuracy = reaction.accuracy(claims, shown.accuracy)
        return self.users.update(self.world, users, slates, feedback, accuracy)

    def update_ledger(self, slates: np.ndarray, feedback: FeedbackBatch) -> tuple[np.ndarray, np.ndarray]:
        """The platform's bookkeeping: the round's exposure into the ledger and the cumulative
        count, first exposures stamped; the new-item evaluator counts the round's outcomes and
        refits on its schedule. Returns (item exposure, ids first seen)."""
        w, cat = self.world, self.world.catalogue
        if self.evaluator is not None:
            born = cat.born[: cat.n]
            self.evaluator.observe(w.round, slates, feedback.choice, feedback.stars, born)
            if self.evaluator.due(w.round):
                self.evaluator.fit(w.round, cat.content[: cat.n], born, self.rngs["evaluator"])
        item_exp = exposure.item_exposure(slates, cat.n)
        newly_seen = np.flatnonzero((item_exp > 0) & (cat.view("first_exposure") < 0))
        cat.first_exposure[newly_seen] = w.round
        self.ledger.record(w.round, item_exp)
        self.cumulative_exposure = np.pad(self.cumulative_exposure, (0, cat.n - len(self.cumulative_exposure))) + item_exp
        return item_exp, newly_seen

    def update_providers(self, slates: np.ndarray, feedback: FeedbackBatch, item_exp: np.ndarray) -> np.ndarray:
        """The item agents' update: each provider's bandit learns its reward (rating-weighted clicks
        per impression), and providers kept under the exposure threshold decide to leave. Their
        items are delisted at the start of the next round (``world_phase``). Returns who leaves."""
        cat = self.world.catalogue
        rows, slots = np.nonzero(slates >= 0)
        clicked = feedback.choice[rows] == slots
        stars = np.where(clicked, feedback.stars[rows], np.nan)
        providers = cat.provider[slates[rows, slots]]
        gain = np.where(clicked, (np.nan_to_num(stars) - 1) / 4, 0.0)
        impressions = np.bincount(providers, minlength=self.items.n)
        reward = np.bincount(providers, weights=gain, minlength=self.items.n)
        seen = np.flatnonzero(impressions)
        self.items.learn(seen, reward[seen] / impressions[seen])
        alive = cat.alive_ids()
        prov_exp = np.bincount(cat.provider[alive], weights=item_exp[alive], minlength=self.items.n)
        prov_items = np.bincount(cat.provider[alive], minlength=self.items.n)
        self.leaving = self.items.exits(prov_exp, prov_items)
        return self.leaving

    def measure(self, state: dict) -> dict[str, float]:
        """The round's metrics row (``metrics.round_row`` over the round's arrays), with the
        language-model meters and the policy's training figures; the re-ranker observes it."""
        w, cfg = self.world, self.config
        users, slates, feedback, utility, shown = (state[k] for k in ("users", "slates", "feedback", "utility", "shown"))
        cat, pop = w.catalogue, w.population
        alive = cat.alive_ids()
        window = self.ledger.item_totals(cat.n)
        eval_rows, eval_top = self._probe(users)
        row = round_row(RoundArrays(
            round=w.round, slates=slates, utility=utility, good=self.users.would_rate(utility) >= 4,
            choice=feedback.choice, stars=feedback.stars,
            hype=shown.hype, claimed=shown.claimed, unsupported=shown.unsupported,
            item_exposure=state["item_exposure"], window=window,
            cumulative=self.cumulative_exposure, popularity=w.popularity(), quality=cat.quality[: cat.n],
            is_new=w.is_new(), born=cat.born[: cat.n], newly_seen=state["newly_seen"], alive=alive,
            trust=pop.view("trust")[pop.view("active")], churned=len(state["churned"]),
            eval_slates=slates[eval_rows, :10], eval_top=eval_top, n_groups=cfg.platform.n_groups,
            target=cfg.platform.target, outside_utility=cfg.agents.users.outside_utility,
            exits=len(state["leaving"]), providers_active=int(self.items.active.sum()),
            fairness_weight=float(getattr(self.reranker, "fairness_weight", float("nan")))))
        # -- language-model agents: calls, tokens, price, fallbacks (latency goes to timings.csv) --
        self.last_timings = {}
        for part in (p for p in (self.users.backend, self.writer, self.grounder, self.explainer) if p is not None):
            metrics, timings = part.flush()
            row.update(metrics)
            self.last_timings.update(timings)
        train = state.get("train") or {}
        if train:
            self.train_rows.append({"round": w.round, **train})
        row.update({k: v for k, v in train.items() if not k.startswith("time/")})
        if self.auditor is not None:  # the neighbour audit of the shown promotions against the catalogue
            row.update(audit_row(shown.claimed, shown.unsupported, self.audit(slates, shown.claimed) if len(slates) else None))
        if self.explainer is not None:  # SELLER's evaluation; NaN in a round nobody visits
            reaction = state.get("reaction")
            if reaction is None:
                row.update(dict.fromkeys(EXPLANATION_KEYS, float("nan")))
            else:
                row.update(explanation_row(reaction.named, reaction.reasons, reaction.misrep, reaction.align,
                                           reaction.lift))
            trained = state.get("explain_train") or {}
            row.update({key: trained.get(key, float("nan")) for key in self.explainer.keys})
        if self.evaluator is not None:  # held-out figures of the fit this round, NaN in other rounds
            figures = self.evaluator.figures(w.round)
            row.update({key: figures.get(key, float("nan")) for key in EVALUATOR_KEYS})
        self.reranker.end_round(row)
        self.rows.append(row)
        self.group_rows.append(self._group_row(alive, window))
        # what the run folder's writer (and the dashboard) read after the step (no graph node writes to disk)
        self.last_round = {"row": row, "users": users, "slates": slates, "feedback": feedback, "alive": alive,
                           "window": window, "shown": shown,
                           "explained": None if state.get("reaction") is None else state["reaction"].named}
        return row

    # -- the feedback oracle the policy may query (counterfactual, noiseless, no rng) ----------
    def judge(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Expected rating (0-10) and click probability of each item shown alone to its user
        (the users' own judgement, ``UserAgents.judge``)."""
        return self.users.judge(self.world, users, items)

    def exposure_state(self) -> ExposureState:
        """What the platform knows of exposure: groups, ledger shares and targets, counts."""
        groups = self._groups()
        exposure_by_group = self.ledger.group_exposure(groups, self.config.platform.n_groups)
        total = exposure_by_group.sum()
        share = exposure_by_group / total if total > 0 else np.full(len(exposure_by_group), 1 / len(exposure_by_group))
        cat = self.world.catalogue
        return ExposureState(groups=groups, share=share, target_share=self._target(groups),
                             item_exposure=self.ledger.item_totals(cat.n), interactions=cat.interactions[: cat.n].copy(),
                             alive=cat.alive[: cat.n].copy())

    # -- helpers -----------------------------------------------------------------------------
    def _item_prior(self) -> np.ndarray | None:
        """The evaluator's score of every new item (NaN elsewhere and before its first fit)."""
        if self.evaluator is None:
            return None
        w, cat = self.world, self.world.catalogue
        prior = np.full(cat.n, np.nan)
        new = np.flatnonzero(w.is_new() & cat.alive[: cat.n])
        if self.evaluator.fits and len(new):
            prior[new] = self.evaluator.scores(new, cat.content[: cat.n], cat.born[: cat.n])
        return prior

    def _groups(self) -> np.ndarray:
        """Popularity group of every item (``platform/estimates.py``)."""
        w = self.world
        return popularity_groups(w.popularity(), w.catalogue.alive_ids(), self.config.platform.n_groups)

    def _target(self, groups: np.ndarray) -> np.ndarray:
        cat, p = self.world.catalogue, self.config.platform
        return group_targets(p.target, groups, cat.alive_ids(), p.n_groups, cat.quality)

    def _group_row(self, alive: np.ndarray, window: np.ndarray) -> dict[str, float]:
        """The window's exposure share of every popularity group and its target share, over the
        alive items: the two vectors the row's ``exposure/dgu`` and ``exposure/mgu`` compare."""
        cfg, w = self.config.platform, self.world
        share, target = exposure.group_vectors(window[alive], w.popularity()[alive], cfg.n_groups, cfg.target,
                                               w.catalogue.quality[alive])
        return {"round": w.round, **{f"share/g{g}": float(v) for g, v in enumerate(share)},
                **{f"target/g{g}": float(v) for g, v in enumerate(target)}}

    def _probe(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The accuracy probe: a sample of the round's users (rows into ``users``) and each one's
        true top-10 alive items by the users' own utility."""
        if len(users) == 0:
            return np.zeros(0, np.int64), np.zeros((0, 10), np.int64)
        n_eval = min(self.config.run.eval_users, len(users))
        rows = np.sort(self.rngs["eval"].choice(len(users), n_eval, replace=False))
        alive = self.world.catalogue.alive_ids()
        utility = self.users.utility_matrix(self.world, users[rows], alive)
        return rows, alive[accuracy.true_top_items(utility, 10)]


def _columns_of(ranked: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """Column of each slate item within its row of ``ranked`` (-1 for padding): grounding
    rewrites slates by item id, so its slates are looked up again."""
    match = slates[:, :, None] == ranked[:, None, :]
    return np.where(slates >= 0, match.argmax(2), -1)


def build_policy(config: Config):
    """The configured policy, from its validated ``policy.params`` (the config already filled what
    it shares with other sections); a policy trained in the loop also reads the ``rl`` section."""
    params = config.policy.params
    if "rl" in type(params).model_fields and params.rl is None:
        params = params.model_copy(update={"rl": config.rl.model_dump()})
    return make_policy(config.policy.name, params)


EVALUATOR_KEYS = ("evaluator/ndcg@10", "evaluator/spearman", "evaluator/kendall", "evaluator/n")


def build_evaluator(config: Config, dim: int) -> ItemEvaluator | None:
    """The new-item evaluator when it is enabled or the new-item boost ranks by it."""
    p = config.platform
    if not (p.evaluator.enabled or (p.reranker == "new-item-boost" and p.boost_score == "evaluator")):
        return None
    return ItemEvaluator(p.evaluator, dim, seed=config.run.seed)


def reranker_params(config: Config) -> dict:
    """Re-ranker constructor arguments from the platform config section."""
    p = config.platform
    trirec = dict(a_min=p.a_min, a_max=p.a_max, p=p.p, lambda_dgu=p.lambda_dgu, lambda_mgu=p.lambda_mgu,
                  l_item=p.l_item)
    if p.reranker == "trirec":
        return {**trirec, "fairness_weight": p.fairness_weight}
    if p.reranker == "controller":
        return {**trirec, "initial_weight": p.fairness_weight, "target_gini": p.target_gini, "gain": p.gain,
                "max_weight": p.max_weight}
    if p.reranker == "mmr":
        return {"lambda_": p.mmr_lambda}
    if p.reranker == "new-item-boost":
        return {"boost": p.new_item_boost, "score": p.boost_score}
    return {}
