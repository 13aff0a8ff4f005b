"""FlexRec: swap-credit RL with uncertainty scaling (arXiv 2603.11901; Pan, ..., Ying).

Item-level credit for a generated ranking, need-specific gains and the uncertainty-scaled
advantage of FlexRec (ALGORITHMS.md section 5), as pure functions over a batch of ``B`` prompts
x ``G`` rollouts x ``K`` list positions.

There is no public code: the setting (closed-set ranking under a need instruction, a swap-based
item credit against the "remaining pool", a critic head with a Gaussian NLL, advantages scaled
down by the predicted variance) is from the paper's summary page, and **every form here is an
[inf] reconstruction**: the swap credit ``r_k = mean_{j>k}[NDCG(sigma) - NDCG(sigma_{k<->j})]``
with the remaining pool taken as the positions after ``k`` of the generated list, the item-level
group normalisation, the scaling ``A / (1 + lambda sigma^2)`` and the four need gains.
"""

from __future__ import annotations

import numpy as np
import torch

from agorasim.errors import UserInputError
from agorasim.metrics.accuracy import dcg_weights
from agorasim.rl.advantages import DEFAULT_EPS, group_advantages
from agorasim.rl.rollouts import list_rollout, serve_list
from agorasim.rl.trainer import Method, Scored

NEEDS = ("rel", "explore", "trend", "niche")


def _ideal_dcg(gains: np.ndarray, ideal_gains) -> np.ndarray:
    """``(...,)`` IDCG@K: the best DCG of ``ideal_gains`` (default: ``gains``) cut at ``K``."""
    k = gains.shape[-1]
    ideal = gains if ideal_gains is None else np.asarray(ideal_gains, dtype=np.float64)
    ideal = -np.sort(-ideal, axis=-1)[..., :k]
    return ideal @ dcg_weights(ideal.shape[-1])


def list_ndcg(gains, ideal_gains=None) -> np.ndarray:
    """NDCG of lists given the gain of each position (linear gains, ``1/log2(pos+2)`` discount).

    Args:
        gains: ``(..., K)`` gain of the item at each position, in rank order.
        ideal_gains: ``(..., M)`` gains the ideal list is built from (sorted descending here and
            cut at ``K``; ``M < K`` pads with zero gains). ``None``: the list's own gains, i.e.
            the best reordering of the list.

    Returns:
        ``(...,)`` float64 NDCG; 0 where the ideal DCG is 0.
    """
    gains = np.asarray(gains, dtype=np.float64)
    dcg = gains @ dcg_weights(gains.shape[-1])
    idcg = _ideal_dcg(gains, ideal_gains)
    positive = idcg > 0
    return np.where(positive, dcg / np.where(positive, idcg, 1.0), 0.0)


def swap_credit(gains, ideal_gains=None) -> np.ndarray:
    """FlexRec's item credit: how much NDCG a position loses if swapped with a later one [inf].

    ``r_k = mean_{j>k} [NDCG(sigma) - NDCG(sigma with positions k and j swapped)]``; the last
    position has no later one and gets 0. A swap changes the DCG by
    ``(g_k - g_j)(w_k - w_j)`` with ``w`` the DCG discounts, so every ``(k, j)`` pair is computed
    in closed form by broadcasting (``(..., K, K)``), with the IDCG unchanged by a swap. An item
    better than the ones after it gets positive credit; a list sorted by descending gain has
    ``r_k >= 0`` everywhere (one sorted ascending has ``r_k <= 0``).

    Args:
        gains: ``(..., K)`` gains in rank order, e.g. ``(B, G, K)``.
        ideal_gains: As in ``list_ndcg``.

    Returns:
        ``(..., K)`` float64 credit; 0 everywhere where the ideal DCG is 0.

    Examples:
        Gains ``(0, 1, 0)``: ``NDCG = 1/log2(3) = 0.6309``; swapping 0<->1 gives 1, 0<->2 changes
        nothing, 1<->2 gives 0.5, so ``r = ((-0.3691 + 0)/2, 0.1309, 0) = (-0.1845, 0.1309, 0)``.
    """
    gains = np.asarray(gains, dtype=np.float64)
    k = gains.shape[-1]
    w = dcg_weights(k)
    idcg = _ideal_dcg(gains, ideal_gains)
    # loss[..., a, b] = DCG(sigma) - DCG(sigma_{a<->b}) = (g_a - g_b)(w_a - w_b)
    loss = (gains[..., :, None] - gains[..., None, :]) * (w[:, None] - w[None, :])
    later = np.triu(np.ones((k, k), dtype=bool), 1)
    n_later = np.maximum(k - 1 - np.arange(k), 1)
    credit = np.where(later, loss, 0.0).sum(axis=-1) / n_later
    positive = idcg > 0
    return np.where(positive[..., None], credit / np.where(positive, idcg, 1.0)[..., None], 0.0)


