"""SASRec: next-item prediction with causal self-attention over a user's clicked items.

Kang & McAuley 2018, "Self-Attentive Sequential Recommendation". The state of a user is the
transformer's output at the last position of the history; an item's score is its dot product with
the (shared input/output) item embedding. Training is the paper's objective (eq. 7): at every
position, binary cross-entropy on the true next item against one item sampled uniformly from the
items alive at refit. (A full softmax over the catalogue would cost (batch x length x n_items)
logits per step, too much for 20k items on a laptop CPU.)

Differences from the paper, for readability and determinism: pre-LayerNorm blocks (as GPT-2 and
nanoGPT), dropout only on the embeddings and residual branches, with masks drawn from a
``torch.Generator`` we own (``nn.Dropout`` and attention dropout would draw from torch's global RNG).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agorasim.policy.baselines import RefittingPolicy
from agorasim.policy.observation import CatalogueView, LogView
from agorasim.policy.params import SASRecParams
from agorasim.policy.threads import torch_threads

_SCORE_CHUNK = 4096  # users encoded at once when scoring


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with masks from ``generator``; identity when ``generator`` is None (eval)."""
    if generator is None or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator) >= p
    return x * keep / (1.0 - p)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        assert dim % n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape  # batch, sequence length, embedding dim
        q, k, v = self.qkv(x).split(D, dim=2)
        # (B, L, D) -> (B, heads, L, head dim)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-LN transformer block; the feed-forward part is SASRec's point-wise two-layer ReLU net."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x, mask, p, generator):
        x = x + dropout(self.attn(self.ln_1(x), mask), p, generator)
        return x + dropout(self.mlp(self.ln_2(x)), p, generator)


