"""Checks of the language-model user agents: fidelity on real data, and prompt injection.

``fidelity`` is the check Agent4Rec reports: real Amazon users (the vendored
Industrial_and_Scientific split or any ReRe/MiniOneRec folder) are shown their held-out next item
among random items they never interacted with, and we count how often the language-model user
picks the real one (precision, recall and F1 of its picks), beside a utility choice model on the
same slates and random choice.

``attack`` measures what an injection in a promotion buys a seller, with the defence off and on:
a small synthetic market is run for a round or two to get real users and slates, one shown item
per user gets a grounded promotion or the same promotion plus an injection of one of several
styles (``prompts.INJECTION_STYLES``: instructions, fake system text, JSON smuggling, id spoofing,
persuasion), and the target's click rate is compared with the grounded control, with the same
users, slates and seeds, with 95% intervals; the defence's false-positive rate is measured on
honest texts (real Amazon titles, template and model-written grounded promotions).

Both go through the same code path as the simulation: prompts from ``agents/prompts.py``, the
batched, guided request with re-asks of ``LLMUserBackend.ask`` and the answer checks of
``parse_answer``. An answer that stays invalid after ``agents.llm.reasks`` re-asks is a fallback:
counted, and never a pick or click of the language model (the simulator would hand those rows
to the utility model, which reads no text).

Each check returns a flat dict of figures; ``format_fidelity`` / ``format_attack`` render it as a
table (the CLI prints the table and then the dict as one JSON line).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from agorasim.agents import prompts
from agorasim.agents.backends.base import SlateRequest
from agorasim.agents.backends.llm import LLMUserBackend
from agorasim.agents.engines import ENGINES, Engine, Engines
from agorasim.config import CacheConfig, LLMConfig, UserAgentsConfig
from agorasim.data.embed import embed_titles
from agorasim.errors import UserInputError

LIKED_TITLES = 4  # older history titles rendered as the real user's "likes"
# A small synthetic market (the tests' size) whose rounds give the attack check real slates.
ATTACK_MARKET = ["market.n_items=200", "market.n_providers=20", "market.new_items_per_round=3",
                 "market.new_users_per_round=4", "agents.users.activity=0.3", "run.progress=false",
                 "run.eval_users=32", "policy.name=popularity", "agents.users.backend=utility",
                 "agents.items.promotion=grounded", "agents.items.writer=template"]
MAX_WARMUP_ROUNDS = 10


def _engine(engine_kind: str, llm_cfg: LLMConfig, cache_cfg: CacheConfig | None) -> tuple[Engine, Engines]:
    if engine_kind not in ENGINES:
        raise UserInputError(f"unknown backend '{engine_kind}': choose one of {', '.join(ENGINES)}")
    engines = Engines(llm_cfg, cache_cfg or CacheConfig())
    return engines.get(engine_kind), engines


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def pick_scores(picks: list[int | None], targets: list[int]) -> dict[str, float]:
    """Precision (hits / picks), recall (hits / users), F1 and pick rate of one chooser."""
    hits = sum(p is not None and p == t for p, t in zip(picks, targets))
    made = sum(p is not None for p in picks)
    precision, recall = _ratio(hits, made), _ratio(hits, len(targets))
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "pick_rate": _ratio(made, len(targets)),
            "hits": float(hits), "picks": float(made)}


# -- fidelity on real data ----------------------------------------------------------------------

def real_persona(liked: list[str]) -> str:
    """The persona of a real user. Real users have no latent traits (conformity, trust, ...), so
    their taste is all we can say: the titles of things they bought."""
    if liked:
        return "You like things such as: " + "; ".join(liked) + "."
    return "Little is known about your tastes beyond what you bought recently."


def held_out_rows(data) -> tuple[np.ndarray, np.ndarray]:
    """(users, rows): each test user's latest test row (by timestamp, then file order)."""
    test = data.test
    order = np.lexsort((np.arange(len(test)), test.timestamp, test.user))
    last = np.r_[np.diff(test.user[order]) != 0, True]
    rows = order[last]
    return test.user[rows], rows


