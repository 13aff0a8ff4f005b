"""The OpenAI-compatible engine against a scripted local HTTP server (127.0.0.1 only).

Rate limiting and backoff are checked through an injected fake clock and sleep: no test asserts
a wall-clock duration.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agorasim.agents.engines import build_engine
from agorasim.agents.engines.base import ChatRequest, Message
from agorasim.agents.engines.openai import OpenAIEngine, RateLimiter
from agorasim.config import LLMConfig

SCHEMA = {"type": "object", "properties": {"rating": {"type": "integer"}}, "required": ["rating"]}


def completion(content, prompt_tokens=11, completion_tokens=7):
    """A chat completion body as an OpenAI-compatible server returns it."""
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


def echo(body, n):
    """Default script: answer with the last user message."""
    return 200, {}, completion("echo: " + body["messages"][-1]["content"])


class FakeServer:
    """Records what it receives; ``script(body, n) -> (status, headers, body, [delay_s])`` answers
    the n-th request (0-based). A dict or list body is sent as JSON, a str as is."""

    def __init__(self):
        self.script = echo
        self.bodies, self.headers = [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                with server.lock:
                    n = len(server.bodies)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    body = json.loads(raw)
                    with server.lock:
                        server.bodies.append(body)
                        server.headers.append(dict(self.headers))
                    if self.path != "/v1/chat/completions":
                        status, headers, payload, delay = 404, {}, "not found", 0.0
                    else:
                        status, headers, payload, *rest = server.script(body, n)
                        delay = rest[0] if rest else 0.0
                    if delay:
                        time.sleep(delay)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # client gone after a timeout
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeTime:
    """A clock that only moves when slept on; records every sleep."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def make_engine(base_url, fake_time=None, **kw):
    kw = {"model": "served-model", "timeout_s": 5.0, "retries": 3, "backoff_s": 0.5, "concurrency": 4, **kw}
    cfg = LLMConfig(base_url=base_url, **kw)
    if fake_time is None:
        fake_time = FakeTime()  # never waits for real
    return OpenAIEngine(cfg, clock=fake_time.clock, sleep=fake_time.sleep)


def req(text="hello", **kw):
    return ChatRequest(messages=[Message(role="system", content="be brief"), Message(role="user", content=text)],
                       **kw)


def test_normal_answer_and_request_body(server):
    engine = make_engine(server.base_url)
    [r] = engine.generate([req("rate it", seed=42, max_tokens=64, temperature=0.7, top_p=0.9,
                               json_schema=SCHEMA)])
    engine.close()
    assert r.error is None and r.text == "echo: rate it"
    assert (r.tokens_in, r.tokens_out) == (11, 7)
    assert r.latency_s >= 0
    [body] = server.bodies
    assert body["model"] == "served-model"
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rate it"}]
    assert (body["seed"], body["max_tokens"], body["temperature"], body["top_p"]) == (42, 64, 0.7, 0.9)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


def test_no_response_format_without_schema_or_when_not_structured(server):
    engine = make_engine(server.base_url, structured=False)
    engine.generate([req(json_schema=SCHEMA)])
    engine.close()
    engine = make_engine(server.base_url)
    engine.generate([req()])
    engine.close()
    assert all("response_format" not in b for b in server.bodies) and len(server.bodies) == 2


def test_api_key_header_only_when_set(server, monkeypatch):
    monkeypatch.setenv("AGORASIM_TEST_KEY", "sk-test")
    engine = make_engine(server.base_url, api_key_env="AGORASIM_TEST_KEY")
    engine.generate([req()])
    monkeypatch.delenv("AGORASIM_TEST_KEY")
    engine2 = make_engine(server.base_url, api_key_env="AGORASIM_TEST_KEY")
    engine2.generate([req()])
    engine.close(), engine2.close()
    auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for h in server.headers]
    assert auth == ["Bearer sk-test", None]


def test_token_counts_from_usage_and_missing_usage(server):
    def script(body, n):
        if n == 0:
            return 200, {}, completion("a", prompt_tokens=123, completion_tokens=45)
        return 200, {}, {"choices": [{"message": {"role": "assistant", "content": None}}]}

    server.script = script
    engine = make_engine(server.base_url, concurrency=1)
    a, b = engine.generate([req(), req()])
    engine.close()
    assert (a.text, a.tokens_in, a.tokens_out, a.error) == ("a", 123, 45, None)
    assert (b.text, b.tokens_in, b.tokens_out, b.error) == ("", 0, 0, None)


def test_500_then_success_is_retried(server):
    server.script = lambda body, n: (500, {}, "boom") if n == 0 else echo(body, n)
    t = FakeTime()
    engine = make_engine(server.base_url, t)
    [r] = engine.generate([req("x")])
    engine.close()
    assert r.error is None and r.text == "echo: x"
    assert len(server.bodies) == 2
    assert t.sleeps == [0.5]
    assert r.latency_s == pytest.approx(0.5)  # latency includes the backoff (fake clock)


def test_backoff_doubles_until_retries_run_out(server):
    server.script = lambda body, n: (503, {}, "overloaded\nplease wait")
    t = FakeTime()
    engine = make_engine(server.base_url, t, retries=3, backoff_s=0.5)
    [r] = engine.generate([req()])
    engine.close()
    assert len(server.bodies) == 4
    assert t.sleeps == [0.5, 1.0, 2.0]
    assert r.text == "" and "503" in r.error and "\n" not in r.error
    assert r.latency_s == pytest.approx(3.5)


