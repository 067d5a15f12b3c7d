"""Shared fixtures: real processes on loopback (mock upstream, gateway), started and stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["redis_fixtures"]  # private redis-server fixtures


@pytest.fixture(scope="session", autouse=True)
def no_state_in_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite keeps embedded state in memory (``GATEWAY_DATA_DIR=:memory:``) unless a test asks for a
    data directory, and anything that still falls back to the per-user default lands in a temporary
    ``XDG_STATE_HOME``: no test writes into the real home directory."""
    saved = {name: os.environ.get(name) for name in ("GATEWAY_DATA_DIR", "XDG_STATE_HOME")}
    os.environ["GATEWAY_DATA_DIR"] = ":memory:"
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{out}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="session")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The mock OpenAI-compatible upstream (bench/mock_upstream.py) on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("mock") / "mock.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "mock_upstream.py"), "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def mock_reset(mock_upstream: str) -> str:
    httpx.post(f"{mock_upstream}/_reset")
    return mock_upstream


def start_gateway(policy_dir: Path, log: Path, env: dict[str, str] | None = None,
                  args: tuple[str, ...] = ()) -> Server:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env["GATEWAY_DATA_DIR"] = ":memory:"   # unless the test gives a data directory
    full_env.update(env or {})
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(policy_dir), "--port", str(port), *args],
            stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT))
    server = Server(proc, port, log)
    try:
        wait_http(f"{server.url}/health/ready", proc, timeout=60)
    except RuntimeError as exc:
        stop(proc)
        raise RuntimeError(f"{exc}\n{server.output()}") from None
    return server


GatewayFactory = Callable[..., Server]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start a gateway on a policy text (YAML); every gateway started is stopped after the test."""
    started: list[Server] = []

    def make(policy: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Server:
        policy_dir = tmp_path / f"policies{len(started)}"
        policy_dir.mkdir()
        (policy_dir / "models.yaml").write_text(textwrap.dedent(policy))
        server = start_gateway(policy_dir, tmp_path / f"gateway{len(started)}.log", env, args)
        started.append(server)
        return server

    yield make
    for server in started:
        stop(server.proc)


def mock_policy(mock_base: str, **extra_models: str) -> str:
    """A policy routing a few mock models (names carry the mock's knobs) to the mock upstream."""
    models = {
        "mock": "mock",
        "mock-nousage": "mock-nousage",
        "mock-500": "mock-status500",
        "mock-429": "mock-status429",
        "mock-400": "mock-status400",
        "mock-cut": "mock-cut5",
        "mock-cached": "mock-cached40-reasoning7",
        "mock-embed": "mock-embed",
    }
    lines = ["models:"]
    for name, upstream in models.items():
        lines += [f"  {name}:", "    deployments:", "      - provider: openai", f"        model: {upstream}",
                  f"        api_base: {mock_base}/v1",
                  "        price: {input_per_mtok: 1.0, output_per_mtok: 2.0, cache_read_per_mtok: 0.5}"]
        if name == "mock-embed":
            lines.append("        capabilities: [embeddings]")
    lines += [
        "  mock-slow:", "    deployments:", "      - provider: openai", "        model: mock-lat3000",
        f"        api_base: {mock_base}/v1", "        timeout_s: 0.5",
        "        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}",
        "  mock-fallback:", "    deployments:",
        "      - provider: openai", "        name: broken", "        model: mock-status500",
        f"        api_base: {mock_base}/v1", "        weight: 1",
        "        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}",
        "      - provider: openai", "        name: healthy", "        model: mock",
        f"        api_base: {mock_base}/v1", "        weight: 0",
        "        price: {input_per_mtok: 3.0, output_per_mtok: 4.0}",
        "  demo:", "    deployments:", "      - provider: simulated", "        model: demo-sim-1",
        "        price: {input_per_mtok: 0.15, output_per_mtok: 0.60}",
        "        simulated: {output_tokens: 12}",
    ]
    for block in extra_models.values():
        lines.append(textwrap.indent(textwrap.dedent(block).strip("\n"), "  "))
    return "\n".join(lines) + "\n"
