"""Checkpoint files: digest, damage detection, and the allow-list unpickler refusing code."""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict, defaultdict, deque
from pathlib import Path

import numpy as np
import pytest
import torch

from agorasim.run import checkpoint
from agorasim.run.checkpoint import CheckpointError


def _signed(data: bytes) -> bytes:
    """Checkpoint bytes around an arbitrary pickle: an attacker can compute the digest too."""
    import hashlib

    return checkpoint.MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def test_round_trip_of_the_state_a_market_holds(tmp_path):
    rng = np.random.default_rng(3)
    rng.random(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimiser.step()
    payload = {"rng": rng, "model": model, "opt": optimiser, "arr": np.arange(6.0).reshape(2, 3),
               "odict": OrderedDict(a=1), "dd": defaultdict(list, b=[1]), "dq": deque([1, 2], maxlen=3),
               "path": Path("/tmp/x"), "t": torch.arange(4), "size": torch.Size([2, 3]), "dtype": torch.float32}
    size = checkpoint.write(tmp_path / "c.ckpt", payload)
    assert size == (tmp_path / "c.ckpt").stat().st_size
    back = checkpoint.read(tmp_path / "c.ckpt")
    assert back["rng"].random() == rng.random()
    assert torch.equal(back["model"][0].weight, model[0].weight)
    # the optimiser's state is keyed by the same parameter objects as the model's
    assert back["opt"].param_groups[0]["params"][0] is back["model"][0].weight
    assert np.array_equal(back["arr"], payload["arr"]) and back["dq"].maxlen == 3
    assert back["dd"]["new"] == [] and back["path"] == Path("/tmp/x") and back["dtype"] is torch.float32
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: b"", "empty"),
    (lambda raw: b"garbage that is not a checkpoint", "no header"),
    (lambda raw: raw[: len(raw) // 2], "damaged"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "damaged"),
    (lambda raw: pickle.dumps({"market": 1}), "no header"),  # an old-style plain pickle
])
def test_damaged_files_are_refused_with_the_reason(tmp_path, damage, reason):
    raw = checkpoint.dumps({"x": np.arange(100)})
    path = tmp_path / "c.ckpt"
    path.write_bytes(damage(raw))
    with pytest.raises(CheckpointError, match=reason):
        checkpoint.read(path)


class _System:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        import builtins

        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


def _write_text_attack(marker: Path) -> bytes:
    # getattr(PosixPath, "write_text")(PosixPath(marker), "x"): both names are on the list on
    # their own (paths are in checkpoints, getattr is what a Mesa model pickles)
    return (b"\x80\x04cbuiltins\ngetattr\ncpathlib\nPosixPath\nX\n\x00\x00\x00write_text\x86R"
            + b"cpathlib\nPosixPath\nX" + len(str(marker)).to_bytes(4, "little") + str(marker).encode()
            + b"\x85RX\x01\x00\x00\x00x\x86R.")


def test_pickles_that_run_code_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    attacks = {}
    for cls in (_System, _Eval):
        obj = cls()
        obj.marker = marker
        attacks[cls.__name__] = pickle.dumps(obj)
    # a module reached through an allowed module's attributes (runner imports subprocess)
    attacks["module through agorasim"] = b"cagorasim.run.runner\nsubprocess\n."
    attacks["os through numpy"] = b"cnumpy\nos\n."
    attacks["getattr on a class"] = _write_text_attack(marker)
    # calling an agorasim class with pickled arguments (its __init__ would run)
    attacks["agorasim constructor"] = (b"\x80\x04cagorasim.run.runner\nCsvTable\ncpathlib\nPosixPath\nX"
                                       + len(str(marker)).to_bytes(4, "little") + str(marker).encode()
                                       + b"\x85R\x85R.")
    # torch's tensor rebuild asked to call an allowed class rather than a tensor rebuild function
    attacks["tensor rebuild"] = (b"\x80\x04ctorch._tensor\n_rebuild_from_type_v2\n(cagorasim.run.runner\nCsvTable\n"
                                 b"ctorch\nTensor\n)}tR.")
    for name, data in attacks.items():
        with pytest.raises(CheckpointError):
            checkpoint.loads(_signed(data))
        assert not marker.exists(), name


def test_nested_torch_bytes_load_without_code(tmp_path):
    """torch pickles storages as bytes that torch itself would unpickle without restriction."""
    marker = tmp_path / "pwned"
    evil = _System()
    evil.marker = marker
    inner = io.BytesIO()
    torch.save(evil, inner, _use_new_zipfile_serialization=False)
    raw = inner.getvalue()
    data = b"\x80\x04ctorch.storage\n_load_from_bytes\nB" + len(raw).to_bytes(4, "little") + raw + b"\x85R."
    with pytest.raises(CheckpointError):
        checkpoint.loads(_signed(data))
    assert not marker.exists()


def test_a_checkpoint_of_another_format_version_is_refused_by_name():
    import hashlib
    import pickle

    data = pickle.dumps({"market": None})
    old = b"AGORASIM-CHECKPOINT 1\n" + hashlib.sha256(data).hexdigest().encode() + b"\n" + data
    with pytest.raises(CheckpointError, match="another agorasim version .checkpoint format 1; this one reads format 2"):
        checkpoint.loads(old)
    assert checkpoint.loads(checkpoint.dumps({"market": None})) == {"market": None}