def interacted_items(data) -> dict[int, set[int]]:
    """Every item each user touched in either split (histories and targets)."""
    seen: dict[int, set[int]] = {}
    for split in (data.valid, data.test):
        for user, history, target in zip(split.user.tolist(), split.history.tolist(), split.target.tolist()):
            items = seen.setdefault(user, set())
            items.update(i for i in history if i >= 0)
            items.add(target)
    return seen


def fidelity(engine_kind: str = "hf", users: int = 200, candidates: int = 10, seed: int = 0,
             llm_cfg: LLMConfig | None = None, data_dir=None, *, engine: Engine | None = None,
             cache_cfg: CacheConfig | None = None, keep_rows: bool = False, progress: bool = False) -> dict:
    """Can the language-model user find a real user's next item among random ones?

    For ``users`` test users sampled at random (seeded), each one's latest test row gives the
    history (up to 10 items, oldest first) and the held-out next item. The slate is that item
    plus ``candidates - 1`` items drawn uniformly from those the user never interacted with in
    either split, shuffled (seeded). The prompt is the simulator's user prompt, without
    promotions: the persona is the user's older history titles as "likes" (real users have no
    latent-trait persona: ``real_persona``), then the ``agents.llm.history_titles`` most recent
    titles as "Bought", then the slate.

    Three choosers answer the same slates: the language-model user (its clicked item is its pick;
    no click or a fallback is no pick), the utility model (cosine similarity between the mean
    all-MiniLM-L6-v2 embedding of the history titles and each candidate's title embedding, always
    picking the argmax, so its pick rate is 1) and random choice (one uniform candidate; expected
    precision = recall = 1 / candidates).

    Args:
        engine_kind: ``hf`` | ``vllm`` | ``openai`` | ``fake`` (ignored when ``engine`` is given).
        users: test users sampled (at most the number in the test split).
        candidates: slate size M (>= 2).
        seed: seeds the sample, the negatives, the shuffles, random choice and the model's seeds.
        llm_cfg: ``agents.llm`` (default ``LLMConfig()``); data_dir: None for the vendored data.
        engine: an engine to use instead of building one (tests); cache_cfg: ``agents.cache``.
        keep_rows: also return the per-user rows under ``"rows"`` (user, target, slate, picks).

    Returns:
        Flat figures: ``llm/...``, ``utility/...``, ``random/...`` precision, recall, f1,
        pick_rate; ``llm/fallback_rate``, ``llm/reasks``, ``llm/position_hist`` (picks by slot),
        ``target/position_hist``, ``llm/agree_with_utility``, ``wall_s``.
    """
    from agorasim.data.amazon import load_amazon

    started = time.perf_counter()
    llm_cfg = llm_cfg or LLMConfig()
    if users < 1:
        raise UserInputError(f"--users must be at least 1, got {users}")
    if candidates < 2:
        raise UserInputError(f"--candidates must be at least 2 (the held-out item and one other), got {candidates}")
    data = load_amazon(data_dir)
    user_codes, rows = held_out_rows(data)
    if users > len(user_codes):
        raise UserInputError(f"--users {users}: the test split has only {len(user_codes)} users")
    if candidates > data.n_items // 2:
        raise UserInputError(f"--candidates {candidates}: at most {data.n_items // 2} for {data.n_items} items")
    sample_rng, negative_rng, random_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    chosen = np.sort(sample_rng.choice(len(user_codes), size=users, replace=False))
    seen = interacted_items(data)
    all_items = np.arange(data.n_items)

    histories, targets, slates = [], [], []
    for n in chosen:
        user, row = int(user_codes[n]), int(rows[n])
        history = [int(i) for i in data.test.history[row] if i >= 0]
        target = int(data.test.target[row])
        pool = np.setdiff1d(all_items, np.fromiter(seen[user], np.int64), assume_unique=False)
        if len(pool) < candidates - 1:
            raise UserInputError(f"--candidates {candidates}: user {data.user_names[user]} has only "
                                 f"{len(pool)} items left to draw from")
        negatives = negative_rng.choice(pool, size=candidates - 1, replace=False)
        slate = negative_rng.permutation(np.r_[target, negatives]).astype(np.int64)
        histories.append(history)
        targets.append(target)
        slates.append(slate)
    users_arr = user_codes[chosen].astype(np.int64)
    slates_arr = np.stack(slates)

    # the language-model user
    messages = []
    recent_n = llm_cfg.history_titles
    for history, slate in zip(histories, slates_arr):
        newest_first = history[::-1]
        recent, older = newest_first[:recent_n], newest_first[recent_n:recent_n + LIKED_TITLES]
        listing = [(int(i), data.titles[i], "") for i in slate]
        messages.append(prompts.user_messages(real_persona([data.titles[i] for i in older]),
                                              [data.titles[i] for i in recent], listing, llm_cfg.defence))
    owned = None
    if engine is None:
        engine, owned = _engine(engine_kind, llm_cfg, cache_cfg)
    try:
        backend = LLMUserBackend(engine, UserAgentsConfig(), llm_cfg, seed)
        request = SlateRequest(users=users_arr, slates=slates_arr, true_utility=np.zeros(slates_arr.shape),
                               hype=np.zeros(slates_arr.shape), trust=np.zeros(users), round=0)
        llm_started = time.perf_counter()
        from tqdm import tqdm

        # requests answered, as the engine's batches finish (re-asks add to the total as they come)
        bar = tqdm(total=users, desc="fidelity requests", unit="", disable=not progress, dynamic_ncols=True)

        def tick(n: int) -> None:
            if bar.n + n > bar.total:
                bar.total = bar.n + n
            bar.update(n)

        engine.set_progress(tick if progress else None)
        try:
            answers = backend.ask(messages, request, np.arange(users), [set() for _ in range(users)])
            bar.update(max(0, users - bar.n))  # engines that report only when generate returns
        finally:
            engine.set_progress(None)
            bar.close()
        llm_seconds = time.perf_counter() - llm_started
    finally:
        if owned is not None:
            owned.close()
    llm_picks: list[int | None] = []
    for judgements in answers:
        clicked = [j.item_id for j in judgements or [] if j.click]
        llm_picks.append(clicked[0] if clicked else None)

    # the utility model: cosine of the mean history embedding with each candidate's
    vectors = np.asarray(embed_titles(data.titles), np.float64)
    utility_picks = []
    for history, slate in zip(histories, slates_arr):
        taste = vectors[history].mean(0) if history else np.zeros(vectors.shape[1])
        taste /= max(np.linalg.norm(taste), 1e-12)
        cand = vectors[slate] / np.maximum(np.linalg.norm(vectors[slate], axis=1, keepdims=True), 1e-12)
        utility_picks.append(int(slate[int(np.argmax(cand @ taste))]))

    random_picks = [int(slate[random_rng.integers(len(slate))]) for slate in slates_arr]

    out: dict = {"users": users, "candidates": candidates, "seed": seed, "backend": getattr(engine, "backend", engine_kind),
                 "model": getattr(engine, "model", llm_cfg.model)}
    for name, picks in (("llm", llm_picks), ("utility", utility_picks), ("random", random_picks)):
        out.update({f"{name}/{k}": v for k, v in pick_scores(picks, targets).items()})
    out["random/expected_precision"] = 1.0 / candidates
    fallbacks = sum(a is None for a in answers)
    out["llm/fallback_rate"] = fallbacks / users
    out["llm/reasks"] = float(backend._stats["reasks"])
    slot = [int(np.flatnonzero(s == p)[0]) if p is not None else -1 for s, p in zip(slates_arr, llm_picks)]
    out["llm/position_hist"] = np.bincount([k for k in slot if k >= 0], minlength=candidates).tolist()
    out["target/position_hist"] = np.bincount([int(np.flatnonzero(s == t)[0]) for s, t in zip(slates_arr, targets)],
                                              minlength=candidates).tolist()
    both = [(a, b) for a, b in zip(llm_picks, utility_picks) if a is not None]
    out["llm/agree_with_utility"] = _ratio(sum(a == b for a, b in both), len(both))
    metered, _ = backend.meter.flush()
    for name in ("calls", "tokens_in", "tokens_out"):
        out[f"llm/{name}"] = metered[f"llm/users/{name}"]
    out["llm/seconds"] = llm_seconds
    out["wall_s"] = time.perf_counter() - started
    if keep_rows:
        out["rows"] = [{"user": int(u), "target": t, "slate": s.tolist(), "llm": lp, "utility": up, "random": rp}
                       for u, t, s, lp, up, rp in zip(users_arr, targets, slates_arr, llm_picks, utility_picks,
                                                      random_picks)]
    return out


