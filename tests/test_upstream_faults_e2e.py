"""Upstream faults end to end (issue 11 items 3, 5, 7): one gateway process in front of a small misbehaving
upstream on loopback, driven over HTTP.

The upstream answers stream requests with plain JSON (it ignores ``stream``) or with an HTML page, drips its
body one byte at a time, and echoes the credential it got in a 401. The client must get the answer and its
real usage, a fallback, a timely 504, and error messages without upstream text or secrets (the gateway's
log must not hold the key either).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from conftest import Server, free_port, start_gateway, stop

pytestmark = pytest.mark.e2e

KEY = "sk-faults-Hx93kLm02PqZ7vNb"
AUTH = {"authorization": "Bearer anything"}     # first run: no master key, no keys, any bearer is team default
ANSWER = {"id": "chatcmpl-j", "object": "chat.completion", "created": 5, "model": "json",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Plain JSON answer"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, ctype: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        model = body["model"]
        try:
            if model == "json":
                self._send(200, "application/json", json.dumps(ANSWER).encode())
            elif model == "html":
                self._send(200, "text/html", b"<html>down for maintenance at 10.0.0.7:8000</html>")
            elif model == "drip":
                data = json.dumps(ANSWER).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):          # ~300 bytes at 0.25 s: over a minute in all
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.25)
            elif model == "echo401":
                got = self.headers.get("authorization", "")
                self._send(401, "application/json", json.dumps({"error": {
                    "message": f"Incorrect API key provided: {got.removeprefix('Bearer ')}",
                    "type": "invalid_request_error", "code": "invalid_api_key"}}).encode())
            else:
                self._send(404, "text/plain", b"no such model")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def dep(name: str, model: str, base: str, extra: str = "") -> str:
    return (f"      - {{provider: openai, name: {name}, model: {model}, api_base: '{base}/v1', "
            f"api_key_env: FAULTS_KEY, price: {{input_per_mtok: 1, output_per_mtok: 2}}{extra}}}\n")


@pytest.fixture(scope="module")
def gw(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    closed = f"http://127.0.0.1:{free_port()}"
    models = {"json": dep("json", "json", upstream), "html": dep("html", "html", upstream),
              "drip": dep("drip", "drip", upstream, ", timeout_s: 1"), "echo": dep("echo", "echo401", upstream),
              "refused": dep("refused", "refused", closed)}
    text = "models:\n" + "".join(f"  {name}:\n    deployments:\n{d}" for name, d in models.items())
    text += "routes:\n  - {name: html-first, match: {models: [fallback]}, candidates: [html, json]}\n"
    policy_dir = tmp_path_factory.mktemp("faults")
    (policy_dir / "models.yaml").write_text(text)
    server = start_gateway(policy_dir, policy_dir / "gateway.log", env={"FAULTS_KEY": KEY})
    yield server
    stop(server.proc)


def stream(gw: Server, model: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30, headers=AUTH)
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return resp, events


def error_of(gw: Server, model: str) -> tuple[int, dict[str, Any]]:
    resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers=AUTH,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return resp.status_code, resp.json()["error"]


def test_a_json_answer_to_a_stream_request_reaches_the_client_with_its_real_usage(gw: Server) -> None:
    resp, events = stream(gw, "json")
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    assert text == "Plain JSON answer"
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["prompt_tokens"] == 1000 and usage["completion_tokens"] == 500
    assert usage["cost_usd"] == pytest.approx(0.002)         # 1000 x $1/M + 500 x $2/M: billed, not estimated


def test_a_stream_request_answered_with_html_falls_back(gw: Server) -> None:
    resp, events = stream(gw, "fallback")
    assert resp.status_code == 200 and resp.headers["x-gateway-model"] == "json"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"]) \
        == "Plain JSON answer"


def test_a_dripping_upstream_times_out_at_the_deployment_timeout(gw: Server) -> None:
    started = time.monotonic()
    status, error = error_of(gw, "drip")
    assert (status, error["code"]) == (504, "upstream_timeout")
    assert time.monotonic() - started < 15                     # timeout_s is 1; per read it took minutes


def test_upstream_error_text_and_the_key_stay_out_of_answers_and_the_log(gw: Server) -> None:
    status, error = error_of(gw, "echo")
    assert status == 502 and error["code"] == "upstream_error"
    assert KEY not in json.dumps(error) and "Incorrect API key" not in error["message"]
    assert "HTTP 401" in error["message"] and "invalid_api_key" in error["message"]
    status, error = error_of(gw, "refused")
    assert status == 502 and "127.0.0.1" not in error["message"] and "connection refused" in error["message"]
    _, events = stream(gw, "echo")
    assert KEY not in json.dumps(events)
    time.sleep(0.2)
    log = gw.output()
    assert "Incorrect API key provided: [redacted]" in log and KEY not in log
