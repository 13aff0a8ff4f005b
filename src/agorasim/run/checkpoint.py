"""Checkpoint files: a header with a SHA-256 digest, then the market pickled; read back through an
allow-list unpickler so a checkpoint from someone else cannot run arbitrary code.

File layout::

    AGORASIM-CHECKPOINT 1\\n
    <sha256 of the payload, 64 hex digits>\\n
    <payload: pickle protocol 5>

The file is written to a temporary name, flushed to disk and renamed, so a crash leaves either the
previous file or the complete new one; a file that is truncated, empty, rewritten or not a
checkpoint at all fails the digest or the header and raises ``CheckpointError`` with the reason.

Why not plain ``pickle.load``: a pickle is a program; unpickling one can call any importable
function (``os.system`` among them). ``SafeUnpickler`` refuses every global that is not

* a class defined in agorasim, or a data class of numpy, torch (tensors, modules, optimisers),
  transformers (model and config classes), scipy.sparse, mesa's agent sets, ``collections``,
  ``pathlib`` or ``random``; such classes are created with ``__new__`` and their state set, never
  called with arguments, unless they are plain containers (``REDUCE_CLASSES``);
* one of the rebuild functions numpy and torch pickle their arrays with (``SAFE_FUNCTIONS``),
  where torch's own would unpickle nested bytes without restriction, ours load them with
  ``torch.load(weights_only=True)``;
* a class from the module of a registered policy or re-ranker (a researcher's own policy);
* ``getattr`` for the bound methods a Mesa model pickles (its ``step`` and the wrapper of it).

This closes the usual routes (``os``/``subprocess``/``builtins.eval``, modules reached through an
allowed module's attributes, nested torch pickles). It is defence in depth rather than a proof:
the allowed classes' own ``__setstate__`` methods still run.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import importlib
import io
import os
import pathlib
import pickle
import random
from pathlib import Path

import numpy as np

MAGIC = b"AGORASIM-CHECKPOINT 2\n"  # 2: the round as phases (pending provider exits, faiss indexes)
FAMILY = b"AGORASIM-CHECKPOINT "
DIGEST_HEX = 64


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, is not a checkpoint, or names code it may not run."""


# Third-party modules whose classes may appear in a checkpoint (prefix match on ``module``).
ALLOWED_CLASS_MODULES = (
    "agorasim.", "numpy", "torch.nn.modules.", "torch.nn.parameter", "torch.optim.", "torch._tensor",
    "transformers.models.", "transformers.activations", "transformers.configuration_utils",
    "transformers.generation.configuration_utils", "scipy.sparse.", "mesa.agent", "mesa.model",
    "collections", "pathlib", "random",
)
ALLOWED_TORCH_NAMES = {"Tensor", "Size", "dtype", "device", "float32", "float16", "bfloat16", "int64"}
BUILTIN_CLASSES = {"dict", "list", "set", "frozenset", "tuple", "object", "complex", "slice", "bytearray",
                   "int", "float", "str", "bytes", "bool", "range"}
# Classes that may be *called* (REDUCE) with pickled arguments: containers and value types.
REDUCE_CLASSES = (dict, list, set, frozenset, tuple, complex, slice, bytearray, int, float, str, bytes, bool,
                  range, collections.OrderedDict, collections.defaultdict, collections.deque,
                  pathlib.PurePath, random.Random, enum.Enum, np.dtype)


