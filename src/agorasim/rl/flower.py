"""Flower: process-supervised tuning of a generative recommender via GFlowNets (arXiv 2503.07377).

Flower (SIGIR'25) trains the policy so that the probability of generating an item is
proportional to a reward, ``pi(i) = R_i / sum_j R_j``, by a sub-trajectory-balance (SubTB) loss
along the item's token path (ALGORITHMS.md section 2). For semantic ids of a fixed depth ``D``
there is no stop action and the flow of a prefix is exact from the item trie:
``F(s) = sum_{i under s} R_i``, so the per-step target is ``F(s_{t+1}) / F(s_t)`` and a policy
that equals it gives zero loss.

From the authors' code (``Mr-Peach0301/Flower`` @ f5e285b): the token reward
``log(sum_{i in ha} v_i / sum_{i in h} v_i)`` with ``v_i`` the interaction counts
(``with_history/process.ipynb``), SubTB with ``lambda = 1`` summing the squared sums of ``delta``
over all sub-trajectories (``modified_subtb_loss``), the personalisation ``log R / s_ui`` with
``s_ui = (p - mean p) / (max p - min p) + 1`` (``utils_logp_div_s.py:normalize_element_mid``,
``use_median=False``). Adapted here (fixed depth, so no terminal/EOS terms and no ``-15``
penalty for an invalid prefix; the trie-renormalised policy instead of Flower's unmasked
log-softmax; a mean over rows). The additive ``smoothing`` of the counts and the fairness reward
from target exposure shares (``reward_from_target_shares``) are agorasim choices.
"""

from __future__ import annotations

import numpy as np
import torch

from agorasim.policy.trie import token_logprobs
from agorasim.rl.rollouts import item_rollout
from agorasim.rl.trainer import Method, Scored


def _levels(codes: np.ndarray):
    """For each depth ``l = 0..D``: the distinct ``l``-prefixes and each item's prefix index."""
    n, depth = codes.shape
    out = [(np.zeros((1, 0), dtype=codes.dtype), np.zeros(n, dtype=np.int64))]
    for level in range(1, depth + 1):
        prefixes, inverse = np.unique(codes[:, :level], axis=0, return_inverse=True)
        out.append((prefixes, inverse.reshape(-1).astype(np.int64)))
    return out


def _check(codes, rewards) -> tuple[np.ndarray, np.ndarray]:
    codes = np.asarray(codes, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=np.float64).ravel()
    assert codes.ndim == 2, f"codes must be (n_items, D), got shape {codes.shape}"
    assert rewards.shape == (codes.shape[0],), "rewards must be (n_items,)"
    assert np.all(rewards >= 0), "rewards must be non-negative"
    return codes, rewards


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x)


def prefix_log_flows(codes, rewards) -> list[tuple[np.ndarray, np.ndarray]]:
    """Log-flow ``log F(s) = log sum_{i under s} R_i`` of every distinct prefix of the trie.

    Args:
        codes: ``(n_items, D)`` int code path of each item (fixed depth ``D``).
        rewards: ``(n_items,)`` rewards ``R_i >= 0`` (0 gives a flow of ``-inf``).

    Returns:
        ``D+1`` pairs ``(prefixes, log_flow)``, one per level ``l = 0..D``: ``prefixes`` is
        ``(m_l, l)`` int, the distinct ``l``-prefixes in lexicographic order, and ``log_flow``
        is ``(m_l,)`` float64. Level 0 is the root, ``log sum_i R_i``.
    """
    codes, rewards = _check(codes, rewards)
    out = []
    for prefixes, inverse in _levels(codes):
        flow = np.bincount(inverse, weights=rewards, minlength=prefixes.shape[0])
        out.append((prefixes, _log(flow)))
    return out


def path_log_flows(codes, rewards, items) -> np.ndarray:
    """The log-flows along the code paths of given items.

    Column ``t`` is ``log F`` of the item's ``t``-prefix: column 0 is ``log sum_i R_i`` (the
    root) and column ``D`` is ``log R_item`` (the sum over items sharing the full code, if codes
    collide). ``np.diff`` of a row gives the target log-probabilities ``log F(s_{t+1}) - log
    F(s_t)`` of each step.

    Args:
        codes: ``(n_items, D)`` int code paths.
        rewards: ``(n_items,)`` rewards ``R_i >= 0``.
        items: ``(N,)`` int row indices into ``codes`` (e.g. the sampled items).

    Returns:
        ``(N, D+1)`` float64 log-flows.
    """
    codes, rewards = _check(codes, rewards)
    items = np.asarray(items, dtype=np.int64).ravel()
    columns = []
    for prefixes, inverse in _levels(codes):
        flow = np.bincount(inverse, weights=rewards, minlength=prefixes.shape[0])
        columns.append(flow[inverse[items]])
    return _log(np.stack(columns, axis=1))


