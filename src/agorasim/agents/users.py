"""User agents: true utility, grounded feedback through a backend, and the users' dynamics.

True utility (DESIGN section 4)::

    U_ui = theta_u . phi_i + q_i + c_u log(1 + pop_i) + s_u social_ui + n_u fresh_i + eps
           - repeat_penalty * [i in u's recent history]

The last term (satiation) is ours: without it users click the same hit forever and utility
drifts upward with popularity.

The backend adds what the user *perceives* (promotion pull weighted by trust, position bias) and
decides. After the round, trust moves toward the share of a promotion's claims that were true,
taste drifts toward the consumed item (filter bubble), and users whose visits keep disappointing
them (no click, or a rating under 3 stars) run out of patience and churn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from agorasim.agents.backends import SlateRequest, UserBackend
from agorasim.agents.backends.utility import choice_probabilities, perceived_utility, stars_from_utility
from agorasim.agents.feedback import FeedbackBatch, stars_to_rating
from agorasim.config import UserAgentsConfig
from agorasim.env.world import World, unit_rows


@dataclass
class Reaction:
    """The users' reaction to a round's explanations (all (B, K) but ``named`` and ``reasons``).

    Attributes:
        named: (B, K, E) aspects the explanations named, -1 padded.
        align: mean taste of the user for the named aspects (0 where none).
        misrep: share of the named aspects the item lacks.
        n_named: aspects named.
        pull: the explanation's pull on perceived utility (before trust).
        reasons: (B, K, E) the users' true reasons for the items, -1 padded.
        lift: (B,) click-probability lift of the explanations (NaN for language-model users).
    """

    named: np.ndarray
    align: np.ndarray
    misrep: np.ndarray
    n_named: np.ndarray
    pull: np.ndarray
    reasons: np.ndarray
    lift: np.ndarray | None = None

    def accuracy(self, promotion_claims: np.ndarray, promotion_accuracy: np.ndarray) -> np.ndarray:
        """(B, K) share of every claim made about a shown item (its promotion's features and its
        explanation's aspects) that was true; 1 where nothing was claimed. Trust moves toward it."""
        true = promotion_claims * promotion_accuracy + self.n_named * (1 - self.misrep)
        total = promotion_claims + self.n_named
        return np.where(total > 0, true / np.maximum(total, 1), 1.0)


class UserAgents:
    """All users of the market, acting as one batch."""

    def __init__(self, cfg: UserAgentsConfig, backend: UserBackend):
        self.cfg = cfg
        self.backend = backend

    def true_utility(self, world: World, users: np.ndarray, items: np.ndarray,
                     rng: np.random.Generator | None = None) -> np.ndarray:
        """(B, K) true utility of ``items`` (B, K) for ``users``; noise eps only if ``rng`` given.

        Padding items (-1) get -inf.
        """
        safe = np.maximum(items, 0)
        match = np.einsum("bd,bkd->bk", world.population.taste[users], world.catalogue.embedding[safe])
        social = world.social_proof(users, items) if self.cfg.social > 0 else 0.0
        value = self._add_item_terms(world, users, safe, match, social)
        if self.cfg.repeat_penalty > 0:
            consumed = (items[:, :, None] == world.population.history[users][:, None, :]).any(2)
            value = value - self.cfg.repeat_penalty * consumed
        if rng is not None and self.cfg.utility_noise > 0:
            value = value + rng.normal(0.0, self.cfg.utility_noise, value.shape)
        return np.where(items >= 0, value, -np.inf)

    def utility_matrix(self, world: World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(B, n) noiseless true utility of every item in ``items`` (n,) for every user: the
        counterfactual query used by accuracy metrics and in-loop rewards (one matmul)."""
        match = world.population.taste[users] @ world.catalogue.embedding[items].T
        social = world.social_matrix(users, items) if self.cfg.social > 0 else 0.0
        value = self._add_item_terms(world, users, items, match, social)
        if self.cfg.repeat_penalty > 0:
            # the penalty once per (user, consumed item among ``items``), in place: touches the
            # B x H history entries, not a (B, n) mask, and keeps the terms' float32
            history = world.population.history[users]
            column = np.full(world.catalogue.n + 1, -1, np.int64)
            column[items] = np.arange(len(items))
            hit = column[np.where(history >= 0, history, world.catalogue.n)]
            rows, cols = np.nonzero(hit >= 0)
            pairs = np.unique(rows * len(items) + hit[rows, cols])
            value[pairs // len(items), pairs % len(items)] -= value.dtype.type(self.cfg.repeat_penalty)
        return value

    @staticmethod
    def _add_item_terms(world: World, users: np.ndarray, items: np.ndarray, match: np.ndarray,
                        social) -> np.ndarray:
        """``match + q_i + c_u log(1+pop_i) + n_u fresh_i + s_u social_ui``; ``items`` is (B, K)
        or (n,) (broadcast over users)."""
        pop, cat = world.population, world.catalogue
        # float32 throughout: utility differences far below 1e-6 never matter to a choice
        return (match + cat.quality[items]
                + pop.conformity[users, None] * np.log1p(cat.interactions[items], dtype=np.float32)
                + pop.novelty[users, None] * world.freshness(items).astype(np.float32)
                + pop.social[users, None] * social)

    def would_rate(self, utility: np.ndarray) -> np.ndarray:
        """The stars (1-5) a user would give an item of this true utility, without rating noise."""
        return stars_from_utility(utility, self.cfg.rating_center, 0.0)

    def judge(self, world: World, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """The users' judgement of items each shown alone, with no noise and no random draw: the
        counterfactual query an in-loop reward asks. ``rating`` is the expected 0-10 rating (the
        stars of ``stars_from_utility`` before rounding), ``click`` the logit probability of
        clicking the item over the outside option; 0 for padding (-1)."""
        cfg = self.cfg
        utility = self.true_utility(world, users, items)
        stars = stars_from_utility(utility, cfg.rating_center, 0.0, rounded=False)
        logit = np.clip((utility - cfg.outside_utility) / cfg.temperature, -50, 50)
        valid = items >= 0
        return {"rating": np.where(valid, stars_to_rating(stars), 0.0),
                "click": np.where(valid, 1.0 / (1.0 + np.exp(-logit)), 0.0)}

    def respond(self, world: World, users: np.ndarray, slates: np.ndarray, hype: np.ndarray,
                rng: np.random.Generator, promotion_text: np.ndarray | None = None,
                reaction: Reaction | None = None, explanation_text: np.ndarray | None = None,
                ) -> tuple[FeedbackBatch, np.ndarray]:
        """Feedback on the slates and the true utility of every shown item; with ``reaction`` (the
        users' reaction to the platform's explanations) its pull enters the perceived utility, and
        language-model users read ``explanation_text``."""
        utility = self.true_utility(world, users, slates, rng)
        request = SlateRequest(users=users, slates=slates, true_utility=utility, hype=hype,
                               trust=world.population.trust[users], round=world.round, world=world,
                               promotion_text=promotion_text, explain_pull=None if reaction is None else reaction.pull,
                               explanation_text=explanation_text)
        feedback = self.backend.decide(request, rng)
        feedback.validate(slates)
        if reaction is not None:
            reaction.lift = self.click_lift(request)
        return feedback, utility

    # -- explanations (SELLER, ALGORITHMS.md section 8) ------------------------------------------
    def reasons(self, world: World, users: np.ndarray, items: np.ndarray, listed: np.ndarray, e: int,
                over: str = "attributes") -> np.ndarray:
        """(B, K, e) each user's true reasons for each item, the aspects that drive its match
        ``theta_u . phi_i``: ``attributes``, the item's listed aspects with the largest positive
        ``theta_ua phi_ia`` (fewer when fewer contribute); ``product``, the top ``e`` of
        ``theta_u * phi_i`` over every dimension. -1 padded (and on padding items)."""
        taste = world.population.taste[users]
        contribution = taste[:, None, :] * world.catalogue.embedding[np.maximum(items, 0)]
        allowed = listed & (contribution > 0) if over == "attributes" else np.ones(contribution.shape, bool)
        masked = np.where(allowed, contribution, -np.inf)
        order = np.argsort(-masked, axis=-1, kind="stable")[..., :e]
        keep = np.take_along_axis(allowed, order, -1) & (items >= 0)[..., None]
        return np.where(keep, order, -1)

    def react(self, world: World, users: np.ndarray, slates: np.ndarray, named: np.ndarray, listed: np.ndarray,
              reasons: np.ndarray) -> Reaction:
        """The users' reaction to explanations naming aspects ``named`` (B, K, E) of items whose
        catalogues list ``listed`` (B, K, d): ``align`` = mean over the named aspects of the user's
        taste for them, ``max(theta_ua, 0) / max_b theta_ub``; ``misrep`` = share of the named aspects
        the item lacks; the pull on perceived utility ``beta (align - gamma misrep)`` (0 where
        nothing is named; the backend weights it by trust, as a promotion's)."""
        cfg = self.cfg
        taste = world.population.taste[users]
        liking = np.maximum(taste, 0) / np.maximum(taste.max(1, keepdims=True), 1e-12)  # (B, d)
        valid = named >= 0
        n = valid.sum(2)
        safe = np.maximum(named, 0)
        align = np.where(valid, np.take_along_axis(liking[:, None, :], safe, 2), 0).sum(2)
        lacks = valid & ~np.take_along_axis(listed, safe, 2)
        align = np.where(n > 0, align / np.maximum(n, 1), 0.0)
        misrep = np.where(n > 0, lacks.sum(2) / np.maximum(n, 1), 0.0)
        pull = np.where(n > 0, cfg.explanation_pull * (align - cfg.misrep_penalty * misrep), 0.0)
        return Reaction(named=named, align=align, misrep=misrep, n_named=n, pull=pull, reasons=reasons)

    def click_lift(self, request: SlateRequest) -> np.ndarray:
        """(B,) each utility user's probability of clicking anything with the explanations minus
        without them, from the choice model on this round's utilities (NaN for language-model
        users, whose counterfactual would need a second call)."""
        cfg = self.cfg
        with_pull = choice_probabilities(perceived_utility(request, cfg.position_bias), cfg.outside_utility,
                                         cfg.temperature)[:, -1]
        bare = dataclasses.replace(request, explain_pull=None)
        without = choice_probabilities(perceived_utility(bare, cfg.position_bias), cfg.outside_utility,
                                       cfg.temperature)[:, -1]
        return np.where(self.backend.llm_rows(request.users), np.nan, without - with_pull)

    def update(self, world: World, users: np.ndarray, slates: np.ndarray, feedback: FeedbackBatch,
               claim_accuracy: np.ndarray) -> np.ndarray:
        """Trust, taste drift, satisfaction, fatigue and churn after a round.

        Args:
            claim_accuracy: (B, K) share of each shown promotion's claims that were true
                (1 where nothing was claimed).

        Returns:
            ids of the users who churned this round.
        """
        cfg, pop = self.cfg, world.population
        rows = np.flatnonzero(feedback.choice >= 0)
        clicked_users = users[rows]
        clicked_items = slates[rows, feedback.choice[rows]]
        # trust moves toward how truthful the promotion of the consumed item turned out to be
        accuracy = claim_accuracy[rows, feedback.choice[rows]]
        pop.trust[clicked_users] += cfg.trust_lr * (accuracy - pop.trust[clicked_users])
        # taste drifts toward what was consumed, keeping its norm (filter bubble)
        if cfg.drift > 0 and len(rows):
            theta = pop.taste[clicked_users]
            moved = theta + cfg.drift * cfg.taste_scale * (world.catalogue.embedding[clicked_items] - theta / cfg.taste_scale)
            pop.taste[clicked_users] = cfg.taste_scale * unit_rows(moved)
        pop.push_history(clicked_users, clicked_items)
        good = np.zeros(len(users), bool)
        good[rows] = feedback.stars[rows] >= 3
        pop.satisfaction[users] = 0.9 * pop.satisfaction[users] + 0.1 * good
        pop.fatigue[users] = np.where(good, 0, pop.fatigue[users] + 1)
        if not cfg.churn:
            return np.zeros(0, np.int64)
        churned = users[pop.fatigue[users] >= pop.patience[users]]
        pop.active[churned] = False
        return churned
