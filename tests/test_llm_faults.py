"""Fault injection: language-model users behind a local OpenAI-compatible stub that fails on
purpose (timeouts, 429 with Retry-After, 500, malformed bodies, ungrounded ids, dropped
connections). The run finishes, no round is lost, and every re-ask and fallback the market counts
per round equals what the stub injected."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agorasim.agents.engines.base import ChatRequest, Message
from agorasim.agents.engines.fake import fake_answer
from agorasim.config import build_config
from agorasim.env.market import Market
from agorasim.scenarios import load_scenario

FAULTS = ("ok", "429-once", "500", "malformed", "ungrounded", "dropped", "timeout")
FAILING = {"500", "malformed", "ungrounded", "dropped", "timeout"}
TIMEOUT_S = 1.0  # generous: an answer that is only slow under load must not time out


def fault_of(body: dict) -> str:
    """The fault for a logical request: fixed by its seed and text, so retries get the same one."""
    key = json.dumps([body.get("seed"), body["messages"]], sort_keys=True)
    return FAULTS[int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % len(FAULTS)]


def valid_answer(body: dict) -> str:
    slate = next(m["content"] for m in body["messages"] if "Items shown:" in m["content"])
    return fake_answer(ChatRequest(messages=[Message(role="user", content=slate)], seed=body.get("seed")))


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connections under 8 concurrent requests,
    # and a dropped SYN is retried by the kernel after 1 s: a timeout the stub did not inject


class StubServer:
    """Answers ``POST /v1/chat/completions`` with the fault of each logical request and counts,
    per logical request seen the first time, whether it was a first ask or a re-ask and its fault."""

    def __init__(self):
        self.seen: dict[str, int] = {}  # logical request -> attempts
        self.first_asks, self.reasks = Counter(), Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # the pre-run check asks for the models
                data = json.dumps({"data": [{"id": "stub"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                fault = fault_of(body)
                key = json.dumps([body.get("seed"), body["messages"]], sort_keys=True)
                with server.lock:
                    attempt = server.seen.get(key, 0)
                    server.seen[key] = attempt + 1
                    if attempt == 0:
                        is_reask = len(body["messages"]) > 2  # the re-ask adds the answer and the problem
                        (server.reasks if is_reask else server.first_asks)[fault] += 1
                if fault == "dropped":
                    self.close_connection = True
                    return
                if fault == "timeout":
                    time.sleep(TIMEOUT_S * 2)
                status, text = 200, valid_answer(body)
                if fault == "500":
                    status, text = 500, "server error"
                elif fault == "429-once" and attempt == 0:
                    status, text = 429, "slow down"
                elif fault == "ungrounded":
                    text = json.dumps([{"item_id": 987654, "click": True, "rating": 9, "reason": "not shown"}])
                payload = ("{not json" if fault == "malformed" else
                           json.dumps({"choices": [{"message": {"content": text}}], "usage": {}}))
                data = payload.encode()
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def snapshot(self) -> tuple[Counter, Counter]:
        with self.lock:
            return Counter(self.first_asks), Counter(self.reasks)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


def test_every_injected_fault_is_counted_and_no_round_is_lost(stub, small_overrides):
    rounds = 3
    config = build_config(load_scenario("cold-start"), small_overrides + [
        "policy.name=popularity", f"run.rounds={rounds}", "agents.users.backend=openai",
        "agents.users.llm_share=0.3", f"agents.llm.base_url={stub.base_url}", "agents.llm.retries=1",
        "agents.llm.backoff_s=0", f"agents.llm.timeout_s={TIMEOUT_S}", "agents.llm.reasks=1",
        "agents.llm.structured=false", "agents.llm.fallback_limit=1"])
    from agorasim.run.preflight import check_config

    check_config(config)  # the stub answers the server check
    market = Market(config)
    before = stub.snapshot()
    injected = Counter()
    for _ in range(rounds):
        market.step()
        firsts, reasks = stub.snapshot()
        new_firsts, new_reasks = firsts - before[0], reasks - before[1]
        before = (firsts, reasks)
        row = market.rows[-1]
        # a first ask that fails is re-asked once; a re-ask that fails falls back to the utility model
        assert row["llm/reasks"] == sum(new_firsts[f] for f in FAILING)
        assert row["llm/fallbacks"] == sum(new_reasks[f] for f in FAILING)
        assert sum(new_reasks.values()) == row["llm/reasks"]
        injected += new_firsts + new_reasks
    assert len(market.rows) == rounds
    assert all(injected[f] > 0 for f in FAULTS), injected  # the world really produced every fault
