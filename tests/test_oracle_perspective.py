"""Perspective client against a local fake server: retries, masking, rate limits, key hygiene."""

import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jaxdetox import oracles

KEY = "sk-test-SECRET-4f7c2a9e"


class FakePerspective(BaseHTTPRequestHandler):
    """Behaviour is chosen by the comment text: "ok 0.37", "429 once 0.2", "503 twice 0.6",
    "always 500", "always 429", "timeout", "malformed", "bad request", "slow 0.1"."""

    def do_POST(self):
        server = self.server
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.loads(raw)
        text = body["comment"]["text"]
        with server.lock:
            server.keys_seen.add(self.headers.get("x-goog-api-key"))
            server.paths_seen.add(self.path)
            server.requests[text] += 1
            n = server.requests[text]
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            self._answer(text, n, body)
        finally:
            with server.lock:
                server.in_flight -= 1

    def _answer(self, text, n, body):
        words = text.split()
        if text == "timeout":
            time.sleep(0.6)
            return self._json(200, _score(0.1, body))
        if text == "malformed":
            # Echo the key back in garbage: the client must never log response bodies.
            return self._raw(200, b'{"attributeScores": {"TOXICITY": ' + KEY.encode())
        if text == "bad request":
            return self._json(400, {"error": {"message": f"bad request for key {KEY}"}})
        if text == "always 500":
            return self._json(500, {"error": "internal"})
        if text == "always 429":
            return self._json(429, {"error": "quota"}, {"Retry-After": "0"})
        if words[0] == "429" and n == 1:
            return self._json(429, {"error": "quota"}, {"Retry-After": "0"})
        if words[0] == "503" and n <= 2:
            return self._json(503, {"error": "unavailable"})
        if words[0] == "slow":
            time.sleep(float(words[1]))
        return self._json(200, _score(float(words[-1]), body))

    def _json(self, code, obj, headers=None):
        self._raw(code, json.dumps(obj).encode(), headers)

    def _raw(self, code, payload, headers=None):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away

    def log_message(self, *args):
        pass


def _score(value, body):
    attr = next(iter(body["requestedAttributes"]))
    return {"attributeScores": {attr: {"summaryScore": {"value": value, "type": "PROBABILITY"}}}}


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakePerspective)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.requests = Counter()
    srv.keys_seen, srv.paths_seen = set(), set()
    srv.in_flight = srv.max_in_flight = 0
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1alpha1/comments:analyze"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    return KEY


def make(server, **kw):
    args = dict(url=server.url, qps=0, concurrency=4, max_retries=2, timeout=0.25)
    args.update(backoff_base=0.01, backoff_max=0.05)
    args.update(kw)
    return oracles.load("perspective", **args)


def test_failure_modes_are_retried_masked_and_counted(server, api_key, caplog):
    caplog.set_level(logging.DEBUG)
    texts = [
        "ok 0.37",
        "429 once 0.2",
        "503 twice 0.6",
        "always 500",
        "always 429",
        "timeout",
        "malformed",
        "bad request",
        "ok 0.91",
    ]
    oracle = make(server)
    tox, ok = oracle.score(texts)

    np.testing.assert_array_equal(ok, [1, 1, 1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(tox[ok], [0.37, 0.2, 0.6, 0.91], rtol=1e-6)
    assert np.isnan(tox[~ok]).all()  # masked, never a clean 0.0
    # Attempts per text: 1 + max_retries for every retryable failure, 1 for a 400.
    attempts = {"ok 0.37": 1, "429 once 0.2": 2, "503 twice 0.6": 3, "always 500": 3}
    attempts |= {"always 429": 3, "timeout": 3, "malformed": 3, "bad request": 1, "ok 0.91": 1}
    assert dict(server.requests) == attempts
    assert oracle.stats.calls == sum(attempts.values()) == 20
    assert oracle.stats.retries == sum(a - 1 for a in attempts.values()) == 11
    assert oracle.stats.failures == 5 and oracle.stats.texts == 9

    # The key went in the header only, and appears in no log line, message or repr.
    assert server.keys_seen == {KEY}
    assert all(KEY not in p for p in server.paths_seen)
    assert len(caplog.records) >= 11
    for record in caplog.records:
        assert KEY not in record.getMessage()
    assert KEY not in caplog.text
    assert KEY not in repr(oracle) and KEY not in str(vars(oracle))


def test_no_retries_when_configured_off(server, api_key):
    oracle = make(server, max_retries=0)
    tox, ok = oracle.score(["429 once 0.2", "always 500", "ok 0.5"])
    np.testing.assert_array_equal(ok, [False, False, True])
    assert oracle.stats.retries == 0 and oracle.stats.calls == 3


def test_connection_refused_is_masked_and_key_not_in_errors(api_key, caplog):
    caplog.set_level(logging.DEBUG)
    import socket

    with socket.socket() as s:  # find a free port, then close it: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    oracle = oracles.load(
        "perspective", url=f"http://127.0.0.1:{port}/v1alpha1/x", qps=0, max_retries=1
    )
    oracle.backoff_base = 0.01
    tox, ok = oracle.score(["hello"])
    assert not ok[0] and np.isnan(tox[0]) and oracle.stats.calls == 2
    assert caplog.records and KEY not in caplog.text


def test_missing_key_is_a_clear_error_without_secrets(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(oracles.OracleUnavailableError, match="PERSPECTIVE_API_KEY"):
        oracles.load("perspective")
    monkeypatch.setenv("MY_KEY_VAR", KEY)
    oracle = oracles.load("perspective", api_key_env="MY_KEY_VAR")
    assert KEY not in repr(oracle)
    assert oracle.oracle_id == "perspective/v1alpha1/TOXICITY/en"


def test_qps_limit_and_concurrency(server, api_key):
    texts = [f"slow 0.05 {i / 100}" for i in range(12)]
    # Concurrency bound: 3 workers, no rate limit, each request takes 50 ms.
    oracle = make(server, concurrency=3, qps=0)
    tox, ok = oracle.score(texts)
    assert ok.all() and 1 < server.max_in_flight <= 3
    np.testing.assert_allclose(tox, [i / 100 for i in range(12)], rtol=1e-6)
    # Rate bound: 40 QPS over 12 requests cannot finish in less than 11/40 s.
    server.max_in_flight = 0
    oracle = make(server, concurrency=8, qps=40)
    start = time.monotonic()
    _, ok = oracle.score([f"ok {i / 100}" for i in range(12)])
    assert ok.all() and time.monotonic() - start >= 11 / 40 - 0.01


def test_cached_perspective_retries_only_failures(server, api_key, tmp_path):
    oracle = make(server, cache=tmp_path / "p.sqlite", max_retries=0)
    _, ok = oracle.score(["ok 0.1", "429 once 0.2", "ok 0.3"])
    np.testing.assert_array_equal(ok, [True, False, True])
    tox, ok = oracle.score(["ok 0.1", "429 once 0.2", "ok 0.3"])  # second 429-once succeeds
    assert ok.all() and oracle.stats.cache_hits == 2
    np.testing.assert_allclose(tox, [0.1, 0.2, 0.3], rtol=1e-6)
    assert server.requests["ok 0.1"] == 1 and server.requests["429 once 0.2"] == 2