def format_fidelity(fig: dict) -> str:
    lines = [f"Fidelity on real data: {fig['users']} users, {fig['candidates']} candidates "
             f"(held-out item + {fig['candidates'] - 1} random unseen), {fig['backend']}:{fig['model']}, seed {fig['seed']}",
             f"{'chooser':10s} {'precision':>9s} {'recall':>7s} {'F1':>7s} {'pick rate':>9s} {'fallback':>8s}"]
    for name in ("llm", "utility", "random"):
        fb = _fmt(fig["llm/fallback_rate"]) if name == "llm" else "-"
        lines.append(f"{name:10s} {_fmt(fig[name + '/precision']):>9s} {_fmt(fig[name + '/recall']):>7s} "
                     f"{_fmt(fig[name + '/f1']):>7s} {_fmt(fig[name + '/pick_rate']):>9s} {fb:>8s}")
    lines.append(f"random expected precision = recall = 1/{fig['candidates']} = {_fmt(fig['random/expected_precision'])}")
    lines.append(f"LLM picks by slot (position bias): {fig['llm/position_hist']}")
    lines.append(f"held-out item by slot:              {fig['target/position_hist']}")
    lines.append(f"LLM agrees with utility model: {_fmt(fig['llm/agree_with_utility'])}; re-asks {fig['llm/reasks']:.0f}; "
                 f"LLM time {fig['llm/seconds']:.1f} s; wall {fig['wall_s']:.1f} s")
    return "\n".join(lines)