def item_advantages(credit, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Item advantages normalised over all items of a prompt's ``G`` rollouts [inf].

    ``A[b, g, k] = (r[b, g, k] - mean_{g', k'} r[b]) / (std_{g', k'} r[b] + eps)``, the sample
    std (``ddof=1``) over the ``G*K`` items, as ``group_advantages`` on the flattened group.

    Args:
        credit: ``(B, G, K)`` item credit (``swap_credit``).
        eps: Added to the std.

    Returns:
        ``(B, G, K)`` float64 advantages.
    """
    credit = np.asarray(credit, dtype=np.float64)
    assert credit.ndim == 3, f"credit must be (B, G, K), got shape {credit.shape}"
    b = credit.shape[0]
    return group_advantages(credit.reshape(b, -1), scale="group", eps=eps).reshape(credit.shape)


def uncertainty_scaled(advantages, log_var, lam: float = 1.0):
    """Advantages shrunk where the critic predicts a noisy credit [inf]: ``A / (1 + lam sigma^2)``.

    ``sigma^2 = exp(log_var)`` is the critic's predicted variance of the item credit; FlexRec uses
    ``lam = 1``. Works on numpy arrays (float64) and torch tensors (pass ``log_var`` detached if
    the critic must not get this gradient).

    Args:
        advantages: ``(B, G, K)`` item advantages.
        log_var: Predicted ``log sigma^2``, broadcastable to ``advantages``.
        lam: ``lambda``.

    Returns:
        Scaled advantages, of the type of ``advantages``.
    """
    if torch.is_tensor(advantages) or torch.is_tensor(log_var):
        return advantages / (1.0 + lam * torch.exp(torch.as_tensor(log_var)))
    return np.asarray(advantages, dtype=np.float64) / (
        1.0 + lam * np.exp(np.asarray(log_var, dtype=np.float64)))


def gaussian_nll(mu: torch.Tensor, log_var: torch.Tensor, target) -> torch.Tensor:
    """Gaussian negative log-likelihood of the critic head ``(mu, log sigma^2)`` [inf].

    ``mean(0.5 * (log_var + (target - mu)^2 / exp(log_var)))``; the constant
    ``0.5 * log(2 pi)`` is dropped (it changes no gradient).

    Args:
        mu: Predicted mean of the credit, any shape.
        log_var: Predicted ``log sigma^2``, same shape.
        target: Observed credit (tensor or array), same shape; treated as a constant.

    Returns:
        Scalar tensor.
    """
    target = torch.as_tensor(target, dtype=mu.dtype, device=mu.device)
    return (0.5 * (log_var + (target - mu) ** 2 * torch.exp(-log_var))).mean()


def need_gains(need: str, click, first_code_seen=None, popularity=None,
               exposure=None) -> np.ndarray:
    """The gain of each listed item under a need instruction [inf].

    - ``rel``: ``click``, the click probability (or a sampled click in the noisy regime);
    - ``explore``: ``click * (not first_code_seen)``, only items whose first semantic-id code is
      new to the user count;
    - ``trend``: ``click * popularity``. The spec's gain is the ledger popularity alone; that is
      the same for every user, so the need would ignore the user. We multiply by the click so the
      gain stays personal (a deviation from the spec, which a caller undoes by passing
      ``click = 1``);
    - ``niche``: ``click / log(2 + exposure)``, items the ledger has shown little.

    Args:
        need: One of ``NEEDS``.
        click: ``(B, G, K)`` click probabilities in ``[0, 1]``.
        first_code_seen: ``(B, G, K)`` bool, the item's first SID code is in the user's history
            (``explore``).
        popularity: ``(B, G, K)`` ledger popularity normalised to ``[0, 1]`` (``trend``).
        exposure: ``(B, G, K)`` non-negative ledger exposure (``niche``).

    Returns:
        ``(B, G, K)`` float64 gains.

    Raises:
        UserInputError: (a ``ValueError``) unknown ``need``, listing the allowed names.
        ValueError: The field ``need`` uses is ``None``.
    """
    if need not in NEEDS:
        raise UserInputError(f"FlexRec need {need!r} is unknown; allowed: {', '.join(NEEDS)}")
    click = np.asarray(click, dtype=np.float64)

    def field(value, name):
        if value is None:
            raise ValueError(f"need {need!r} needs {name}, which is None")
        return np.asarray(value)

    if need == "rel":
        return click
    if need == "explore":
        return click * ~field(first_code_seen, "first_code_seen").astype(bool)
    if need == "trend":
        return click * field(popularity, "popularity").astype(np.float64)
    exposure = field(exposure, "exposure").astype(np.float64)
    assert np.all(exposure >= 0), "exposure must be non-negative"
    return click / np.log(2.0 + exposure)


# -- the method on the trainer ---------------------------------------------------------------------
def item_gains(policy, need: str, prompts, items: np.ndarray, click: np.ndarray, exposure) -> np.ndarray:
    """``need_gains`` of ``items`` (any shape ``(B, ...)``) for the prompts' users: the history's
    first codes (explore), interaction counts scaled to [0, 1] (trend), ledger exposure (niche)."""
    safe = np.maximum(items, 0)
    first = policy.tokens[safe][..., 0]
    seen_codes = np.where(prompts.history >= 0, policy.tokens[np.maximum(prompts.history, 0)][..., 0], -1)
    flat = first.reshape(len(items), -1)
    seen = (flat[:, :, None] == seen_codes[:, None, :]).any(2).reshape(items.shape)
    popularity = exposure_field = None
    if exposure is not None:
        counts = exposure.interactions.astype(np.float64)
        popularity = counts[safe] / max(float(counts.max(initial=0.0)), 1.0)
        exposure_field = exposure.item_exposure[safe]
    elif need in ("trend", "niche"):
        raise ValueError(f"FlexRec need {need!r} needs the platform's exposure state")
    gains = need_gains(need, click, seen, popularity, exposure_field)
    return np.where(items >= 0, gains, 0.0)


class Critic(torch.nn.Module):
    """FlexRec's critic: (mu, log sigma^2) of an item's credit from (user, item) features.

    The features are the policy's own input embeddings, detached: the mean embedding of the prompt's
    real tokens and the mean embedding of the item's tokens, so the critic reads what the policy
    reads but never moves it.
    """

    def __init__(self, width: int, hidden: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 * width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 2))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(features)
        return out[..., 0], out[..., 1].clamp(-10.0, 10.0)


class FlexRec(Method):
    """FlexRec on ``rl.Trainer`` (``rl.method=flexrec``, settings ``rl.flexrec``) [inf].

    The prompt is ``[history, <need>]``. Each prompt gets a closed candidate set: the policy's own
    top beams plus random alive items (``top_candidates`` + ``random_candidates``). G ranked lists
    of K distinct candidates are sampled under the candidate trie (``list_rollout``, a per-prompt
    item mask); each listed item gets the swap credit ``swap_credit`` of NDCG@K under the need's
    gains (the ideal DCG over the whole candidate set), normalised over all items of the prompt's
    G lists (``item_advantages``) and scaled by ``1 / (1 + lambda sigma^2)`` where ``sigma^2`` is the
    critic's predicted variance of that item's credit; the item's advantage is given to its L+1
    tokens. The critic is trained after the policy step by Gaussian NLL on the credits.
    The need may switch mid-run (``need_switch_round``), which changes both the prompt token and
    the gains. Serving: the greedy K-list of the ``[history, <need>]`` prompt, then its beams.
    """

    name = "flexrec"
    special_tokens = tuple(f"<{need}>" for need in NEEDS)

    def __init__(self, config):
        super().__init__(config)
        self.critic: Critic | None = None
        self.critic_optimizer = None

    def extra_positions(self, depth: int) -> int:
        return 1 + self.config.flexrec.list_size * depth

    def need_at(self, round: int) -> str:
        cfg = self.config.flexrec
        if cfg.need_switch_round is not None and round >= cfg.need_switch_round:
            return cfg.need_after
        return cfg.need

    def suffix(self, policy, n: int, round: int) -> np.ndarray:
        return np.full((n, 1), policy.special_token(f"<{self.need_at(round)}>"), np.int64)

    def serve(self, policy, history, k, round):
        cfg = self.config.flexrec
        suffix = self.suffix(policy, len(history), round)
        if cfg.serve == "beam":
            return policy.beam_search(history, k, suffix)
        return serve_list(policy, history, k, cfg.list_size, suffix)

    def rollout(self, trainer, prompts, generator):
        cfg, policy = self.config.flexrec, trainer.policy
        device = policy.device
        suffix = self.suffix(policy, len(prompts), prompts.round)
        top, _ = policy.beam_search(prompts.history, cfg.top_candidates, suffix)
        n_items = len(policy.tokens)
        alive = torch.as_tensor(policy.trie.alive, device=device)
        keys = torch.rand((len(prompts), n_items), generator=generator, device=device)
        keys = keys.masked_fill(~alive, -1.0)
        top_t = torch.as_tensor(top, device=device)
        rows = torch.arange(len(prompts), device=device)[:, None].expand_as(top_t)
        keys[rows[top_t >= 0], top_t[top_t >= 0]] = -1.0
        n_random = min(cfg.random_candidates, n_items)
        value, extra = keys.topk(n_random, dim=1) if n_random else (keys[:, :0], keys[:, :0].long())
        extra = torch.where(value >= 0, extra, torch.full_like(extra, -1))
        candidates = torch.cat([top_t, extra], 1)
        mask = torch.zeros((len(prompts), n_items), dtype=torch.bool, device=device)
        valid = candidates >= 0
        mask[rows[:, :1].expand_as(candidates)[valid], candidates[valid]] = True
        rollout = list_rollout(trainer, prompts, generator, self.config.flexrec.group_size, cfg.list_size,
                               self.config.temperature, suffix, mask)
        rollout.extra["candidates"] = candidates.cpu().numpy()
        draw = torch.rand(rollout.items.shape, generator=generator, device=generator.device)
        rollout.extra["draw"] = draw.cpu().numpy().astype(np.float64)
        if self.critic is None:
            width = policy.model.get_input_embeddings().weight.shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                self.critic = Critic(width).to(device)
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.config.flexrec.critic_lr)
        return rollout

    def features(self, policy, rollout) -> torch.Tensor:
        """``(B, G, K, 2d)`` detached critic features (see ``Critic``)."""
        table = policy.model.get_input_embeddings().weight.detach()
        mask = rollout.prompt_mask.to(table.dtype)
        user = (table[rollout.prompt_ids] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        b, g, k = rollout.items.shape
        tokens = torch.as_tensor(policy.tokens[np.maximum(rollout.items, 0)], device=table.device)  # (B,G,K,depth)
        item = table[tokens].mean(-2)
        return torch.cat([user[:, None, None, :].expand(b, g, k, -1), item], -1)

    def score(self, trainer, prompts, rollout, judge):
        cfg, policy = self.config.flexrec, trainer.policy
        need = self.need_at(prompts.round)
        items, candidates = rollout.items, rollout.extra["candidates"]
        exposure = judge.exposure_state()
        click = judge.judge(prompts, items)["click"]
        if cfg.noise == "bernoulli":
            click = (rollout.extra["draw"] < click).astype(np.float64)
        gains = item_gains(policy, need, prompts, items, click, exposure)
        ideal = item_gains(policy, need, prompts, candidates, judge.judge(prompts, candidates)["click"], exposure)
        credit = swap_credit(gains, ideal[:, None, :])
        credit = np.where(items >= 0, credit, 0.0)
        advantages = item_advantages(credit)
        with torch.no_grad():
            _, log_var = self.critic(self.features(policy, rollout))
        log_var = log_var.cpu().numpy().astype(np.float64)
        advantages = uncertainty_scaled(advantages, log_var, cfg.uncertainty) * (items >= 0)
        rollout.extra["credit"] = credit
        depth = policy.levels + 1
        per_token = np.repeat(advantages, depth, axis=-1)  # (B, G, K * depth): an item's tokens share it
        ndcg = list_ndcg(gains, ideal[:, None, :])
        stats = {"flexrec/ndcg": float(ndcg.mean()), "flexrec/sigma2_mean": float(np.exp(log_var).mean()),
                 "flexrec/need": float(NEEDS.index(need))}
        return Scored({"credit": credit, "gain": gains}, ndcg, per_token, stats)

    def after_step(self, trainer, rollout, scored):
        valid = torch.as_tensor(rollout.items >= 0, device=trainer.policy.device)
        mu, log_var = self.critic(self.features(trainer.policy, rollout))
        target = torch.as_tensor(rollout.extra["credit"], dtype=mu.dtype, device=mu.device)
        loss = gaussian_nll(mu[valid], log_var[valid], target[valid])
        self.critic_optimizer.zero_grad()
        loss.backward()
        self.critic_optimizer.step()
        return {"flexrec/critic_nll": float(loss.detach())}
