"""Torch intra-op threads for small models, and chunks of a batch run on Python threads.

The policies' tensors are tiny (a few hundred rows of a 2-layer model), so fanning each op out to
torch's intra-op threads pays a barrier per op: on this 2-core machine it halves a GRPO step when
the machine is idle but doubles it when another process keeps one core busy (and a second busy
process once made every small op ~100x slower). Policies therefore run their torch work with one
intra-op thread (``torch_threads``) and use the other cores one level up: a batch is cut into a
fixed number of contiguous chunks (``chunk_bounds``) and ``map_chunks`` runs the chunks on a pool
of Python threads (torch releases the GIL inside its kernels). A chunk is a whole piece of work
(a beam search over its prompts, the forward and backward pass of its rollouts), so threads meet
once per call rather than once per op: under load the chunks simply take turns.

Results never depend on the number of worker threads: the chunks are fixed by the batch and the
``chunks`` setting, each chunk is computed the same way on whichever thread runs it, and results
are put together in chunk order (gradients summed chunk 0 + chunk 1 + ...).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_PREFIX = "agorasim-chunk"


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` intra-op threads, then restore torch's setting (None: leave it)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, chunks: int) -> int:
    """Worker threads for ``chunks`` chunks: ``workers``, or the available CPUs (None); at most ``chunks``."""
    return max(1, min(chunks, available_cpus() if workers is None else workers))


def chunk_bounds(n: int, chunks: int, max_size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges of near-equal size covering ``0 .. n``: ``chunks`` of
    them, or the least multiple of ``chunks`` that keeps every range within ``max_size`` rows (so
    ``chunks`` threads stay evenly loaded); fewer if ``n`` is smaller; none if n = 0."""
    parts = max(1, chunks)
    if max_size is not None:
        parts *= max(1, -(-n // (parts * max_size)))
    parts = min(parts, n)
    edges = [n * k // parts for k in range(parts + 1)] if parts else [0]
    return list(zip(edges[:-1], edges[1:]))


def map_chunks(fn: Callable[[int, int], T], bounds: Sequence[tuple[int, int]], workers: int = 1) -> list[T]:
    """``[fn(start, stop) for each chunk]``, in chunk order, on up to ``workers`` Python threads.

    Each worker runs with the caller's autograd mode (grad enabled or not, inference mode or
    not: torch keeps them per thread). One chunk or one worker, or a call from inside a chunk
    (whose pool could deadlock waiting on itself): run here, in order.
    """
    if workers <= 1 or len(bounds) <= 1 or threading.current_thread().name.startswith(_PREFIX):
        return [fn(start, stop) for start, stop in bounds]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(bound: tuple[int, int]) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*bound)

    size = min(workers, len(bounds))
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix=_PREFIX)
    return list(pool.map(run, bounds))
