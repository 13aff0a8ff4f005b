"""Explanations of the shown items: SELLER's explainers, judged by what they do to decisions.

SELLER (arXiv 2603.24136, ALGORITHMS.md section 8) evaluates an explanation by its text quality
*and* by its effect on the user's decision. The paper's code is not available; this is the
minimal faithful version of section 8, a reconstruction [inf] in every choice below:

- **Aspects.** An explanation names E aspects (``platform.explanation.n_aspects``). The aspects
  are the latent dimensions of the world's item vectors, named by ``aspect_names``. An item's
  catalogue lists the aspects its unit vector loads on at least ``aspect_threshold``
  (``item_aspects``): a published attribute list, true by construction, as the feature list is.
- **What the platform knows of a user** is its profile: the mean content vector of the items the
  user bought (``World.profiles``, the vector retrieval searches with), whose coordinates are the
  aspects seen through the content noise; never the taste vector.
- **Explainers** (``platform.explain``):
  ``template`` names, in ``grounded`` mode, the item's listed aspects the profile ranks highest;
  in ``free`` mode it names the profile's top aspects whether the item has them or not (a
  persuasive-but-false explanation). ``llm``: a text engine writes at most 25 words from the
  user's last purchase, liked aspects and the item's aspects (free mode: the liked aspects, and
  leave to exaggerate), and the aspects named are read back from the text. ``learned``: SELLER's
  small model (``LearnedExplainer``).
- **Labels.** After a click the user's review states their true reasons for the item (the users'
  side computes them, ``UserAgents.reasons``): the learned explainer trains on these reviews, the
  metrics compare every explanation with the reasons (``metrics.round.explanation_row``).

The users' reaction (the click pull of an explanation, what it costs trust) is the users' own,
in ``agents/users.py``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from agorasim.agents import prompts
from agorasim.agents.engines import ChatRequest, Engine, Message, Meter, fill_memo
from agorasim.config import ExplanationConfig
from agorasim.policy.threads import torch_threads

ASPECT_WORDS = (
    "sturdy", "stylish", "precise", "portable", "powerful", "intuitive", "versatile", "comfortable",
    "elegant", "reliable", "innovative", "safe", "spacious", "bright", "smooth", "warm",
    "rugged", "minimalist", "colourful", "classic", "sporty", "gentle", "efficient", "luxurious",
    "playful", "professional", "cosy", "robust", "sleek", "handy", "fun", "refined",
)
MAX_EXPLANATION_WORDS = 25


def aspect_names(dim: int) -> tuple[str, ...]:
    """Names of the ``dim`` aspects: words for the first 32, ``aspect <j>`` after."""
    return tuple(ASPECT_WORDS[j] if j < len(ASPECT_WORDS) else f"aspect {j}" for j in range(dim))


def item_aspects(embedding: np.ndarray, threshold: float) -> np.ndarray:
    """(..., d) the aspects each item's catalogue lists: coordinate of its unit vector >= threshold."""
    return embedding >= threshold


def top_aspects(score: np.ndarray, allowed: np.ndarray, e: int) -> np.ndarray:
    """(B, K, e) the ``e`` allowed aspects of highest score per row (ties: the lower index), -1
    where fewer are allowed."""
    masked = np.where(allowed, score, -np.inf)
    order = np.argsort(-masked, axis=-1, kind="stable")[..., :e]
    keep = np.take_along_axis(allowed, order, -1)
    return np.where(keep, order, -1)


def aspects_in_text(text: str, names: tuple[str, ...]) -> list[int]:
    """Aspects a text names, in the order they first appear."""
    lower = text.lower()
    found = []
    for j, name in enumerate(names):
        match = re.search(rf"\b{re.escape(name)}\b", lower)
        if match:
            found.append((match.start(), j))
    return [j for _, j in sorted(found)]


def render(named: np.ndarray, names: tuple[str, ...]) -> str:
    """The template text of one explanation (its named aspects, -1 padded)."""
    words = [names[a] for a in named if a >= 0]
    if not words:
        return ""
    return f"Picked for you: it is {' and '.join(words)}."


@dataclass
class ExplainRequest:
    """What an explainer sees of one round's slates (only what the platform knows).

    Attributes:
        users: (B,) user ids.
        slates: (B, K) shown item ids, -1 padded.
        listed: (B, K, d) aspects each shown item's catalogue lists.
        profile: (B, d) each user's profile (mean content of the history, unit norm; 0 without history).
        history: (B, H) the users' purchase histories (item ids, -1 padded, latest last).
        content: (n, c) the catalogue's content vectors (what the platform knows of every item).
        titles: item titles.
        writes: (B,) rows whose explanation text is read (language-model users, or every row for
            the ``llm`` explainer, whose aspects are read from its text).
        round: the round.
    """

    users: np.ndarray
    slates: np.ndarray
    listed: np.ndarray
    profile: np.ndarray
    history: np.ndarray
    content: np.ndarray
    titles: list[str]
    writes: np.ndarray
    round: int