def subtb_loss(log_flow, log_pi: torch.Tensor) -> torch.Tensor:
    """Sub-trajectory balance loss (``lambda = 1``, unweighted) along fixed-depth paths.

    ``delta_t = log F(s_t) + log pi(a_t | s_t) - log F(s_{t+1})`` and
    ``L = mean_rows sum_{0 <= i < j <= D} (sum_{t=i}^{j-1} delta_t)^2`` (``D(D+1)/2``
    sub-trajectories, 10 for ``D = 4``), built from the cumulative sum of ``delta``: the sum over
    ``[i, j)`` is ``C_j - C_i``. Flower's ``modified_subtb_loss`` has the same form with its
    terminal terms, which a fixed depth does not need. ``L = 0`` exactly when every step
    probability equals the flow ratio ``F(s_{t+1}) / F(s_t)``. Rows must avoid zero-reward
    paths (``-inf`` flows give ``nan``).

    Args:
        log_flow: ``(N, D+1)`` log-flows along each path (``path_log_flows``), constants
            (array or tensor).
        log_pi: ``(N, D)`` differentiable log-probabilities of each step under the trie-
            renormalised policy.

    Returns:
        Scalar tensor.
    """
    log_flow = torch.as_tensor(log_flow, dtype=log_pi.dtype, device=log_pi.device)
    assert log_pi.ndim == 2 and log_flow.shape == (log_pi.shape[0], log_pi.shape[1] + 1), (
        f"log_flow must be (N, D+1) for log_pi (N, D), got {tuple(log_flow.shape)} and "
        f"{tuple(log_pi.shape)}")
    delta = log_flow[:, :-1] + log_pi - log_flow[:, 1:]
    cum = torch.cat([delta.new_zeros(delta.shape[0], 1), delta.cumsum(dim=1)], dim=1)
    span = cum[:, None, :] - cum[:, :, None]  # span[n, i, j] = sum_{t=i}^{j-1} delta_t
    later = torch.ones(span.shape[1:], dtype=torch.bool, device=span.device).triu(1)
    return (span.pow(2) * later).sum(dim=(1, 2)).mean()


def reward_from_counts(counts, smoothing: float = 1.0) -> np.ndarray:
    """Flower's default reward: interaction counts ``v_i``, smoothed ``R_i = v_i + smoothing``.

    Flower's ``v_i`` is the number of times item ``i`` appears in training histories; the
    smoothing (ours) gives unseen items a positive flow so every trie path stays reachable.

    Args:
        counts: ``(n_items,)`` non-negative counts.
        smoothing: Added to every count.

    Returns:
        ``(n_items,)`` float64 rewards.
    """
    counts = np.asarray(counts, dtype=np.float64)
    assert np.all(counts >= 0), "counts must be non-negative"
    return counts + smoothing


def reward_from_target_shares(groups, target_share, supply=None) -> np.ndarray:
    """Fairness reward: each group's target exposure share split over its items.

    ``R_i = target_share[group_i] / supply[group_i]``, so the policy ``pi(i) = R_i / sum R``
    gives group ``g`` probability ``target_share[g]`` (when every group has items) and is
    uniform within a group.

    Args:
        groups: ``(n_items,)`` int group of each item (``-1``: no group, reward 0).
        target_share: ``(n_groups,)`` target exposure share of each group.
        supply: ``(n_groups,)`` number of items in each group; ``None``: counted from ``groups``.

    Returns:
        ``(n_items,)`` float64 rewards (0 for items without a group or whose group has a target
        share of 0).
    """
    groups = np.asarray(groups, dtype=np.int64)
    share = np.asarray(target_share, dtype=np.float64)
    known = groups >= 0
    if supply is None:
        supply = np.bincount(groups[known], minlength=share.size)
    supply = np.asarray(supply, dtype=np.float64)
    assert supply.shape == share.shape, "supply and target_share must be (n_groups,)"
    g = np.where(known, groups, 0)
    per_item = share[g] / np.where(supply[g] > 0, supply[g], 1.0)
    return np.where(known & (supply[g] > 0), per_item, 0.0)


