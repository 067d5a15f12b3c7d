"""``gateway serve`` as a new user meets it: run outside the repository (the built-in demo policies, said so),
a port already taken (one line, non-zero, nothing announced), a hosted model whose key variable is unset
(warned at start, listed by /health/ready, answered without calling upstream), the log format, and
idle or half-open connections that the server must close by itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from harness import wait_http

from conftest import ROOT, GatewayFactory, free_port, mock_policy, start_gateway, stop
from gateway.demo.runner import DEMO_POLICIES

pytestmark = pytest.mark.e2e

GENEROUS_S = 60.0   # a bound for what must happen eventually, never a timing assertion
BEARER = {"Authorization": "Bearer anything"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env | extra


def test_serve_outside_the_repository_falls_back_to_the_demo_policies(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                                cwd=tmp_path, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready", proc, timeout=GENEROUS_S)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, headers=BEARER,
                           json={"model": "demo", "messages": [{"role": "user", "content": "Hello"}]})
        assert reply.status_code == 200 and reply.json()["usage"]["cost_usd"] > 0
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready").json()
        assert all(Path(f).parent == DEMO_POLICIES for f in ready["policy_files"])
    finally:
        stop(proc)
    text = log.read_text()
    assert "serving the built-in demo policies" in text and f"no policies directory in {tmp_path}" in text
    assert f"policies from {DEMO_POLICIES}: caching.yaml, models.yaml, teams.yaml" in text


def test_serve_with_a_config_dir_that_does_not_exist_says_where_it_looked(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", "nowhere", "--port",
                           str(free_port())], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=GENEROUS_S)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "policy directory does not exist" in line and str(tmp_path / "nowhere") in line and "--config" in line


def test_check_outside_the_repository_says_where_it_looked_and_how_to_point_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "check"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=GENEROUS_S)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "policy directory does not exist" in line and str(tmp_path / "policies") in line
    assert "run from the repository" in line and "--config DIR" in line


def test_serve_on_a_port_in_use_exits_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(ROOT / "policies"),
                               "--port", str(port)], env=clean_env(), capture_output=True, text=True,
                              timeout=GENEROUS_S)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"gateway: cannot listen on 127.0.0.1:{port} (") and "--port" in line
    assert "gateway ready" not in done.stderr


def keyed_policy(mock: str, variable: str) -> str:
    return mock_policy(mock, hosted=f"""
        hosted:
          deployments:
            - provider: openai
              model: mock
              api_base: {mock}/v1
              api_key_env: {variable}
              price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
        """)


def test_an_unset_key_variable_is_warned_about_and_listed_as_not_ready_detail(gateway: GatewayFactory,
                                                                              mock_reset: str) -> None:
    variable = "GW_TEST_KEY_THAT_IS_NOT_SET"
    server = gateway(keyed_policy(mock_reset, variable))
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 200
    assert ready.json()["missing_credentials"] == [{"deployment": "openai/mock", "variable": variable}]
    warning = [line for line in server.output().splitlines() if variable in line]
    assert warning and "WARNING" in warning[0] and "openai/mock" in warning[0]

    keyed = gateway(keyed_policy(mock_reset, variable), env={variable: "sk-upstream"})
    assert httpx.get(f"{keyed.url}/health/ready").json()["missing_credentials"] == []
    assert variable not in keyed.output()


def test_a_request_to_a_deployment_without_its_key_names_the_variable(gateway: GatewayFactory,
                                                                      mock_reset: str) -> None:
    variable = "GW_TEST_KEY_THAT_IS_NOT_SET"
    server = gateway(keyed_policy(mock_reset, variable))
    for stream in (False, True):
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, headers=BEARER, json={
            "model": "hosted", "stream": stream, "messages": [{"role": "user", "content": "Hello"}]})
        error = reply.json()["error"]
        assert reply.status_code == 502 and error["code"] == "missing_credentials", reply.text
        assert variable in error["message"]
    assert httpx.get(f"{mock_reset}/_requests").json() == []          # nothing reached the upstream


def test_json_log_format_writes_every_line_as_json(gateway: GatewayFactory, tmp_path: Path) -> None:
    server = gateway(mock_policy("http://127.0.0.1:9"), env={"GATEWAY_LOG_FORMAT": "json"})
    httpx.post(f"{server.url}/v1/chat/completions", timeout=30, headers=BEARER,
               json={"model": "demo", "messages": [{"role": "user", "content": "Hello"}]})
    stop(server.proc)
    lines = [json.loads(line) for line in server.output().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger"} <= set(line) for line in lines)
    assert any(line["logger"] == "gateway" and "policies from" in line["message"] for line in lines)


# -------------------------------------------------------------------- idle and half-open connections

def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Read until the server closes the connection (EOF or reset) or the deadline passes."""
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_idle_and_half_open_connections_are_closed_by_the_server(tmp_path: Path) -> None:
    server = start_gateway(ROOT / "policies", tmp_path / "gateway.log",
                           {"GATEWAY_KEEPALIVE_TIMEOUT_S": "1", "GATEWAY_REQUEST_READ_TIMEOUT_S": "2"})
    address = ("127.0.0.1", server.port)
    sockets: dict[str, list[socket.socket]] = {"silent": [], "partial head": [], "partial body": [],
                                               "after a response": []}
    try:
        for _ in range(40):
            sockets["silent"].append(socket.create_connection(address))
        for _ in range(10):
            s = socket.create_connection(address)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            sockets["partial head"].append(s)
        for _ in range(10):
            s = socket.create_connection(address)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500\r\n\r\n{\"model\": ")
            sockets["partial body"].append(s)
        for _ in range(5):
            s = socket.create_connection(address)
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            sockets["after a response"].append(s)
        dribbler = socket.create_connection(address)    # one byte at a time, never a whole head
        deadline = time.monotonic() + GENEROUS_S
        for kind, group in sockets.items():
            for s in group:
                assert closed_by_server(s, deadline), f"a {kind} connection was left open"
        head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        dribbler.settimeout(0.2)
        for byte in head:
            if time.monotonic() > deadline:
                pytest.fail("a dribbling connection was left open")
            try:
                dribbler.sendall(bytes([byte]))
                if dribbler.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        else:
            pytest.fail("the server read a 10 kB head one byte at a time without closing")
        # the server still serves, on a new connection and on a kept-alive one
        with httpx.Client() as client:
            assert client.get(f"{server.url}/health/live").status_code == 200
            assert client.get(f"{server.url}/health/live").status_code == 200
    finally:
        for group in sockets.values():
            for s in group:
                s.close()
        stop(server.proc)
