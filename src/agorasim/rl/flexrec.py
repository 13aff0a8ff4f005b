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