def _safe_load_from_bytes(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _safe_rebuild_from_type_v2(func, new_type, args, state):
    import torch._tensor

    if func not in _REBUILD_FUNCTIONS():
        raise CheckpointError(f"checkpoint asks to rebuild a tensor with {getattr(func, '__qualname__', func)!r}")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _REBUILD_FUNCTIONS():  # noqa: N802 - a constant built lazily (torch is imported on demand)
    import torch._utils

    return {torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state}


def _restricted_getattr(obj, name):
    import mesa

    if name in ("step", "_wrapped_step") and isinstance(obj, mesa.Model):
        return getattr(obj, name)
    raise CheckpointError(f"checkpoint asks for attribute {name!r} of a {type(obj).__name__}")


SAFE_FUNCTIONS = {
    ("numpy.random._pickle", "__generator_ctor"): None,
    ("numpy.random._pickle", "__bit_generator_ctor"): None,
    ("numpy.random._pickle", "__randomstate_ctor"): None,
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): None,
    ("numpy._core.numeric", "_frombuffer"): None,
    ("numpy.core.numeric", "_frombuffer"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,
    ("numpy.core.multiarray", "_reconstruct"): None,
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy.core.multiarray", "scalar"): None,
    ("torch._utils", "_rebuild_tensor_v2"): None,
    ("torch._utils", "_rebuild_parameter"): None,
    ("torch._utils", "_rebuild_parameter_with_state"): None,
    ("torch._tensor", "_rebuild_from_type_v2"): _safe_rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
    ("builtins", "getattr"): _restricted_getattr,
}


def _resolve(module: str, name: str):
    return importlib.import_module(module).__dict__[name] if "." not in name else _dotted(module, name)


def _dotted(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
        if not isinstance(obj, type) and part != name.split(".")[-1]:
            raise CheckpointError(f"checkpoint names {module}.{name}, which is not a class")
    return obj


def _class_allowed(module: str, name: str, obj) -> bool:
    if not isinstance(obj, type):
        return False
    if module == "builtins":
        return name in BUILTIN_CLASSES
    # the class must be defined where the checkpoint says (no module reached through another's
    # attributes) and that place must be on the list
    return (obj.__module__ == module or obj.__module__.startswith(module.split(".")[0] + ".")) and \
        module.startswith(ALLOWED_CLASS_MODULES)


def registered_modules() -> set[str]:
    """Modules of the registered policy and re-ranker classes: a researcher's own policy, added
    with ``register_policy``, is code they chose to run, so its classes may be in a checkpoint."""
    from agorasim.platform import RERANKERS
    from agorasim.policy import POLICIES

    return {cls.__module__ for cls in (*POLICIES.values(), *RERANKERS.values())}


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its REDUCE can be checked
    """``pickle.Unpickler`` that resolves only allow-listed globals (see the module docstring).

    Args:
        file: the pickle stream.
        trusted: further modules whose classes may appear (besides ``registered_modules()``).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, trusted: tuple[str, ...] = ()):
        super().__init__(file)
        self.trusted = registered_modules() | set(trusted)

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in SAFE_FUNCTIONS:
            replacement = SAFE_FUNCTIONS[key]
            return replacement if replacement is not None else _resolve(module, name)
        try:
            obj = _resolve(module, name)
        except (ImportError, KeyError, AttributeError):
            raise CheckpointError(f"checkpoint names {module}.{name}, which does not exist here") from None
        if module == "torch" and name in ALLOWED_TORCH_NAMES:
            return obj  # torch.float32 and friends are dtypes, not classes
        if not (_class_allowed(module, name, obj) or (isinstance(obj, type) and module in self.trusted
                                                          and obj.__module__ == module)):
            raise CheckpointError(f"checkpoint names {module}.{name}, which a checkpoint may not use")
        return obj

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, type) and not issubclass(func, REDUCE_CLASSES) and not _is_torch_value(func):
            raise CheckpointError(f"checkpoint asks to call {func.__module__}.{func.__qualname__}")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce


def _is_torch_value(cls: type) -> bool:
    return cls.__module__ == "torch" and cls.__name__ in ALLOWED_TORCH_NAMES


def dumps(payload) -> bytes:
    """The bytes of a checkpoint file holding ``payload`` (header, digest, pickle)."""
    data = pickle.dumps(payload, protocol=5)
    return MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def loads(raw: bytes, trusted: tuple[str, ...] = ()):
    """The payload of checkpoint bytes, or ``CheckpointError`` saying why they cannot be used;
    ``trusted`` names further modules whose classes may appear (see ``SafeUnpickler``)."""
    if not raw:
        raise CheckpointError("empty file")
    if not raw.startswith(MAGIC):
        if raw.startswith(FAMILY):
            version = raw[len(FAMILY):raw.find(b"\n")].decode("ascii", "replace")[:10]
            raise CheckpointError(f"written by another agorasim version (checkpoint format {version}; this one "
                                  f"reads format {MAGIC[len(FAMILY):-1].decode()})")
        raise CheckpointError("not an agorasim checkpoint (no header)")
    head = len(MAGIC) + DIGEST_HEX + 1
    digest, data = raw[len(MAGIC):head - 1], raw[head:]
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise CheckpointError("damaged: its contents do not match the digest written with it (truncated or changed)")
    try:
        return SafeUnpickler(io.BytesIO(data), trusted).load()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to rebuild is a bad checkpoint
        raise CheckpointError(f"cannot be rebuilt ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None


def write_atomic(path: Path, data: bytes | str) -> int:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed to disk and
    renamed over ``path``: a crash leaves the old file or the new one, never a torn one. Returns
    the number of bytes written."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(raw)


def write(path: Path, payload) -> int:
    """Write ``payload`` to ``path`` as a checkpoint file, atomically; returns its size in bytes."""
    return write_atomic(path, dumps(payload))


def read(path: Path):
    """The payload of a checkpoint file (see ``loads``)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read it ({error.strerror})") from None
    return loads(raw)


def write_log_segment(folder: Path, start: int, stop: int, segment: dict[str, np.ndarray]) -> Path:
    """Interaction-log chunks ``start:stop`` as ``log_<start>_<stop>.npz`` (numpy arrays only, no
    pickle; the zip's CRCs detect damage), written atomically. Segments are written once each, so
    a checkpoint costs the rounds since the last one, not the whole log."""
    folder.mkdir(exist_ok=True)
    path = folder / f"log_{start:07d}_{stop:07d}.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **segment)
    write_atomic(path, buffer.getvalue())
    return path


def read_log(folder: Path, n_chunks: int) -> list[dict[str, np.ndarray]]:
    """The segments in ``folder`` that hold the first ``n_chunks`` interaction-log chunks, in order."""
    segments = {}
    for path in folder.glob("log_*_*.npz") if folder.is_dir() else []:
        parts = path.stem.split("_")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            segments[int(parts[1])] = (int(parts[2]), path)
    found, have = [], 0
    while have < n_chunks:
        if have not in segments:
            raise CheckpointError(f"the interaction log's segment from chunk {have} is missing")
        stop, path = segments[have]
        try:
            with np.load(path, allow_pickle=False) as data:
                segment = {k: data[k] for k in data.files}
        except Exception as error:  # noqa: BLE001 - a damaged zip or array
            raise CheckpointError(f"{path.name} is damaged ({type(error).__name__})") from None
        if len(segment.get("lengths", ())) != stop - have or segment["lengths"].sum() != len(segment["round"]):
            raise CheckpointError(f"{path.name} does not hold the chunks its name says")
        found.append(segment)
        have = stop
    if have != n_chunks:
        raise CheckpointError(f"the interaction log's segments end at chunk {have}, not {n_chunks}")
    return found


__all__ = ["CheckpointError", "SafeUnpickler", "dumps", "loads", "read", "write", "write_atomic", "write_log_segment",
           "read_log", "MAGIC"]
