"""Generative recommender: a small causal LM over item semantic ids, trained inside the loop.

Items become L+1 code tokens (residual quantisation of their content vectors plus a
de-duplication code, ``policy/semantic_ids.py``). A user's prompt is ``[BOS] codes(h_1) ...
codes(h_P) [SEP]`` over their last P consumed items; the model generates the next item's codes
under the catalogue trie (``policy/trie.py``), so only listed items are ever produced.

Life of the policy in a run:
1. ``warmup_rounds`` rounds served by a popularity behaviour policy (the cold start);
2. SFT on the clicks logged so far (next-item prediction, teacher forcing);
3. every round after: beam search serves the users, then GRPO steps (``rl/``) on groups of G
   candidates per prompt scored by the simulator's users through the feedback oracle
   (``counterfactual`` mode) or, in ``served-only`` mode, with the served item's real feedback
   and a learned critic for the rest.
The model, optimiser, reference model and quantiser are plain attributes, so a checkpoint of the
market (a pickle) holds them and ``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from agorasim.agents.feedback import stars_to_rating
from agorasim.env.state import Catalogue, InteractionLog
from agorasim.policy.base import FeedbackOracle, Policy, RecommendRequest
from agorasim.policy.baselines import PopularityPolicy
from agorasim.policy.semantic_ids import SemanticIds, codes_to_tokens
from agorasim.policy.threads import torch_threads
from agorasim.policy.trie import CatalogueTrie, token_logprobs
from agorasim.rl import RewardContext, combine, compute_rewards, policy_loss, sync_reference

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
    """Semantic-id language-model recommender with SFT warm start and in-loop GRPO.

    Args:
        warmup_rounds: rounds served by the popularity behaviour policy before SFT.
        levels, codebook_size: residual quantisation of item content (L levels x codes).
        hidden, layers, heads, arch: the causal LM (``qwen2`` or ``llama``), built from a config.
        prompt_items: P, consumed items in the prompt.
        beams: items generated per user when serving (the rest of K' is padding).
        sft_epochs, sft_lr, sft_batch: the warm start.
        rl: GRPO settings (the ``rl`` config section).
        max_len: history length the market keeps (prompts use the last ``prompt_items``).
        grpo_every: rounds between GRPO steps (1 = every round).
        threads: torch intra-op threads while serving and training (restored after; None: leave).
        device: torch device of the model (``cuda`` on a GPU machine).
    """

    name = "generative"

    def __init__(self, warmup_rounds: int = 10, levels: int = 3, codebook_size: int = 256, hidden: int = 64,
                 layers: int = 2, heads: int = 4, arch: str = "qwen2", prompt_items: int = 10, beams: int = 20,
                 sft_epochs: int = 10, sft_lr: float = 3e-3, sft_batch: int = 256, rl: dict | None = None,
                 max_len: int = 20, grpo_every: int = 1, threads: int | None = 1, device: str = "cpu"):
        if arch not in ("qwen2", "llama"):
            raise ValueError(f"generative: arch must be qwen2 or llama, got {arch!r}")
        for name, value in dict(warmup_rounds=warmup_rounds, levels=levels, codebook_size=codebook_size, hidden=hidden,
                                layers=layers, heads=heads, prompt_items=prompt_items, beams=beams,
                                sft_batch=sft_batch, grpo_every=grpo_every).items():
            if value < 1:
                raise ValueError(f"generative: {name} must be >= 1, got {value}")
        if hidden % heads:
            raise ValueError(f"generative: hidden ({hidden}) must be a multiple of heads ({heads})")
        from agorasim.config import RLConfig

        self.rl = RLConfig.model_validate(rl or {})
        self.warmup_rounds, self.levels, self.codebook_size = warmup_rounds, levels, codebook_size
        self.hidden, self.layers, self.heads, self.arch = hidden, layers, heads, arch
        self.prompt_items, self.beams = min(prompt_items, max_len), beams
        self.sft_epochs, self.sft_lr, self.sft_batch = sft_epochs, sft_lr, sft_batch
        self.grpo_every = grpo_every
        self.threads = threads
        self.device = str(device)
        self.behaviour = PopularityPolicy(refit_every=1)
        self.oracle: FeedbackOracle | None = None
        self.ids: SemanticIds | None = None
        self.tokens: np.ndarray | None = None  # (n_items, L+1) token ids of every known item
        self.trie: CatalogueTrie | None = None
        self.model = self.reference = self.optimizer = None
        self.ready = False  # SFT done: the model serves
        self.steps = 0
        self._served: tuple[np.ndarray, np.ndarray] | None = None  # (users, history) of the round
        self.critic = ServedCritic()

    # -- contract ------------------------------------------------------------------------------
    def bind(self, oracle: FeedbackOracle) -> None:
        self.oracle = oracle

    def __getstate__(self):
        state = self.__dict__.copy()
        state["oracle"] = None  # the market re-binds itself after loading
        return state

    def recommend(self, request: RecommendRequest, rng: np.random.Generator):
        self._served = (request.users.copy(), request.history.copy())
        if not self.ready:
            return self.behaviour.recommend(request, rng)
        self._sync_catalogue(request.alive)
        with torch_threads(self.threads):
            items, scores = self._beam_search(request.history, min(self.beams, request.k))
        pad = request.k - items.shape[1]
        if pad > 0:
            items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return items, scores

    def update(self, log: InteractionLog, catalogue: Catalogue, round: int, rng: np.random.Generator):
        with torch_threads(self.threads):
            return self._update(log, catalogue, round, rng)

    def _update(self, log: InteractionLog, catalogue: Catalogue, round: int, rng: np.random.Generator):
        started = time.perf_counter()
        self._grow(catalogue, rng)
        if not self.ready:
            self.behaviour.update(log, catalogue, round, rng)
            if round + 1 < self.warmup_rounds:
                return {}
            metrics = self._sft(log, rng)
            self.ready = True
            metrics["time/seconds"] = time.perf_counter() - started
            return metrics
        if (round + 1) % self.grpo_every or self._served is None or self.oracle is None:
            return {}
        return self._grpo_step(log, catalogue, round, rng)

    # -- catalogue -> semantic ids and trie ------------------------------------------------------
    def _grow(self, catalogue: Catalogue, rng: np.random.Generator) -> None:
        """Semantic ids for the catalogue on first sight, for arrivals afterwards (the quantiser and
        the vocabulary stay fixed), and the model on first sight."""
        n = catalogue.n
        content = catalogue.content[:n].astype(np.float32)
        if self.ids is None:
            self.ids = SemanticIds(levels=self.levels, codebook_size=min(self.codebook_size, max(2, n // 4)))
            codes = self.ids.fit(content, seed=int(rng.integers(2**31)))
            self.tokens = codes_to_tokens(codes, self.ids.level_sizes, FIRST_CODE_TOKEN)
            vocab = FIRST_CODE_TOKEN + int(sum(self.ids.level_sizes))
            positions = 2 + (self.prompt_items + 1) * (self.levels + 1) + 8
            self.model = build_model(vocab, self.hidden, self.layers, self.heads, positions, self.arch,
                                     seed=int(rng.integers(2**31))).to(self.device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.rl.lr, weight_decay=0.0)
            self.trie = CatalogueTrie(codes, self.ids.level_sizes, FIRST_CODE_TOKEN, catalogue.alive[:n].copy())
        elif len(self.tokens) < n:
            codes = self.ids.encode_new(content[len(self.tokens):])
            self.tokens = np.concatenate([self.tokens, codes_to_tokens(codes, self.ids.level_sizes, FIRST_CODE_TOKEN)])
            self.trie = CatalogueTrie(self.ids.codes, self.ids.level_sizes, FIRST_CODE_TOKEN, catalogue.alive[:n].copy())
        else:
            self._sync_catalogue(catalogue.alive[:n])

    def _sync_catalogue(self, alive: np.ndarray) -> None:
        alive = np.asarray(alive[: len(self.tokens)], bool)
        if not np.array_equal(alive, self.trie.alive):
            self.trie.update_alive(alive)

    # -- prompts ------------------------------------------------------------------------------------
    def prompts(self, history: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[BOS] codes(h_1) ... codes(h_P) [SEP]`` prompts and attention masks."""
        history = history[:, -self.prompt_items:]
        valid = history >= 0
        width = self.levels + 1
        body = np.where(valid[..., None], self.tokens[np.maximum(history, 0)], PAD).reshape(len(history), -1)
        keep = np.repeat(valid, width, axis=1)
        # move padding to the left: stable sort puts kept tokens last, in order
        order = np.argsort(keep, axis=1, kind="stable")
        body = np.take_along_axis(body, order, 1)
        keep = np.take_along_axis(keep, order, 1)
        n_real = keep.sum(1)
        ids = np.full((len(history), body.shape[1] + 2), PAD, np.int64)
        ids[:, 1:-1] = body
        ids[:, -1] = SEP
        start = body.shape[1] - n_real  # BOS sits just before the first real token
        ids[np.arange(len(history)), start] = BOS
        mask = np.zeros_like(ids)
        mask[np.arange(ids.shape[1])[None, :] >= start[:, None]] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    # -- serving --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _beam_search(self, history: np.ndarray, beams: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        items, scores = [], []
        for start in range(0, len(history), chunk):
            ids, mask = self.prompts(history[start:start + chunk])
            found, score = self.trie.beam_search(self.model, ids.to(self.device), mask.to(self.device), num_beams=beams)
            items.append(found.cpu().numpy())
            scores.append(score.float().cpu().numpy())
        if not items:
            return np.zeros((0, beams), np.int64), np.zeros((0, beams))
        return np.concatenate(items).astype(np.int64), np.concatenate(scores).astype(np.float64)

    # -- SFT warm start ------------------------------------------------------------------------------
    def _sft(self, log: InteractionLog, rng: np.random.Generator) -> dict[str, float]:
        """Next-item prediction on every click so far (prompt = the clicks before it)."""
        users, items, _ = log.clicks()
        if len(users) == 0:
            return {"train/sft_loss": float("nan"), "train/sft_examples": 0.0}
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
        starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
        position = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
        # history of each example: the user's previous clicks (last prompt_items), -1 padded left
        p = self.prompt_items
        offsets = np.arange(-p, 0)
        index = np.arange(len(users))[:, None] + offsets[None, :]
        history = np.where(offsets[None, :] >= -position[:, None], items[np.maximum(index, 0)], -1)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.sft_lr)
        self.model.train()
        losses = []
        for _ in range(self.sft_epochs):
            perm = torch.randperm(len(items), generator=generator).numpy()
            for start in range(0, len(perm), self.sft_batch):
                batch = perm[start:start + self.sft_batch]
                loss = self._sequence_nll(history[batch], items[batch])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                optimizer.step()
                losses.append(loss.item())
        self.reference = copy.deepcopy(self.model).eval()
        for param in self.reference.parameters():
            param.requires_grad_(False)
        return {"train/sft_loss": float(np.mean(losses[-max(1, len(losses) // self.sft_epochs):])),
                "train/sft_examples": float(len(items))}

    def _sequence_nll(self, history: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        """Mean token cross-entropy of the targets' code tokens after their prompts."""
        ids, mask = self.prompts(history)
        target_tokens = torch.from_numpy(self.tokens[targets]).to(self.device)
        logp = token_logprobs(self.model, ids.to(self.device), mask.to(self.device), target_tokens)
        return -logp.mean()

    # -- GRPO ------------------------------------------------------------------------------------------
    def _grpo_step(self, log: InteractionLog, catalogue: Catalogue, round: int, rng: np.random.Generator):
        rl = self.rl
        timer = {"generate": 0.0, "score": 0.0, "update": 0.0}
        started = time.perf_counter()
        users, history = self._served
        if len(users) == 0:
            return {}
        pick = np.sort(rng.choice(len(users), min(rl.users_per_step, len(users)), replace=False))
        users, history = users[pick], history[pick]
        ids, mask = (t.to(self.device) for t in self.prompts(history))
        generator = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**31)))
        self.model.eval()
        with torch.inference_mode():
            if rl.rollout == "beam":
                items, beam_scores = self.trie.beam_search(self.model, ids, mask, num_beams=rl.group_size)
            else:
                items, beam_scores, _ = self.trie.sample(self.model, ids, mask, num_samples=rl.group_size,
                                                         temperature=rl.temperature, generator=generator)
        items = items.cpu().numpy().astype(np.int64)
        timer["generate"] = time.perf_counter() - started
        # -- rewards from the simulated users ------------------------------------------------------
        t = time.perf_counter()
        if rl.mode == "counterfactual":
            judged = self.oracle.judge(users, items)
        else:
            judged = self.critic.judge(log, catalogue, round, users, history, items)
        groups, share, target_share = self.oracle.exposure_state()
        target = self._clicked_this_round(log, round, users)
        ctx = RewardContext(items=items, rating=judged["rating"], click=judged["click"], target=target,
                            beam_scores=beam_scores.float().cpu().numpy(), item_group=groups[np.maximum(items, 0)],
                            group_share=share, target_share=target_share)
        rewards = compute_rewards(ctx, rl.rewards)
        advantages = combine(rewards, rl.rewards, rl.reward_mode, rl.advantage_scale)
        timer["score"] = time.perf_counter() - t
        # -- policy update ---------------------------------------------------------------------------
        t = time.perf_counter()
        valid = items >= 0
        g = items.shape[1]
        prompt_ids, prompt_mask = ids, mask  # token_logprobs repeats each prompt over its group
        completions = torch.from_numpy(self.tokens[np.maximum(items, 0)].reshape(-1, self.levels + 1)).to(self.device)
        token_mask = torch.from_numpy(np.repeat(valid.reshape(-1, 1), self.levels + 1, 1)).to(self.device)
        advantage = torch.as_tensor(np.asarray(advantages, dtype=np.float32).reshape(-1)).to(self.device)
        self.model.train()
        with torch.no_grad():
            # with one update per batch the sampling policy is the current one (ratio 1), as in TRL
            old_logp = (token_logprobs(self.model, prompt_ids, prompt_mask, completions)
                        if rl.updates_per_batch > 1 else None)
            ref_logp = (token_logprobs(self.reference, prompt_ids, prompt_mask, completions)
                        if rl.beta > 0 else None)
        stats_sum: dict[str, float] = {}
        for _ in range(rl.updates_per_batch):
            logp, entropy = token_logprobs(self.model, prompt_ids, prompt_mask, completions, return_entropy=True)
            loss, stats = policy_loss(logp, logp.detach() if old_logp is None else old_logp, advantage, token_mask,
                                      rl.loss, ref_logp=ref_logp,
                                      beta=rl.beta, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high,
                                      group_size=g)
            self.optimizer.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), rl.grad_clip))
            self.optimizer.step()
            for key, value in {"loss": loss.item(), "grad_norm": grad_norm,
                               "entropy": entropy[token_mask].mean().item(), **{k: float(v) for k, v in stats.items()}}.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / rl.updates_per_batch
        self.steps += 1
        if self.reference is not None and rl.ref_sync_every and self.steps % rl.ref_sync_every == 0:
            sync_reference(self.reference, self.model, rl.ref_alpha)
        timer["update"] = time.perf_counter() - t
        has_target = target >= 0
        hit = (items == target[:, None]).any(1)
        out = {f"train/{k}": v for k, v in stats_sum.items()}
        total = sum(rl.rewards[name] * rewards[name] for name in rewards)
        out["train/reward"] = float(np.mean(total[valid]))
        for name, values in rewards.items():
            out[f"train/reward/{name}_mean"] = float(np.mean(values[valid]))
            out[f"train/reward/{name}_std"] = float(np.std(values[valid]))
        out["train/hit_rate"] = float(hit[has_target].mean()) if has_target.any() else float("nan")
        out["train/step"] = float(self.steps)
        if rl.mode == "served-only":
            out["train/critic_mse"] = self.critic.mse
            out["train/served_share"] = self.critic.served_share
        out["time/seconds"] = time.perf_counter() - started
        out.update({f"time/{k}": v for k, v in timer.items()})
        return out

    @staticmethod
    def _clicked_this_round(log: InteractionLog, round: int, users: np.ndarray) -> np.ndarray:
        """The item each user clicked this round (-1 if none): the ReRe-style target."""
        chunk = log.chunks[-1] if log.chunks else None
        target = np.full(len(users), -1, np.int64)
        if chunk is None or len(chunk["round"]) == 0 or chunk["round"][0] != round:
            return target
        clicked = chunk["click"] > 0
        by_user = dict(zip(chunk["user"][clicked].tolist(), chunk["item"][clicked].tolist()))
        return np.array([by_user.get(int(u), -1) for u in users], np.int64)


