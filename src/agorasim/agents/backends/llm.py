"""Language-model user agents: read the slate and its promotions, answer grounded JSON.

For each round, the users selected by ``llm_share`` (a fixed hash of the user id, so the same
users stay language-model driven all run) get a prompt (``agents/prompts.py``); the answer must
be a JSON list of ``{item_id, click, rating, reason}`` judgements about items of *their* slate.
Unknown ids, duplicates, several clicks, a click without a rating, malformed JSON, a failed call
and (with the defence on) a click whose reason repeats an injected instruction are all rejected
and re-asked, up to ``agents.llm.reasks`` times, in one batched call per attempt. What is still
invalid is answered by the utility model, and counted (``llm/fallback_rate``).

The utility model's answer for the whole batch is drawn first, whatever the language model says,
so the random streams (and every utility-driven user) are the same as in a pure utility run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import ValidationError

from agorasim.agents import prompts
from agorasim.agents.backends.base import SlateRequest, UserBackend
from agorasim.agents.backends.utility import DISAPPOINTED, LIKED, NOT_INTERESTED, PREFERRED_OTHER, UtilityBackend
from agorasim.agents.engines import ChatRequest, Engine, Meter
from agorasim.agents.feedback import FeedbackBatch, LLMJudgement, rating_to_stars

LLM_HASH = np.uint64(0x9E3779B97F4A7C15)
TRAITS = ("conformity", "novelty", "social", "trust", "patience")  # what a persona is rendered from


def hash_share(users: np.ndarray, share: float, multiplier: np.uint64) -> np.ndarray:
    """A fixed ``share`` of users: a multiplicative hash of the id below ``share`` (a larger share
    only adds users; another multiplier picks an independent subset)."""
    if share >= 1:
        return np.ones(len(users), bool)
    h = (users.astype(np.uint64) * multiplier) >> np.uint64(40)
    return h.astype(np.float64) / 2**24 < share


def is_llm_user(users: np.ndarray, share: float) -> np.ndarray:
    """Users driven by the language model."""
    return hash_share(users, share, LLM_HASH)


def user_context(world, users: np.ndarray, history_titles: int) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """What a prompt says about each user: (persona texts, recent history titles, liked titles).
    The persona is rendered from the latent traits and the titles that best match the taste."""
    pop, cat = world.population, world.catalogue
    liked = prompts.liked_titles(pop.taste[users], cat.embedding, cat.alive_ids(), cat.titles)
    personas, histories = [], []
    for n, user in enumerate(users):
        traits = {name: float(getattr(pop, name)[user]) for name in TRAITS}
        personas.append(prompts.persona(traits, liked[n]))
        past = [i for i in pop.history[user] if i >= 0][::-1][:history_titles]
        histories.append([cat.titles[i] for i in past])
    return personas, histories, liked


def parse_answer(text: str, slate: list[int], injected: set[int] | None = None) -> list[LLMJudgement]:
    """Validated, grounded judgements from an answer; raises ValueError naming the first problem."""
    raw = prompts.extract_json(text)
    if not isinstance(raw, list) or not raw:
        raise ValueError("expected a non-empty JSON list of judgements")
    try:
        judgements = [LLMJudgement.model_validate(x) for x in raw]
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "judgement"
        raise ValueError(f"{where}: {first['msg']}") from None
    shown, seen = set(slate), set()
    for j in judgements:
        if j.item_id not in shown:
            raise ValueError(f"item {j.item_id} is not in the list")
        if j.item_id in seen:
            raise ValueError(f"item {j.item_id} judged twice")
        seen.add(j.item_id)
        if j.click and j.rating is None:
            raise ValueError(f"item {j.item_id} is clicked without a rating")
    clicks = [j for j in judgements if j.click]
    if len(clicks) > 1:
        raise ValueError("more than one item clicked")
    if injected and clicks and clicks[0].item_id in injected and prompts.is_injection(clicks[0].reason):
        raise ValueError("the reason repeats an instruction from a promotion; judge the items yourself")
    return judgements


def ask_until_valid(engine: Engine, meter: Meter, cfg, messages: list, slates: list[list[int]],
                    seed: Callable[[int, int], int], injected: list[set[int]] | None = None):
    """Ask every conversation for grounded judgements of its slate, in one batched call per
    attempt, re-asking the invalid ones (with what was wrong) up to ``cfg.reasks`` times.

    Args:
        messages: one conversation per row; slates: the item ids each row may judge.
        seed: (row, attempt) -> request seed.
        injected: per row, the items whose promotion held an injection (the output check), or None.

    Returns:
        (judgements per row, None where no attempt was valid; number of re-asks).
    """
    results: list[list[LLMJudgement] | None] = [None] * len(slates)
    current, pending, reasks = list(messages), list(range(len(slates))), 0
    for attempt in range(cfg.reasks + 1):
        batch = [ChatRequest(messages=current[i], max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=seed(i, attempt),
                             json_schema=prompts.user_schema(slates[i]) if cfg.structured else None,
                             guide=prompts.user_guide(slates[i]) if cfg.structured else None)
                 for i in pending]
        responses = engine.generate(batch)
        meter.add(responses)
        retry = []
        for i, response in zip(pending, responses):
            try:
                if response.error is not None:
                    raise ValueError(f"the call failed ({response.error})")
                results[i] = parse_answer(response.text, slates[i], injected[i] if injected else None)
            except ValueError as problem:
                retry.append(i)
                current[i] = prompts.reask_messages(messages[i], response.text, str(problem))
        if attempt < cfg.reasks:
            reasks += len(retry)
        pending = retry
        if not pending:
            break
    return results, reasks


class LLMUserBackend(UserBackend):
    """User agents driven by a text engine, with the utility model as the fallback.

    Args:
        engine: the (cached) text engine.
        users_cfg: ``agents.users``; llm_cfg: ``agents.llm``; seed: the run seed.
    """

    name = "llm"

    def __init__(self, engine: Engine, users_cfg, llm_cfg, seed: int = 0):
        self.engine = engine
        self.utility = UtilityBackend(users_cfg)
        self.share = users_cfg.llm_share
        self.cfg = llm_cfg
        self.seed = seed
        self.meter = Meter("users", llm_cfg.price_in, llm_cfg.price_out)
        self._stats = self._zero()

    @staticmethod
    def _zero() -> dict[str, int]:
        return {"rows": 0, "visits": 0, "fallbacks": 0, "reasks": 0, "clicks": 0, "agree": 0,
                "injected_clicks": 0}

    def llm_rows(self, users: np.ndarray) -> np.ndarray:
        return is_llm_user(users, self.share)

    def decide(self, request: SlateRequest, rng: np.random.Generator) -> FeedbackBatch:
        base = self.utility.decide(request, rng)
        rows = np.flatnonzero(self.llm_rows(request.users))
        self._stats["visits"] += len(request.users)
        if len(rows) == 0:
            return base
        messages, injected = self.render(request, rows)
        answers = self.ask(messages, request, rows, injected)
        choice, stars, reason = base.choice.copy(), base.stars.copy(), base.reason.copy()
        why = {}
        for b, judgements, flagged in zip(rows, answers, injected):
            self._stats["rows"] += 1
            if judgements is None:
                self._stats["fallbacks"] += 1
                continue
            slate = request.slates[b]
            slot = {int(item): k for k, item in enumerate(slate) if item >= 0}
            clicked = [j for j in judgements if j.click]
            reason[b] = np.where(slate >= 0, PREFERRED_OTHER if clicked else NOT_INTERESTED, -1)
            if clicked:
                k = slot[clicked[0].item_id]
                rating = float(clicked[0].rating)
                choice[b], stars[b] = k, rating_to_stars(rating)
                reason[b, k] = LIKED if rating >= 5 else DISAPPOINTED
                self._stats["clicks"] += 1
                self._stats["injected_clicks"] += int(clicked[0].item_id in flagged)
            else:
                choice[b], stars[b] = -1, np.nan
            self._stats["agree"] += int(choice[b] == base.choice[b])
            why[int(b)] = {j.item_id: j.reason for j in judgements}
        return FeedbackBatch(choice=choice, stars=stars, reason=reason, why=why)

    def render(self, request: SlateRequest, rows: np.ndarray) -> tuple[list, list[set[int]]]:
        """Prompt messages for the given rows, and the items whose promotion holds an injection."""
        cat = request.world.catalogue
        personas, histories, _ = user_context(request.world, request.users[rows], self.cfg.history_titles)
        out, injected = [], []
        for b, persona, history in zip(rows, personas, histories):
            slate, flagged = [], set()
            for k, item in enumerate(request.slates[b]):
                if item < 0:
                    continue
                text = "" if request.promotion_text is None else str(request.promotion_text[b, k])
                if text and prompts.is_injection(text):
                    flagged.add(int(item))
                why = "" if request.explanation_text is None else str(request.explanation_text[b, k])
                slate.append((int(item), cat.titles[item], text, why))
            out.append(prompts.user_messages(persona, history, slate, self.cfg.defence))
            injected.append(flagged)
        return out, injected

    def _seed(self, round: int, user: int, attempt: int) -> int:
        return int((self.seed * 1_000_003 + round * 10_007 + user * 101 + attempt) % 2**31)

    def ask(self, messages: list, request: SlateRequest, rows: np.ndarray,
            injected: list[set[int]]) -> list[list[LLMJudgement] | None]:
        """Batched ask with bounded re-asks; None where every attempt was invalid."""
        slates = [[int(x) for x in request.slates[b] if x >= 0] for b in rows]
        users = [int(request.users[b]) for b in rows]
        results, reasks = ask_until_valid(
            self.engine, self.meter, self.cfg, messages, slates,
            lambda i, attempt: self._seed(request.round, users[i], attempt),
            injected if self.cfg.defence else None)
        self._stats["reasks"] += reasks
        return results

    def flush(self) -> tuple[dict[str, float], dict[str, float]]:
        s = self._stats
        metrics, timings = self.meter.flush()
        rows = max(s["rows"], 1)
        metrics.update({
            "llm/share": s["rows"] / max(s["visits"], 1),
            "llm/fallback_rate": s["fallbacks"] / rows if s["rows"] else float("nan"),
            "llm/fallbacks": float(s["fallbacks"]),
            "llm/reasks": float(s["reasks"]),
            "llm/click_rate": s["clicks"] / max(s["rows"] - s["fallbacks"], 1),
            "llm/agree_with_utility": s["agree"] / max(s["rows"] - s["fallbacks"], 1),
            "llm/injected_click_share": s["injected_clicks"] / max(s["clicks"], 1),
        })
        self._stats = self._zero()
        return metrics, timings