@dataclass
class Explanations:
    """The explanations of a round's slates.

    Attributes:
        aspects: (B, K, E) aspects each explanation names, -1 padded (all -1 on empty slots).
        text: (B, K) the text language-model users read ("" where none was written).
    """

    aspects: np.ndarray
    text: np.ndarray


class Explainer(ABC):
    """Base explainer: subclasses choose the aspects; text is the template's unless overridden."""

    name = "explainer"
    learns = False  # trains on reviews (the round graph adds its training node)
    keys: tuple[str, ...] = ()  # training figures of the metrics row

    def __init__(self, cfg: ExplanationConfig, dim: int):
        self.cfg, self.names = cfg, aspect_names(dim)

    def explain(self, request: ExplainRequest, rng: np.random.Generator) -> Explanations:
        aspects = np.where((request.slates >= 0)[:, :, None], self.choose(request, rng), -1)
        return Explanations(aspects, self.texts(request, aspects))

    @abstractmethod
    def choose(self, request: ExplainRequest, rng: np.random.Generator) -> np.ndarray:
        """(B, K, E) the aspects to name for every slot (padding slots are blanked by ``explain``)."""

    def texts(self, request: ExplainRequest, aspects: np.ndarray) -> np.ndarray:
        out = np.full(request.slates.shape, "", dtype=object)
        rows, slots = np.nonzero((request.slates >= 0) & request.writes[:, None])
        for b, k in zip(rows, slots):
            out[b, k] = render(aspects[b, k], self.names)
        return out

    def learn(self, history: np.ndarray, items: np.ndarray, reasons: np.ndarray, content: np.ndarray,
              listed: np.ndarray, round: int, rng: np.random.Generator) -> dict[str, float]:
        """Train on the round's reviews (only the learned explainer trains); returns its figures."""
        return {}

    def flush(self) -> tuple[dict[str, float], dict[str, float]]:
        return {}, {}


class TemplateExplainer(Explainer):
    """Grounded: the item's listed aspects the user's profile ranks highest. Free: the profile's top
    aspects, listed or not (persuasive); a user without history gets the item's aspects."""

    name = "template"

    def choose(self, request, rng):
        e, listed = self.cfg.n_aspects, request.listed
        profile = np.broadcast_to(request.profile[:, None, :], listed.shape)
        if self.cfg.mode == "grounded":
            return top_aspects(profile, listed, e)
        known = np.abs(request.profile).sum(1) > 0
        allowed = np.where(known[:, None, None], True, listed)
        return top_aspects(profile, allowed, e)


class LLMExplainer(Explainer):
    """A text engine writes each explanation (memoised per item, liked aspects and last purchase);
    the aspects it names are read back from the text (at most E, in the order written), so a model
    that names an aspect the item lacks in grounded mode is counted as misrepresenting. A failed
    call, or a text that names no aspect, falls back to the template's choice and text, so the
    round goes on."""

    name = "llm"
    MEMO_LIMIT = 200_000

    def __init__(self, cfg: ExplanationConfig, dim: int, engine: Engine, llm_cfg, seed: int = 0):
        super().__init__(cfg, dim)
        self.engine, self.llm_cfg, self.seed = engine, llm_cfg, seed
        self.fallback = TemplateExplainer(cfg, dim)
        self.meter = Meter("explain", llm_cfg.price_in, llm_cfg.price_out)
        self.memo: dict[tuple, str | None] = {}

    def choose(self, request, rng):  # what a failed call falls back to
        return self.fallback.choose(request, rng)

    def explain(self, request, rng):
        template = self.choose(request, rng)
        liked = top_aspects(request.profile, np.ones(request.profile.shape, bool), 3)
        rows, slots = np.nonzero(request.slates >= 0)
        keys, todo = [], {}
        for b, k in zip(rows, slots):
            item = int(request.slates[b, k])
            last = int(request.history[b, -1])
            key = (item, tuple(int(a) for a in liked[b] if request.profile[b, a] > 0), last)
            keys.append(key)
            if key not in self.memo and key not in todo:
                todo[key] = self.request(request, b, k, key)
        fill_memo(self.engine, self.meter, self.memo, todo, self.MEMO_LIMIT,
                  lambda text: prompts.clip_words(text, MAX_EXPLANATION_WORDS))
        aspects = np.full(template.shape, -1, np.int64)
        text = np.full(request.slates.shape, "", dtype=object)
        e = self.cfg.n_aspects
        for b, k, key in zip(rows, slots, keys):
            written = self.memo.get(key)
            named = aspects_in_text(written, self.names)[:e] if written else []
            if not named:  # failed or named nothing: the template's explanation
                aspects[b, k] = template[b, k]
                text[b, k] = render(template[b, k], self.names)
                continue
            aspects[b, k, : len(named)] = named  # what the text names, listed or not (misrep counts it)
            text[b, k] = written
        return Explanations(aspects, text)

    def request(self, request: ExplainRequest, b: int, k: int, key: tuple) -> ChatRequest:
        item, liked, last = key
        listed = [self.names[a] for a in np.flatnonzero(request.listed[b, k])]
        liked_names = [self.names[a] for a in liked]
        grounded = self.cfg.mode == "grounded"
        aspects = listed if grounded else liked_names
        rule = ("Name only the product's aspects above; claim nothing else." if grounded
                else "Say whatever makes the shopper click; you may name aspects the product lacks.")
        text = (f"Write an explanation of at most {MAX_EXPLANATION_WORDS} words of why this product suits the shopper.\n"
                f"Product: {request.titles[item]}\nAspects: {', '.join(aspects) or 'none listed'}\n"
                f"The shopper likes: {', '.join(liked_names) or 'unknown'}\n"
                f"The shopper bought: {request.titles[last] if last >= 0 else 'nothing yet'}\n"
                f"{rule} Write only the explanation.")
        messages = [Message(role="system", content="You explain product recommendations in one short sentence."),
                    Message(role="user", content=text)]
        seed = (self.seed * 7919 + item * 31 + (last + 1) * 17) % 2**31
        return ChatRequest(messages=messages, max_tokens=48, temperature=self.llm_cfg.temperature,
                           top_p=self.llm_cfg.top_p, seed=seed)

    def flush(self):
        return self.meter.flush()