class ServedCritic:
    """Rewards from served feedback only (``rl.mode=served-only``).

    A candidate the user was actually shown this round is scored by what the user did (rating
    0-10 if clicked, 0 if skipped; click 1/0). Every other candidate is scored by a critic: ridge
    regression of that observed outcome on features of (user profile, item content) fitted on the
    impressions of the last ``window`` rounds. Nothing is asked of the user model.

    Features: ``profile * content`` (d), ``content`` (d), ``log(1 + clicks)`` and a bias, where
    the profile is the mean content vector of the user's history (what the platform knows).
    """

    def __init__(self, window: int = 10, ridge: float = 1.0):
        self.window, self.ridge = window, ridge
        self.mse = float("nan")
        self.served_share = 0.0

    @staticmethod
    def _features(profile: np.ndarray, content: np.ndarray, popularity: np.ndarray) -> np.ndarray:
        return np.concatenate([profile * content, content, np.log1p(popularity)[..., None],
                               np.ones(content.shape[:-1] + (1,))], -1)

    def judge(self, log, catalogue, round: int, users: np.ndarray, history: np.ndarray,
              items: np.ndarray) -> dict[str, np.ndarray]:
        content = catalogue.content[: catalogue.n].astype(np.float64)
        popularity = catalogue.interactions[: catalogue.n]
        recent = log.arrays(since_round=round - self.window + 1)
        # training rows: every recent impression; the user's profile is approximated by the
        # history the policy saw at serving time for this round's users, else by the clicked
        # items of the user in the window
        outcome = np.where(recent["click"] > 0, stars_to_rating(np.nan_to_num(recent["rating"])), 0.0)
        clicks_by_user = np.zeros((int(recent["user"].max(initial=-1)) + 1, content.shape[1]))
        hit = recent["click"] > 0
        np.add.at(clicks_by_user, recent["user"][hit], content[recent["item"][hit]])
        norms = np.linalg.norm(clicks_by_user, axis=1, keepdims=True)
        profiles = clicks_by_user / np.maximum(norms, 1e-12)
        x = self._features(profiles[recent["user"]], content[recent["item"]], popularity[recent["item"]])
        a = x.T @ x + self.ridge * np.eye(x.shape[1])
        weights = np.linalg.solve(a, x.T @ outcome) if len(outcome) else np.zeros(x.shape[1])
        self.mse = float(np.mean((x @ weights - outcome) ** 2)) if len(outcome) else float("nan")
        # candidates: the critic's prediction, replaced by the observed outcome where served
        valid = history >= 0
        prof = (content[np.maximum(history, 0)] * valid[..., None]).sum(1)
        prof /= np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
        safe = np.maximum(items, 0)
        predicted = np.clip(self._features(prof[:, None, :], content[safe], popularity[safe]) @ weights, 0.0, 10.0)
        now = recent["round"] == round
        served = {(int(u), int(i)): float(o) for u, i, o in zip(recent["user"][now], recent["item"][now], outcome[now])}
        rating = predicted.copy()
        observed = np.zeros(items.shape, bool)
        for b, user in enumerate(users.tolist()):  # B x G lookups (a few hundred), not a hot loop
            for g, item in enumerate(items[b].tolist()):
                if (user, item) in served:
                    rating[b, g] = served[(user, item)]
                    observed[b, g] = True
        self.served_share = float(observed[items >= 0].mean()) if (items >= 0).any() else 0.0
        valid_items = items >= 0
        return {"rating": np.where(valid_items, rating, 0.0),
                "click": np.where(valid_items, np.clip(rating / 10.0, 0.0, 1.0), 0.0)}