class SASRec(nn.Module):
    """Item-id sequences (B, L), -1 padded on the left, to hidden states (B, L, dim).

    Built on the meta device and initialised from a generator (``build``) so that constructing it
    never touches torch's global RNG.
    """

    def __init__(self, n_items: int, dim: int, n_blocks: int, n_heads: int, max_len: int):
        super().__init__()
        self.item_emb = nn.Embedding(n_items, dim)  # shared by inputs and scores
        self.pos_emb = nn.Embedding(max_len, dim)  # slot in the left-padded window; last = most recent
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(dim)

    @classmethod
    def build(cls, n_items, dim, n_blocks, n_heads, max_len, generator, init_std=0.02) -> SASRec:
        with torch.device("meta"):
            model = cls(n_items, dim, n_blocks, n_heads, max_len)
        model.to_empty(device="cpu")
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data.normal_(0.0, init_std, generator=generator)
            if isinstance(module, nn.Linear):
                module.bias.data.zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.data.fill_(1.0)
                module.bias.data.zero_()
        return model

    @property
    def n_items(self) -> int:
        return self.item_emb.num_embeddings

    def grow_items(self, n_items: int, generator: torch.Generator, init_std: float = 0.02) -> None:
        """Extend the item table to ``n_items`` rows, new rows small random; old rows kept."""
        added = n_items - self.n_items
        if added <= 0:
            return
        new_rows = torch.empty(added, self.item_emb.embedding_dim).normal_(0.0, init_std, generator=generator)
        self.item_emb.weight = nn.Parameter(torch.cat([self.item_emb.weight.data, new_rows]))
        self.item_emb.num_embeddings = n_items

    def forward(self, seq: torch.Tensor, p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Hidden states (B, L, dim); dropout ``p`` applies only when a ``generator`` is given."""
        L = seq.shape[1]
        real = seq >= 0
        x = self.item_emb(seq.clamp(min=0)) * real[..., None]  # padding contributes nothing
        x = dropout(x + self.pos_emb.weight[-L:], p, generator)
        # attend to real items at or before your own slot; every slot may attend to itself so a
        # padding slot (never read) has a finite softmax
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        mask = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool)
        mask = mask[:, None]  # (B, 1 head-broadcast, L query, L key)
        for block in self.blocks:
            x = block(x, mask, p, generator)
        return self.ln_f(x)


def next_item_windows(users: np.ndarray, items: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Training windows from clicks in time order: inputs and next-item targets, (R, max_len).

    Each user's click sequence s_1..s_n gives pairs (s_t, s_{t+1}); they are cut into windows of
    ``max_len`` pairs counted back from the most recent, so the newest pair sits in the last slot
    (as in scoring, where the history's most recent item is last). The oldest window of a user is
    -1 padded on the left.
    """
    order = np.argsort(users, kind="stable")  # groups users, keeps time order within a user
    user, item = users[order], items[order]
    same_user = user[1:] == user[:-1]
    inputs, targets, owner = item[:-1][same_user], item[1:][same_user], user[:-1][same_user]
    if len(inputs) == 0:
        return np.full((0, max_len), -1, np.int64), np.full((0, max_len), -1, np.int64)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    counts = np.diff(np.r_[starts, len(owner)])
    group = np.repeat(np.arange(len(starts)), counts)
    back = counts[group] - 1 - (np.arange(len(owner)) - starts[group])  # 0 = the newest pair
    windows = -(-counts // max_len)  # ceil
    row = np.r_[0, np.cumsum(windows)[:-1]][group] + back // max_len
    col = max_len - 1 - back % max_len
    x = np.full((int(windows.sum()), max_len), -1, np.int64)
    y = np.full_like(x, -1)
    x[row, col], y[row, col] = inputs, targets
    return x, y


class SASRecPolicy(RefittingPolicy):
    """SASRec trained on the log's click sequences; scores candidates from ``request.history``.

    Users with an empty history score every candidate 0 (retrieval order wins); items added after
    the last refit score 0 until the next one.

    Args:
        refit_every: rounds between refits (>= 1).
        dim: embedding width.
        n_blocks: transformer blocks.
        n_heads: attention heads (must divide ``dim``).
        max_len: window length; set it to the population's history length.
        dropout: dropout probability in training.
        lr: Adam step size.
        epochs: passes over all windows per refit.
        batch_size: windows per Adam step.
        threads: torch intra-op threads while fitting and scoring, restored afterwards. The
            tensors are tiny (batch x 20 x 32), so fanning an op out to threads costs more than it
            saves: on 2 busy cores each op waited ~8 ms for a thread instead of ~20 us alone.
            None keeps torch's own setting.
    """

    name = "sasrec"
    Params = SASRecParams

    def __init__(self, refit_every: int = 5, dim: int = 32, n_blocks: int = 2, n_heads: int = 1,
                 max_len: int = 20, dropout: float = 0.1, lr: float = 2e-3, epochs: int = 3,
                 batch_size: int = 128, threads: int | None = 1):
        super().__init__(refit_every)
        for field, value in (("dim", dim), ("n_blocks", n_blocks), ("n_heads", n_heads),
                             ("max_len", max_len), ("epochs", epochs), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        if dim % n_heads:
            raise ValueError(f"n_heads must divide dim, got dim={dim}, n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0 or lr <= 0:
            raise ValueError(f"need 0 <= dropout < 1 and lr > 0, got {dropout=}, {lr=}")
        self.dim, self.n_blocks, self.n_heads = int(dim), int(n_blocks), int(n_heads)
        self.max_len, self.dropout, self.lr = int(max_len), float(dropout), float(lr)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.threads = None if threads is None else int(threads)
        self.model: SASRec | None = None  # built at the first refit, when the catalogue size is known

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, alive: torch.Tensor,
                   optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
        """One Adam step of the paper's loss on a batch of windows; returns the loss."""
        hidden = self.model(inputs, self.dropout, generator)  # (B, L, dim)
        negatives = alive[torch.randint(len(alive), targets.shape, generator=generator)]
        pos_logit = (hidden * self.model.item_emb(targets.clamp(min=0))).sum(-1)
        neg_logit = (hidden * self.model.item_emb(negatives)).sum(-1)
        # eq. 7: -ln sigmoid(r_pos) - ln(1 - sigmoid(r_neg)), averaged over real (non-padding) slots
        per_slot = -F.logsigmoid(pos_logit) - F.logsigmoid(-neg_logit)
        loss = per_slot[targets >= 0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def fit(self, log: LogView, catalogue: CatalogueView, rng: np.random.Generator) -> dict[str, float]:
        with torch_threads(self.threads):
            return self._fit(log, catalogue, rng)

    def _fit(self, log: LogView, catalogue: CatalogueView, rng: np.random.Generator) -> dict[str, float]:
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        if self.model is None:
            if catalogue.n == 0:
                return {}
            self.model = SASRec.build(catalogue.n, self.dim, self.n_blocks, self.n_heads, self.max_len,
                                      generator)
        self.model.grow_items(catalogue.n, generator)
        users, items, _ = log.clicks()
        inputs, targets = next_item_windows(users.astype(np.int64), items.astype(np.int64), self.max_len)
        alive = torch.from_numpy(catalogue.alive_ids().astype(np.int64))
        if len(inputs) == 0 or len(alive) == 0:
            return {}
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)

        # Adam moments start fresh at each refit (the table may have grown); weights are warm
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            order = torch.randperm(len(inputs), generator=generator)
            losses = []
            for start in range(0, len(inputs), self.batch_size):
                batch = order[start:start + self.batch_size]
                losses.append(self.train_step(inputs[batch], targets[batch], alive, optimizer, generator))
        return {"train/loss": float(np.mean(losses)), "train/windows": float(len(inputs))}

    def score(self, users: np.ndarray, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        scores = np.zeros(candidates.shape, np.float32)
        if self.model is None:
            return scores
        n_items = self.model.n_items
        # fit the history to the model's window: keep the most recent max_len, pad on the left
        history = np.asarray(history, np.int64)[:, -self.max_len:]
        history = np.pad(history, ((0, 0), (self.max_len - history.shape[1], 0)), constant_values=-1)
        history = np.where(history < n_items, history, -1)  # items newer than the model: unknown
        known_item = (candidates >= 0) & (candidates < n_items)
        rows = torch.from_numpy(np.where(known_item, candidates, 0).astype(np.int64))
        with torch.no_grad(), torch_threads(self.threads):
            for start in range(0, len(history), _SCORE_CHUNK):
                chunk = slice(start, start + _SCORE_CHUNK)
                state = self.model(torch.from_numpy(history[chunk]))[:, -1]  # (B, dim)
                scores[chunk] = torch.einsum("bd,bcd->bc", state, self.model.item_emb(rows[chunk])).numpy()
        has_history = (history >= 0).any(axis=1)
        return np.where(known_item & has_history[:, None], scores, 0.0)