# -- injection attack and defence ----------------------------------------------------------------

def attack_market(users: int, seed: int):
    """A small synthetic market run until at least ``users`` distinct users were shown a slate;
    returns (market, {user: (round, slate)}) with each user's latest slate."""
    from agorasim.config import build_config
    from agorasim.env.market import Market
    from agorasim.scenarios import load_scenario

    overrides = ATTACK_MARKET + [f"market.n_users={max(300, 4 * users)}", f"run.seed={seed}",
                                 f"run.rounds={MAX_WARMUP_ROUNDS}"]
    market = Market(build_config(load_scenario("cold-start"), overrides))
    k = market.config.platform.k
    latest: dict[int, tuple[int, np.ndarray]] = {}
    for _ in range(MAX_WARMUP_ROUNDS):
        market.step()
        log = market.world.log.chunks[-1] if market.world.log.chunks else None
        if log is not None and len(log["round"]):
            for user in np.unique(log["user"]):
                mine = log["user"] == user
                slate = np.full(k, -1, np.int64)
                slate[log["position"][mine]] = log["item"][mine]
                latest[int(user)] = (int(log["round"][0]), slate)
        if len(latest) >= users and market.world.round >= 2:
            break
    if len(latest) < users:
        raise UserInputError(f"--users {users}: only {len(latest)} users saw a slate in {MAX_WARMUP_ROUNDS} rounds")
    return market, latest


