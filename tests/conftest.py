"""Shared fixtures: real processes on loopback (mock upstream, gateway), started and stopped by PID, and the
``e2e`` marker's rule: a test that starts a process (a gateway, the mock upstream, redis-server, Prometheus,
promtool, a ``gateway`` command) is marked ``e2e``, either in its module or by using a fixture that starts one
(:data:`PROCESS_FIXTURES`, marked here at collection). A test without the marker that starts a process fails
and says so, so ``pytest -m "not e2e"`` stays in-process and fast.
"""

from __future__ import annotations

import gc
import multiprocessing.util
import os
import platform
import subprocess
import textwrap
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness  # bench/harness.py: processes, ports, readiness, the mock upstream
import httpx
import pytest
from harness import free_port

ROOT = harness.ROOT
pytest_plugins = ["redis_fixtures"]  # private redis-server fixtures
__all__ = ["ROOT", "free_port", "stop", "Server", "start_gateway", "mock_policy", "GatewayFactory"]

# fixtures that start a process (directly or through the ones they use): a test using one is end to end
PROCESS_FIXTURES = frozenset({"mock_upstream", "mock_reset", "gateway", "redis_port", "redis_cluster_ports",
                               "killable_cluster"})


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") is None and PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported so far (litellm, the SDKs, the test modules: a few million objects) lives to the end:
    out of the collector's sight, so a full collection during a test does not walk it again (seconds each)."""
    gc.collect()
    gc.freeze()


platform.processor()   # runs `uname -p` once and caches it: SDKs ask for it in their request headers


@contextmanager
def _no_processes(item: pytest.Item) -> Generator[None]:
    """Within a test not marked e2e (its fixtures included), starting a process fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(f"{item.nodeid} starts a process but is not marked e2e: mark it with @pytest.mark.e2e "
                    f"(or pytestmark in its module), or add its fixture to PROCESS_FIXTURES in tests/conftest.py",
                    pytrace=True)

    saved = (subprocess.Popen._execute_child, os.fork, multiprocessing.util.spawnv_passfds)  # type: ignore[attr-defined]
    subprocess.Popen._execute_child = refuse  # type: ignore[attr-defined,method-assign]
    os.fork = refuse
    multiprocessing.util.spawnv_passfds = refuse
    try:
        yield
    finally:
        subprocess.Popen._execute_child, os.fork, multiprocessing.util.spawnv_passfds = saved  # type: ignore[attr-defined]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    with _no_processes(item):
        return (yield)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a process a test started (SIGKILL after ``grace`` seconds), by PID."""
    harness.stop_process(proc, grace=grace)


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
    proc = harness.start_mock_upstream(port, tmp_path_factory.mktemp("mock") / "mock.log")
    try:
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
    full_env = harness.gateway_env(env)
    full_env.setdefault("GATEWAY_DATA_DIR", ":memory:")   # unless the test gives a data directory
    proc = harness.start_gateway(policy_dir, port, log, full_env, args)
    return Server(proc, port, log)


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