@pytest.mark.parametrize("retry_after, expected", [("3", 3.0), ("1000", 30.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.5)])
def test_429_honours_numeric_retry_after(server, retry_after, expected):
    server.script = lambda body, n: (429, {"Retry-After": retry_after}, "slow down") if n == 0 else echo(body, n)
    t = FakeTime()
    engine = make_engine(server.base_url, t)
    [r] = engine.generate([req("y")])
    engine.close()
    assert r.error is None and r.text == "echo: y"
    assert t.sleeps == [expected] and len(server.bodies) == 2


def test_400_is_not_retried(server):
    server.script = lambda body, n: (400, {}, {"error": {"message": "bad request"}})
    t = FakeTime()
    engine = make_engine(server.base_url, t)
    [r] = engine.generate([req()])
    engine.close()
    assert len(server.bodies) == 1 and t.sleeps == []
    assert r.text == "" and r.error.startswith("HTTP 400")


@pytest.mark.parametrize("payload", ["this is not json", {"foo": 1}, {"choices": []}, [1, 2],
                                     {"choices": [{"message": {"content": ["not", "text"]}}]}])
def test_garbage_body_gives_error_not_raise(server, payload):
    server.script = lambda body, n: (200, {}, payload)
    engine = make_engine(server.base_url, concurrency=1)
    rs = engine.generate([req(), req()])
    engine.close()
    assert len(rs) == 2
    assert all(r.text == "" and r.error and r.error.startswith("malformed response") for r in rs)
    assert len(server.bodies) == 2  # a malformed 200 is not retried


def test_slow_answer_times_out(server):
    server.script = lambda body, n: (200, {}, completion("late"), 1.0)
    t = FakeTime()
    engine = make_engine(server.base_url, t, timeout_s=0.1, retries=1, backoff_s=0.0)
    [r] = engine.generate([req()])
    engine.close()
    assert r.text == "" and "timeout" in r.error
    assert len(server.bodies) == 2  # a timeout is retried


def test_server_down_gives_errors_for_all_requests():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = FakeTime()
    engine = make_engine(f"http://127.0.0.1:{port}/v1", t, retries=2, backoff_s=0.25, concurrency=2)
    rs = engine.generate([req(str(i)) for i in range(5)])
    engine.close()
    assert len(rs) == 5
    assert all(r.text == "" and r.error.startswith("connection error") for r in rs)
    assert sorted(t.sleeps) == [0.25] * 5 + [0.5] * 5


def test_bad_base_url_does_not_raise():
    t = FakeTime()
    engine = make_engine("not a url at all", t, retries=3)
    [r] = engine.generate([req()])
    engine.close()
    assert r.text == "" and r.error.startswith("bad url") and t.sleeps == []  # not retried


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit_respected(server, concurrency):
    server.script = lambda body, n: (*echo(body, n), 0.05)
    engine = make_engine(server.base_url, concurrency=concurrency)
    rs = engine.generate([req(str(i)) for i in range(9)])
    engine.close()
    assert [r.text for r in rs] == [f"echo: {i}" for i in range(9)]
    assert server.max_in_flight <= concurrency
    if concurrency > 1:
        assert server.max_in_flight > 1


def test_order_preserved_when_answers_finish_out_of_order(server):
    # earlier requests answer later
    server.script = lambda body, n: (*echo(body, n), 0.01 * (10 - int(body["messages"][-1]["content"])))
    engine = make_engine(server.base_url, concurrency=5)
    rs = engine.generate([req(str(i)) for i in range(10)])
    engine.close()
    assert [r.text for r in rs] == [f"echo: {i}" for i in range(10)]
    assert engine.generate([]) == []


def test_rate_limit_spaces_request_starts(server):
    t = FakeTime()
    engine = make_engine(server.base_url, t, rate_limit=4.0, concurrency=1)
    rs = engine.generate([req(str(i)) for i in range(4)])
    engine.close()
    assert all(r.error is None for r in rs)
    assert t.sleeps == pytest.approx([0.25, 0.25, 0.25])


def test_rate_limiter_unit():
    t = FakeTime()
    limiter = RateLimiter(2.0, t.clock, t.sleep)
    for _ in range(4):
        limiter.wait()
    assert t.sleeps == pytest.approx([0.5, 0.5, 0.5])
    t.now += 10.0  # idle for a while: the next start is immediate
    limiter.wait()
    assert len(t.sleeps) == 3
    unlimited = RateLimiter(0.0, t.clock, t.sleep)
    unlimited.wait(), unlimited.wait()
    assert len(t.sleeps) == 3


def test_rate_limiter_is_thread_safe():
    frozen = 100.0
    sleeps, lock = [], threading.Lock()

    def sleep(s):
        with lock:
            sleeps.append(s)

    limiter = RateLimiter(10.0, lambda: frozen, sleep)
    threads = [threading.Thread(target=limiter.wait) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # every start got its own slot: 0 (no sleep), 0.1, 0.2, ... 0.7
    assert sorted(sleeps) == pytest.approx([0.1 * k for k in range(1, 8)])


def test_close_only_closes_own_client(server):
    own = make_engine(server.base_url)
    own.close()
    assert own.client.is_closed
    injected = httpx.Client()
    engine = OpenAIEngine(LLMConfig(base_url=server.base_url), client=injected)
    [r] = engine.generate([req("z")])
    engine.close()
    assert r.text == "echo: z" and not injected.is_closed
    injected.close()


def test_build_engine_and_base_url_slash(server):
    engine = build_engine("openai", LLMConfig(base_url=server.base_url + "/", model="m"))
    assert isinstance(engine, OpenAIEngine) and engine.backend == "openai" and engine.model == "m"
    [r] = engine.generate([req("q")])
    engine.close()
    assert r.text == "echo: q"