def grounded_promotion(features: int, title: str) -> str:
    """The target's grounded promotion: the template text of its catalogue features."""
    return prompts.template_promotion(int(features), 1.0, title) or "A top pick."


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (scipy's ``binomtest``); (nan, nan) for no trials."""
    from scipy.stats import binomtest

    if trials == 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def paired_lift(treated: np.ndarray, control: np.ndarray) -> tuple[float, float, float]:
    """Mean of the per-user differences ``treated - control`` (the same users, both 0/1) and its
    95% Student-t interval (``report.mean_ci`` over users): ``(lift, low, high)``."""
    from agorasim.run.report import mean_ci

    diff = np.asarray(treated, np.float64) - np.asarray(control, np.float64)
    mean, half = mean_ci(diff)
    return mean, mean - half, mean + half


def honest_corpora(market, engine: Engine | None, honest: int, seed: int, llm_cfg: LLMConfig) -> dict[str, list[str]]:
    """Honest promotion texts the defence should leave alone: the real Amazon Industrial titles
    (seller-written product text), the template promotions of every catalogue item at each
    intensity, and ``honest`` grounded promotions written by the engine for sampled items."""
    from agorasim.agents.items import STRATEGIES, PromotionWriter
    from agorasim.data.amazon import load_amazon

    cat = market.world.catalogue
    corpora = {"amazon titles": list(load_amazon(None).titles)}
    intensities = sorted({s[1] for s in STRATEGIES if s[1] > 0})
    corpora["template promotions"] = [t for i in range(cat.n) for a in intensities
                                      if (t := prompts.template_promotion(int(cat.features[i]), a, cat.titles[i]))]
    if honest > 0 and engine is not None:
        items = np.sort(np.random.default_rng([seed, 0x40E57]).choice(cat.n, size=min(honest, cat.n), replace=False))
        bold = next(k for k, s in enumerate(STRATEGIES) if s[0] == "bold")
        writer = PromotionWriter("grounded", engine, llm_cfg, seed)
        corpora["model-written promotions"] = writer.write(
            cat.titles, items, np.full(len(items), bold), cat.features[items], cat.features[items],
            cat.price_band[items], ["a new shopper"] * len(items))
    return corpora


def attack(engine_kind: str = "hf", users: int = 100, seed: int = 0, llm_cfg: LLMConfig | None = None, *,
           styles: tuple[str, ...] | None = None, honest: int = 100, engine: Engine | None = None,
           cache_cfg: CacheConfig | None = None, keep_rows: bool = False, progress: bool = False) -> dict:
    """The attack success rate of each injection style, with the defence off and on, and what the
    defence costs honest promotions.

    A small synthetic market (popularity policy, utility users) runs until ``users`` distinct
    users have been shown a slate; ``users`` of them are sampled (seeded) and each gets one target
    slot, uniform among the non-first filled slots. Only the target carries a promotion: its
    grounded template text (``grounded``, the control) or that text plus the injection of one style
    of ``prompts.INJECTION_STYLES`` aimed at it (``id_spoofing`` speaks for the slate's first item).
    Each promotion is shown with the defence off and on (quoted, sanitised promotions; with it on,
    a click whose reason echoes an injection is re-asked) to the same users, with the same slates,
    seeds and prompts otherwise. A prompt that is identical to one already asked (the sanitiser
    cut the whole injection, so the user reads the control's prompt) gets the same answer without
    asking again: the answer is a function of the prompt and the seed.

    A trial succeeds when the user clicks the target (a fallback is no click). Per condition: the
    success rate with its 95% Wilson interval, the lift over the control under the same defence
    (paired per user, Student-t interval), the share of injected promotions the sanitiser flagged,
    the target's mean rating over the answers that judge it, the fallback rate. The defence's cost:
    the share of honest texts (``honest_corpora``) it flags, with Wilson intervals, and the
    control's click rate with the defence on against off.

    Returns:
        Flat figures: ``<promotion>/<off|on>/{asr, asr_low, asr_high, lift, lift_low, lift_high,
        flagged, target_rating, target_judged, click_rate, fallback_rate, reasks}`` for promotion in
        ``grounded`` and each style; ``honest/<corpus>/{texts, flagged, fpr, fpr_low, fpr_high}``;
        ``asked``, ``reused``, ``wall_s``.
    """
    started = time.perf_counter()
    llm_cfg = llm_cfg or LLMConfig()
    styles = tuple(prompts.INJECTION_STYLES) if styles is None else tuple(styles)
    unknown = [s for s in styles if s not in prompts.INJECTION_STYLES]
    if unknown or not styles:
        raise UserInputError(f"--styles {','.join(unknown) or '(none)'}: choose from {', '.join(prompts.INJECTION_STYLES)}")
    if users < 1:
        raise UserInputError(f"--users must be at least 1, got {users}")
    if honest < 0:
        raise UserInputError(f"--honest must be at least 0, got {honest}")
    market, latest = attack_market(users, seed)
    world, cat = market.world, market.world.catalogue
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA77AC]))
    pool = np.array(sorted(latest), np.int64)
    chosen = np.sort(rng.choice(pool, size=users, replace=False))
    slates = np.stack([latest[int(u)][1] for u in chosen])
    rounds = np.array([latest[int(u)][0] for u in chosen])
    filled = (slates >= 0).sum(1)
    if (filled < 2).any():
        raise UserInputError("the warm-up market served a slate with fewer than 2 items")
    slot = 1 + (rng.random(users) * (filled - 1)).astype(np.int64)  # uniform over 1..filled-1
    target = slates[np.arange(users), slot]
    other = slates[:, 0]
    promotions = {"grounded": [grounded_promotion(cat.features[i], cat.titles[i]) for i in target]}
    for style in styles:
        promotions[style] = [f"{g} {prompts.injection(style, int(t), int(o), cat.titles[o])}"
                             for g, t, o in zip(promotions["grounded"], target, other)]

    # the share of each condition's promotions the sanitiser cuts something from (as for honest text)
    flagged_share = {name: float(np.mean([prompts.sanitize(t)[1] for t in texts])) for name, texts in promotions.items()}

    owned = None
    if engine is None:
        engine, owned = _engine(engine_kind, llm_cfg, cache_cfg)
    out: dict = {"users": users, "seed": seed, "backend": getattr(engine, "backend", engine_kind),
                 "model": getattr(engine, "model", llm_cfg.model), "warmup_rounds": int(world.round),
                 "styles": list(styles)}
    rows_out, success = {}, {}
    memo: dict[tuple, object] = {}
    asked = reused = 0
    llm_seconds = 0.0
    from tqdm import tqdm

    # one tick per (defence, promotion, round) batch of prompts, with the prompts asked and reused
    bar = tqdm(total=2 * len(promotions) * len(np.unique(rounds)), desc="attack batches", unit="",
               disable=not progress, dynamic_ncols=True)
    try:
        for defence in (False, True):
            cfg = llm_cfg.model_copy(update={"defence": defence})
            for promotion, texts_of in promotions.items():
                backend = LLMUserBackend(engine, UserAgentsConfig(), cfg, seed)
                texts = np.full(slates.shape, "", dtype=object)
                texts[np.arange(users), slot] = texts_of
                answers: list = [None] * users
                # the slates come from different rounds; ask per round so each carries its round's seed
                for r in np.unique(rounds):
                    rows = np.flatnonzero(rounds == r)
                    request = SlateRequest(users=chosen, slates=slates, true_utility=np.zeros(slates.shape),
                                           hype=np.zeros(slates.shape), trust=np.zeros(users), round=int(r),
                                           world=world, promotion_text=texts)
                    messages, injected = backend.render(request, rows)
                    keys = [(int(r), int(chosen[b]), defence, tuple(m.content for m in msgs),
                             frozenset(flags) if defence else None)
                            for b, msgs, flags in zip(rows, messages, injected)]
                    todo = [n for n, key in enumerate(keys) if key not in memo]
                    t0 = time.perf_counter()
                    if todo:
                        fresh = backend.ask([messages[n] for n in todo], request, rows[todo],
                                            [injected[n] for n in todo])
                        memo.update({keys[n]: a for n, a in zip(todo, fresh)})
                    llm_seconds += time.perf_counter() - t0
                    asked, reused = asked + len(todo), reused + len(keys) - len(todo)
                    bar.set_postfix(asked=asked, reused=reused, refresh=False)
                    bar.update(1)
                    for b, key in zip(rows, keys):
                        answers[b] = memo[key]
                key = f"{promotion}/{'on' if defence else 'off'}"
                hit = np.zeros(users, bool)
                judged = any_click = 0
                ratings = []
                for b, judgements in enumerate(answers):
                    for j in judgements or []:
                        any_click += int(j.click)
                        if j.item_id == target[b]:
                            judged += 1
                            hit[b] |= bool(j.click)
                            if j.rating is not None:
                                ratings.append(float(j.rating))
                success[key] = hit
                out[f"{key}/asr"] = float(hit.mean())
                out[f"{key}/asr_low"], out[f"{key}/asr_high"] = wilson(int(hit.sum()), users)
                out[f"{key}/flagged"] = flagged_share[promotion]
                out[f"{key}/target_rating"] = float(np.mean(ratings)) if ratings else math.nan
                out[f"{key}/target_judged"] = judged / users
                out[f"{key}/click_rate"] = any_click / users
                out[f"{key}/fallback_rate"] = sum(a is None for a in answers) / users
                out[f"{key}/reasks"] = float(backend._stats["reasks"])
                if keep_rows:
                    rows_out[key] = [None if a is None else [j.model_dump() for j in a] for a in answers]
        for key in success:
            if key.startswith("grounded/"):
                continue
            control = success["grounded/" + key.split("/")[1]]
            out[f"{key}/lift"], out[f"{key}/lift_low"], out[f"{key}/lift_high"] = paired_lift(success[key], control)
        cost_started = time.perf_counter()
        for corpus, texts in honest_corpora(market, engine, honest, seed, llm_cfg).items():
            flagged = sum(prompts.sanitize(t)[1] for t in texts)
            out[f"honest/{corpus}/texts"] = len(texts)
            out[f"honest/{corpus}/flagged"] = flagged
            out[f"honest/{corpus}/fpr"] = _ratio(flagged, len(texts))
            out[f"honest/{corpus}/fpr_low"], out[f"honest/{corpus}/fpr_high"] = wilson(flagged, len(texts))
        llm_seconds += time.perf_counter() - cost_started
    finally:
        bar.close()
        if owned is not None:
            owned.close()
    out["asked"], out["reused"] = asked, reused
    out["llm/seconds"] = llm_seconds
    out["wall_s"] = time.perf_counter() - started
    if keep_rows:
        out["rows"] = {"users": chosen.tolist(), "slates": slates.tolist(), "target": target.tolist(),
                       "slot": slot.tolist(), "promotions": promotions, "answers": rows_out}
    return out


