"""Clipped policy-gradient losses of the GRPO family, a k3 KL to a reference, reference sync.

One batch holds ``N = B*G`` completions (``G`` per prompt) of ``T`` tokens each; for the
generative recommender a completion is one item, ``T = L+1`` semantic-id tokens. The loss is built
in named steps, as TRL's ``GRPOTrainer._compute_loss`` (whose definitions we match):

1. importance ratio per token ``r = exp(logp - old_logp)`` (``gspo``: one ratio per sequence,
   ``exp(mean_t(logp - old_logp))``);
2. clipped surrogate per token ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`` (PPO, Schulman et
   al. 2017), plus ``beta * k3`` KL to the reference per token;
3. aggregation over tokens and sequences, which is what tells the named losses apart:

=========  ==================================================================================
``grpo``   mean over each sequence's tokens, then mean over sequences (Shao et al. 2024)
``bnpo``   sum over all tokens / number of tokens in the batch
``dr_grpo`` sum over all tokens / (N * max_tokens), a constant (Dr. GRPO, Liu et al. 2025)
``dapo``   sum over all tokens / number of tokens in the batch, and eps_high = 0.28 by default
           (DAPO "clip-higher", Yu et al. 2025); TRL's dapo counts tokens over all processes,
           bnpo per process, which is the same thing in one process
``gspo``   sequence-level ratio, clipped with eps 3e-4 / 4e-4, mean over sequences (GSPO,
           Zheng et al. 2025, section 4)
=========  ==================================================================================

With one update per batch (``mu = 1``) ``old_logp = logp.detach()``: every ratio is 1, nothing is
clipped and the gradient is the plain advantage-weighted policy gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from agorasim.errors import UserInputError

LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")
KL_ESTIMATORS = ("k3", "k3_ratio")

# Default clip range (eps_low, eps_high) of each loss when not given. PPO/GRPO clip the ratio to
# [0.8, 1.2]; DAPO raises the upper bound to 1.28 so low-probability tokens can grow (section 3.1);
# a sequence ratio is a geometric mean of token ratios, much closer to 1, so GSPO clips at
# [1 - 3e-4, 1 + 4e-4] (GSPO paper, experiments).
DEFAULT_EPSILON: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),
    "bnpo": (0.2, 0.2),
    "dr_grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "gspo": (3e-4, 4e-4),
}


def check_loss_name(loss_type: str) -> None:
    """Raise a one-line ``UserInputError`` (a ``ValueError``) if ``loss_type`` is unknown."""
    if loss_type not in LOSSES:
        raise UserInputError(f"rl.loss: unknown loss {loss_type!r}; allowed: {', '.join(LOSSES)}")


def resolve_epsilon(loss_type: str, epsilon_low: float | None = None,
                    epsilon_high: float | None = None) -> tuple[float, float]:
    """The clip range ``(eps_low, eps_high)`` a loss uses.

    A missing ``epsilon_low`` takes the loss's default (``DEFAULT_EPSILON``). A missing
    ``epsilon_high`` takes the loss's default when ``epsilon_low`` is missing too, else it equals
    ``epsilon_low`` (symmetric clipping, as TRL) except for ``dapo`` (0.28) and ``gspo`` (4e-4),
    whose defaults are asymmetric by design.
    """
    check_loss_name(loss_type)
    default_low, default_high = DEFAULT_EPSILON[loss_type]
    low = default_low if epsilon_low is None else float(epsilon_low)
    if epsilon_high is not None:
        high = float(epsilon_high)
    elif epsilon_low is None or loss_type in ("dapo", "gspo"):
        high = default_high
    else:
        high = low
    if not (0.0 <= low < 1.0 and high >= 0.0):
        raise ValueError(f"clip range needs 0 <= epsilon_low < 1 and epsilon_high >= 0, "
                         f"got {low}, {high}")
    return low, high


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman 2020, "Approximating KL divergence").

    ``k3 = exp(ref - logp) - (ref - logp) - 1``: unbiased for samples drawn from ``pi``, and
    always >= 0. For ``logp = log 0.5``, ``ref = log 0.25``: ``0.5 + ln 2 - 1 = 0.19315``.

    Args:
        logp: ``(N, T)`` token log-probs of the policy.
        ref_logp: ``(N, T)`` token log-probs of the reference.
        mask: Optional ``(N, T)``; masked-out tokens get 0 (their log-probs may be garbage).

    Returns:
        ``(N, T)`` per-token KL estimate (nats).
    """
    delta = ref_logp - logp
    if mask is not None:
        delta = torch.where(mask.bool(), delta, torch.zeros_like(delta))
    return torch.exp(delta) - delta - 1.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, loss_type: str = "grpo", ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, epsilon_low: float | None = None,
                epsilon_high: float | None = None, group_size: int | None = None,
                max_tokens: int | None = None, kl_estimator: str = "k3") -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss of one batch of completions (to minimise).

    Args:
        logp: ``(N, T)`` token log-probs under the current policy (carry the gradient).
        old_logp: ``(N, T)`` token log-probs at sampling time (detached; ``logp.detach()`` when
            the batch is used for a single update).
        advantages: ``(N,)`` advantage of each completion (a ``(B, G)`` array is flattened
            row-major, so completion ``b*G + g``), or ``(N, T)`` one advantage per token (the
            token-level credit of FlexRec, FLAME and UGR's token rewards).
        mask: ``(N, T)`` bool or 0/1 float, 1 for real tokens, 0 for padding.
        loss_type: One of ``LOSSES``.
        ref_logp: ``(N, T)`` token log-probs under the reference model; needed when ``beta > 0``.
        beta: Weight of the per-token k3 KL to the reference.
        epsilon_low: Lower clip, ratio >= 1 - epsilon_low (default per loss, ``resolve_epsilon``).
        epsilon_high: Upper clip, ratio <= 1 + epsilon_high (default per loss).
        group_size: ``G``; only checks that the batch holds whole groups.
        max_tokens: Constant token count of ``dr_grpo``'s normaliser (default ``T``).
        kl_estimator: ``"k3"`` (Schulman's k3 per token) or ``"k3_ratio"``, k3 times the
            importance ratio (per token, or per sequence for ``gspo``): TRL's
            ``use_bias_correction_kl``, which makes the estimate unbiased for samples drawn from
            the old policy when ``mu > 1``; identical to k3 in value when the ratio is 1.

    Returns:
        ``(loss, stats)``: a scalar tensor, and floats ``"clip_fraction"`` (share of real tokens,
        or of sequences for ``gspo``, whose clipped term was the active one), ``"kl"`` (mean k3
        KL over real tokens, 0 without a reference) and ``"ratio_mean"`` (mean importance ratio
        over real tokens, or over sequences for ``gspo``).
    """
    low, high = resolve_epsilon(loss_type, epsilon_low, epsilon_high)
    assert logp.ndim == 2, f"logp must be (N, T), got shape {tuple(logp.shape)}"
    n, t = logp.shape
    assert old_logp.shape == logp.shape and mask.shape == logp.shape, \
        "logp, old_logp and mask must have the same (N, T) shape"
    assert ref_logp is None or ref_logp.shape == logp.shape, "ref_logp must be (N, T) like logp"
    assert advantages.numel() in (n, n * t), \
        f"need one advantage per completion ({n}) or per token ({n * t}), got {advantages.numel()}"
    if kl_estimator not in KL_ESTIMATORS:
        raise UserInputError(f"rl.kl_estimator: unknown estimator {kl_estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")
    assert group_size is None or n % group_size == 0, \
        f"{n} completions are not whole groups of {group_size}"
    if beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logp (the reference model's log-probs)")

    real = mask.bool()
    weight = mask.to(logp.dtype)
    adv = advantages.reshape(n, -1).to(device=logp.device, dtype=logp.dtype).detach()  # (N, 1) or (N, T)
    old_logp = old_logp.detach()
    # padding log-probs may be anything: zero their log-ratio so exp() cannot overflow
    log_ratio = torch.where(real, logp - old_logp, torch.zeros_like(logp))

    # step 1: importance ratio, per token or (gspo) per sequence
    if loss_type == "gspo":
        n_tokens = weight.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = (log_ratio * weight).sum(-1, keepdim=True) / n_tokens
    ratio = torch.exp(log_ratio)

    # step 2: clipped surrogate (+ KL) per token
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl_value = 0.0
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach(), real)
        if kl_estimator == "k3_ratio":
            kl = kl * ratio
        kl_value = _masked_mean(kl.detach(), weight)
        if beta > 0:
            per_token = per_token + beta * kl

    # step 3: aggregation over tokens and sequences
    if loss_type in ("grpo", "gspo"):
        loss = ((per_token * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * weight).sum() / weight.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = (per_token * weight).sum() / (n * (t if max_tokens is None else max_tokens))

    # the clipped term is active where the ratio left the range in the advantage's direction
    is_clipped = ((ratio < 1.0 - low) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    if loss_type == "gspo" and adv.shape[1] == 1:
        has_tokens = (weight.sum(-1, keepdim=True) > 0).to(logp.dtype)
        clip_fraction = _masked_mean(is_clipped.to(logp.dtype), has_tokens)
        ratio_mean = _masked_mean(ratio.detach(), has_tokens)
    else:
        clip_fraction = _masked_mean(is_clipped.to(logp.dtype), weight)
        ratio_mean = _masked_mean(ratio.detach(), weight)
    stats = {"clip_fraction": clip_fraction, "kl": kl_value, "ratio_mean": ratio_mean}
    return loss, stats


@torch.no_grad()
def sync_reference(ref_model: nn.Module, model: nn.Module, alpha: float) -> None:
    """Move the reference towards the policy in place: ``ref <- alpha*theta + (1-alpha)*ref``.

    TRL's ``sync_ref_model`` (after "TR-DPO", Gorbatovski et al. 2024); ``alpha = 1`` copies the
    policy, ``alpha = 0`` leaves the reference as it is. Parameters are matched by name.

    Args:
        ref_model: The reference model, updated in place.
        model: The policy.
        alpha: Mixing weight in ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sync_reference: alpha must be in [0, 1], got {alpha}")
    ref_params = dict(ref_model.named_parameters())
    params = dict(model.named_parameters())
    assert ref_params.keys() == params.keys(), "reference and policy have different parameters"
    for name, ref in ref_params.items():
        theta = params[name].detach().to(ref.dtype)
        if alpha == 1.0:
            ref.copy_(theta)
        else:
            ref.mul_(1.0 - alpha).add_(theta, alpha=alpha)