def normalise_s(p) -> np.ndarray:
    """Flower's personalisation strength ``s = (p - mean p) / (max p - min p) + 1`` per user.

    ``normalize_element_mid`` (``use_median=False``) in Flower's ``utils_logp_div_s.py``, over a
    user's row of softmax(SASRec) probabilities (here: click probabilities). ``s`` is in
    ``(0, 2)``: above 1 for items the user likes more than average. Flower raises on a constant
    row; we return ``s = 1`` there (no personalisation).

    Args:
        p: ``(B, n_items)`` scores of each user for each item.

    Returns:
        ``(B, n_items)`` float64 ``s``.
    """
    p = np.asarray(p, dtype=np.float64)
    assert p.ndim == 2, f"p must be (B, n_items), got shape {p.shape}"
    spread = p.max(axis=1, keepdims=True) - p.min(axis=1, keepdims=True)
    centred = p - p.mean(axis=1, keepdims=True)
    return np.where(spread > 0, centred / np.where(spread > 0, spread, 1.0) + 1.0, 1.0)


def personalised_log_reward(log_r, s) -> np.ndarray:
    """Flower's personalised log-reward ``log R_ui = log R_i / s_ui`` (i.e. ``R^(1/s)``).

    Args:
        log_r: Log-rewards (e.g. ``log(v_i / sum v)``), broadcastable against ``s``.
        s: ``normalise_s`` strengths, positive.

    Returns:
        Float64 array of the broadcast shape.
    """
    return np.asarray(log_r, dtype=np.float64) / np.asarray(s, dtype=np.float64)