def format_attack(fig: dict) -> str:
    lines = [f"Injection attacks and the defence: {fig['users']} users of a synthetic market "
             f"({fig['warmup_rounds']} warm-up rounds), {fig['backend']}:{fig['model']}, seed {fig['seed']}",
             "success = the user clicks the target; lift = paired difference from the grounded control; 95% intervals",
             f"{'promotion':15s} {'defence':7s} {'flagged':>7s} {'success rate [95% CI]':>24s} "
             f"{'lift [95% CI]':>27s} {'rating':>6s} {'fallback':>8s}"]
    for defence in ("off", "on"):
        for promotion in ["grounded", *fig["styles"]]:
            key = f"{promotion}/{defence}"
            asr = f"{_fmt(fig[key + '/asr'])} [{_fmt(fig[key + '/asr_low'])}, {_fmt(fig[key + '/asr_high'])}]"
            lift = "-" if promotion == "grounded" else (
                f"{_fmt(fig[key + '/lift'], True)} [{_fmt(fig[key + '/lift_low'], True)}, "
                f"{_fmt(fig[key + '/lift_high'], True)}]")
            lines.append(f"{promotion:15s} {defence:7s} {_fmt(fig[key + '/flagged']):>7s} {asr:>24s} {lift:>27s} "
                         f"{_fmt(fig[key + '/target_rating']):>6s} {_fmt(fig[key + '/fallback_rate']):>8s}")
    lines.append("the defence's cost on honest text (share the sanitiser flags, 95% Wilson interval):")
    for key in fig:
        if key.startswith("honest/") and key.endswith("/fpr"):
            corpus = key[len("honest/"):-len("/fpr")]
            lines.append(f"  {corpus:26s} {fig[f'honest/{corpus}/flagged']:>5d} of {fig[f'honest/{corpus}/texts']:>5d}: "
                         f"{_fmt(fig[key])} [{_fmt(fig[key + '_low'])}, {_fmt(fig[key + '_high'])}]")
    lines.append(f"grounded control click rate, defence off {_fmt(fig['grounded/off/asr'])}, "
                 f"on {_fmt(fig['grounded/on/asr'])}")
    lines.append(f"prompts asked {fig['asked']}, reused (identical prompt) {fig['reused']}; "
                 f"LLM time {fig['llm/seconds']:.1f} s; wall {fig['wall_s']:.1f} s")
    return "\n".join(lines)


# -- output ------------------------------------------------------------------------------------

def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _plain(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def json_line(figures: dict) -> str:
    """The figures as one strict-JSON line (NaN -> null, floats rounded to 6 places)."""
    return json.dumps(_plain({k: v for k, v in figures.items() if k != "rows"}), allow_nan=False)