class DualPathAdapter(nn.Module):
    """SELLER's encoder and adapter [inf]: (i) a GRU over the content vectors of the user's history
    and (ii) an embedding of the item's listed aspects and content, mixed by a softmax-gated
    mixture of experts into ``prompt_tokens`` soft-prompt vectors of the tiny LM's width."""

    def __init__(self, content_dim: int, dim: int, hidden: int, experts: int, prompt_tokens: int):
        super().__init__()
        self.history_in = nn.Linear(content_dim, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.item_in = nn.Linear(content_dim + dim, hidden)
        self.gate = nn.Linear(2 * hidden, experts)
        self.experts = nn.Parameter(torch.randn(experts, 2 * hidden, prompt_tokens * hidden) / np.sqrt(2 * hidden))
        self.prompt_tokens, self.hidden = prompt_tokens, hidden

    def forward(self, history: torch.Tensor, history_valid: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """(N, P, h) soft prompts from history content (N, H, c), its mask (N, H) and item (N, c + d)."""
        steps = torch.tanh(self.history_in(history)) * history_valid[..., None]
        out, _ = self.gru(steps)  # histories are left-padded, latest last: the last step has read them all
        seen = out[:, -1] * (history_valid.sum(1, keepdim=True) > 0)
        x = torch.cat([seen, torch.tanh(self.item_in(item))], 1)
        gate = torch.softmax(self.gate(x), 1)  # (N, experts)
        mixed = torch.einsum("ne,neo->no", gate, torch.einsum("ni,eio->neo", x, self.experts))
        return mixed.view(len(x), self.prompt_tokens, self.hidden)


class LearnedExplainer(Explainer):
    """SELLER's small explainer [inf]: the dual-path adapter writes a soft prompt into a tiny causal
    LM (built from a config, vocabulary: the aspects and a start token), which emits E aspect tokens
    greedily, never one twice. Grounded mode restricts each token to the item's listed aspects
    (constrained decoding); free mode does not. Trained with cross-entropy on the reviews of
    clicked items (their true reasons, largest first), ``steps`` Adam steps every ``train_every``
    rounds over a buffer of the latest ``buffer`` reviews.

    Deviation from the issue's wording: the tiny LM is the explainer's own rather than the policy
    model, so explanations work with every policy (popularity, BPR, SASRec, generative)."""

    name = "learned"
    learns = True
    keys = ("explain/loss", "explain/steps")

    def __init__(self, cfg: ExplanationConfig, dim: int, content_dim: int, seed: int = 0):
        super().__init__(cfg, dim)
        from agorasim.policy.generative import build_model

        self.dim = dim
        self.start = dim  # the start token after the aspect tokens
        positions = cfg.prompt_tokens + 1 + cfg.n_aspects
        self.lm = build_model(dim + 3, cfg.hidden, cfg.layers, cfg.heads, positions, "qwen2", seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.adapter = DualPathAdapter(content_dim, dim, cfg.hidden, cfg.experts, cfg.prompt_tokens)
        self.optimiser = torch.optim.Adam([*self.lm.parameters(), *self.adapter.parameters()], lr=cfg.lr)
        self.buffer: dict[str, np.ndarray] = {}
        self.trained_steps = 0

    # -- model ---------------------------------------------------------------------------------
    def inputs(self, history: np.ndarray, items: np.ndarray, content: np.ndarray, listed: np.ndarray):
        """(history content, its mask, item input) tensors for N (history, item) pairs."""
        valid = history >= 0
        hist = torch.from_numpy(np.where(valid[..., None], content[np.maximum(history, 0)], 0).astype(np.float32))
        item = torch.from_numpy(np.concatenate([content[items], listed], 1).astype(np.float32))
        return hist, torch.from_numpy(valid.astype(np.float32)), item

    def logits(self, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T + 1, V) next-token logits after the soft prompt, the start token and ``tokens`` (N, T)."""
        embed = self.lm.get_input_embeddings()
        start = torch.full((len(prompt), 1), self.start, dtype=torch.long)
        x = torch.cat([prompt, embed(torch.cat([start, tokens], 1))], 1)
        return self.lm(inputs_embeds=x).logits[:, prompt.shape[1]:, : self.dim]

    def decode(self, history, items, content, listed) -> np.ndarray:
        """(N, E) greedy aspect tokens, -1 where no allowed aspect is left."""
        e = self.cfg.n_aspects
        with torch.no_grad(), torch_threads(1):
            prompt = self.adapter(*self.inputs(history, items, content, listed))
            allowed = torch.from_numpy(listed.copy()) if self.cfg.mode == "grounded" else torch.ones(listed.shape, dtype=torch.bool)
            tokens = torch.zeros((len(items), 0), dtype=torch.long)
            out = np.full((len(items), e), -1, np.int64)
            for step in range(e):
                logit = self.logits(prompt, tokens)[:, -1].masked_fill(~allowed, -torch.inf)
                pick = logit.argmax(1)
                ok = allowed.any(1)
                out[:, step] = np.where(ok.numpy(), pick.numpy(), -1)
                allowed[torch.arange(len(pick)), pick] = False
                tokens = torch.cat([tokens, pick[:, None]], 1)
        return out

    # -- contract --------------------------------------------------------------------------------
    def choose(self, request, rng):
        b, k = request.slates.shape
        rows, slots = np.nonzero(request.slates >= 0)
        out = np.full((b, k, self.cfg.n_aspects), -1, np.int64)
        if len(rows):
            out[rows, slots] = self.decode(request.history[rows], request.slates[rows, slots], request.content,
                                           request.listed[rows, slots])
        return out

    def learn(self, history, items, reasons, content, listed, round, rng):
        cfg = self.cfg
        self.remember(history, items, reasons, listed)
        n = len(self.buffer.get("items", ()))
        if n == 0 or round % cfg.train_every:
            return {}
        losses = []
        with torch_threads(1):
            for _ in range(cfg.steps):
                pick = rng.choice(n, min(cfg.batch_size, n), replace=False)
                target = torch.from_numpy(self.buffer["reasons"][pick])
                prompt = self.adapter(*self.inputs(self.buffer["history"][pick], self.buffer["items"][pick], content,
                                                   self.buffer["listed"][pick]))
                logit = self.logits(prompt, target.clamp(min=0)[:, :-1])
                loss = nn.functional.cross_entropy(logit.reshape(-1, self.dim), target.reshape(-1), ignore_index=-1)
                self.optimiser.zero_grad()
                loss.backward()
                self.optimiser.step()
                losses.append(loss.item())
        self.trained_steps += cfg.steps
        return {"explain/loss": float(np.mean(losses)), "explain/steps": float(self.trained_steps)}

    def remember(self, history, items, reasons, listed) -> None:
        """Append reviews with at least one reason; keep the newest ``buffer``."""
        keep = (reasons >= 0).any(1)
        new = {"history": history[keep], "items": items[keep], "reasons": reasons[keep], "listed": listed[keep]}
        for key, value in new.items():
            old = self.buffer.get(key)
            self.buffer[key] = (value if old is None else np.concatenate([old, value]))[-self.cfg.buffer:]


def build_explainer(explain: str, cfg: ExplanationConfig, dim: int, content_dim: int, engines, llm_cfg,
                    seed: int) -> Explainer | None:
    """The configured explainer (None for ``none``)."""
    if explain == "none":
        return None
    if content_dim != dim:
        raise ValueError(f"explanations read the user's profile in aspect coordinates: content vectors have "
                         f"{content_dim} dimensions, the items' vectors {dim}")
    if explain == "template":
        return TemplateExplainer(cfg, dim)
    if explain == "llm":
        return LLMExplainer(cfg, dim, engines.get(cfg.writer), llm_cfg, seed)
    if explain == "learned":
        return LearnedExplainer(cfg, dim, content_dim, seed)
    raise ValueError(f"unknown explainer {explain!r}")