# -- the method on the trainer ---------------------------------------------------------------------
def trie_path_log_flows(trie, rewards: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``(B, G, D+1)`` log-flows along the trie paths of ``items`` (B, G), from per-item rewards
    ``rewards`` (``(n_items,)`` shared, or ``(B, n_items)`` one row per prompt; dead items count 0).

    ``F(s) = sum of R_i over the alive items under prefix s``, from the trie's own prefix ids
    (``CatalogueTrie.item_prefix``), so it is exact for the catalogue decoding sees. Column 0 is
    the root's flow (all alive items), column D the item's own reward.
    """
    b, g = items.shape
    rewards = np.broadcast_to(np.asarray(rewards, np.float64), (b, len(trie.codes)))
    rewards = np.where(trie.alive[None, :], rewards, 0.0)
    safe = np.maximum(items, 0)
    out = np.empty((b, g, trie.depth + 1))
    rows = np.arange(b)
    for level in range(trie.depth):  # D+1 levels, each one bincount over the batch x catalogue
        n_prefix = trie.n_prefixes[level]
        prefix = np.maximum(trie.item_prefix[:, level], 0)
        index = (rows[:, None] * n_prefix + prefix[None, :]).ravel()
        flows = np.bincount(index, weights=rewards.ravel(), minlength=b * n_prefix).reshape(b, n_prefix)
        out[:, :, level] = np.take_along_axis(flows, trie.item_prefix[safe, level], 1)
    out[:, :, -1] = np.take_along_axis(rewards, safe, 1)
    with np.errstate(divide="ignore"):
        return np.log(out)


class Flower(Method):
    """Flower on ``rl.Trainer`` (``rl.method=flower``, settings ``rl.flower``).

    Each prompt samples ``samples`` items from the trie at temperature 1 (Flower's single
    rollout); the loss is ``theta * SFT + (1 - theta) * SubTB``: SFT is the token cross-entropy of
    the prompt's target item (the item the user clicked this round, the held-out item offline),
    SubTB (``subtb_loss``) is sub-trajectory balance along the sampled item's 4-step path with
    exact log-flows from the item rewards (``trie_path_log_flows``) and the trie-renormalised
    step log-probabilities (``pf_unmasked``: the full-vocabulary ones, as the authors' code).
    Rewards ``R_i``: ``counts`` = interaction counts + smoothing (the paper's default),
    ``uniform``/``merit`` = the platform's target share of the item's popularity group spread over
    the group (``reward_from_target_shares``), ``personal`` = ``(v_i / sum v)^(1/s_ui)`` with
    ``s_ui`` the user's normalised click probabilities (``normalise_s``; SASRec's in the paper).
    At SubTB = 0 the policy generates item i with probability R_i / sum R. Not a policy gradient:
    no advantages, reference or clipping.
    """

    name = "flower"
    policy_gradient = False

    def rollout(self, trainer, prompts, generator):
        return item_rollout(trainer, prompts, generator, self.config.flower.samples, "sample", 1.0)

    def rewards(self, trainer, prompts, judge) -> np.ndarray:
        """``(n_items,)`` or ``(B, n_items)`` item rewards R (see the class docstring)."""
        cfg, policy = self.config.flower, trainer.policy
        exposure = judge.exposure_state()
        n = len(policy.tokens)
        counts = np.zeros(n) if exposure is None else np.asarray(exposure.interactions, np.float64)[:n]
        if cfg.reward == "counts":
            return reward_from_counts(counts, cfg.smoothing)
        if cfg.reward in ("uniform", "merit"):
            if exposure is None:
                raise ValueError(f"Flower reward {cfg.reward!r} needs the platform's exposure state")
            share = (np.full(len(exposure.share), 1.0 / len(exposure.share)) if cfg.reward == "uniform"
                     else exposure.target_share)
            groups = np.where(policy.trie.alive, exposure.groups[:n], -1)
            reward = reward_from_target_shares(groups, share)
            return np.maximum(reward, 1e-12 * reward.max(initial=1.0))
        counts = reward_from_counts(counts, cfg.smoothing)
        alive = np.flatnonzero(policy.trie.alive)
        items = np.broadcast_to(alive, (len(prompts), len(alive)))
        s = normalise_s(judge.judge(prompts, items)["click"])
        log_r = np.full((len(prompts), n), -np.inf)
        log_r[:, alive] = personalised_log_reward(np.log(counts[alive] / counts[alive].sum()), s)
        return np.exp(log_r - log_r.max(axis=1, keepdims=True))  # scale-free: flows are ratios

    def score(self, trainer, prompts, rollout, judge):
        reward = self.rewards(trainer, prompts, judge)
        log_flow = trie_path_log_flows(trainer.policy.trie, reward, rollout.items)
        rollout.extra["log_flow"] = log_flow
        rollout.extra["target"] = prompts.target
        item_reward = log_flow[..., -1] - log_flow[..., 0]  # log R_y / sum R: the target log-probability
        zeros = np.zeros(rollout.items.shape)
        return Scored({"log_target_prob": item_reward}, item_reward, zeros)

    def loss(self, trainer, rollout, scored, old_logp, ref_logp):
        cfg, policy = self.config.flower, trainer.policy
        valid = torch.as_tensor((rollout.items >= 0).reshape(-1), device=policy.device)
        logp, logp_all = token_logprobs(policy.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completions,
                                        return_log_softmax=True, **policy.chunking())
        if cfg.pf_unmasked:
            log_pi = logp
        else:
            log_pi = logp - self.allowed_logsumexp(policy, rollout.items.reshape(-1), logp_all)
        log_flow = torch.as_tensor(rollout.extra["log_flow"].reshape(-1, policy.trie.depth + 1), device=logp.device)
        subtb = subtb_loss(log_flow[valid], log_pi[valid]) if valid.any() else logp.sum() * 0.0
        target = rollout.extra["target"]
        has = target >= 0
        if has.any():
            rows = torch.as_tensor(np.flatnonzero(has), device=logp.device)
            tokens = torch.as_tensor(policy.tokens[target[has]], device=logp.device)
            sft = -token_logprobs(policy.model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], tokens,
                                  **policy.chunking()).mean()
        else:
            sft = logp.sum() * 0.0
        loss = cfg.theta * sft + (1.0 - cfg.theta) * subtb
        mismatch = (log_pi.detach().sum(-1) - (log_flow[:, -1] - log_flow[:, 0]))[valid]
        return loss, {"flower/subtb": float(subtb.detach()), "flower/sft": float(sft.detach()),
                      "flower/log_ratio_mean": float(mismatch.mean()) if valid.any() else float("nan")}

    @staticmethod
    def allowed_logsumexp(policy, items: np.ndarray, logp_all: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` log of the allowed codes' total probability at each step of each path."""
        trie = policy.trie
        prefix = torch.as_tensor(trie.item_prefix[np.maximum(items, 0)], device=logp_all.device)
        out = []
        for level in range(trie.depth):
            start = int(trie.offsets[level])
            allowed = trie.children(level, prefix[:, level]) >= 0
            codes = logp_all[:, level, start:start + trie.level_sizes[level]]
            out.append(torch.logsumexp(codes.masked_fill(~allowed, -torch.inf), dim=-1))
        return torch.stack(out, 1)
