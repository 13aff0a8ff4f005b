"""Tests of the vLLM engines; they run in their own venv: ``make test-vllm`` (``.venv-vllm``).

Every test here is marked ``vllm`` and each module skips itself at import when vllm is not
installed, so the main suite (``make test``, a venv without vllm) collects and skips them. The
hook below makes that hold for any module added later, too.

The folder is not named ``vllm``: ``tests/`` is on ``sys.path`` (pytest puts it there for
``tests/conftest.py``), and a ``tests/vllm`` folder would import as a namespace package named
vllm. ``vllm_installed`` also checks the spec's origin rather than importing, to be safe.
"""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host memory for the KV cache (CPU build)

HERE = Path(__file__).resolve().parent


def vllm_installed() -> bool:
    """Whether the real vllm package is importable (not a namespace package such as this folder)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


HAS_VLLM = vllm_installed()


def pytest_collection_modifyitems(config, items):
    """Mark every test of this folder ``vllm``; skip them where vllm is not installed."""
    skip = pytest.mark.skip(reason="vllm is not installed (make test-vllm runs these in .venv-vllm)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vllm)
            if not HAS_VLLM:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a local transformers directory."""
    from agorasim.agents.engines.models import model_dir

    return model_dir("smollm2")
