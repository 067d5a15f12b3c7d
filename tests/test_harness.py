"""bench/harness.py, the process harness of the tests and benchmarks: ports, readiness, stopping by PID."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from harness import (
    RESERVED_PORTS,
    _port_free,
    descendants,
    free_port,
    http_get,
    port_in_use,
    redis_pong,
    start,
    start_mock_upstream,
    start_redis,
    stop_process,
    wait_ready,
)

pytestmark = pytest.mark.e2e   # starts small processes, the mock upstream and a redis-server


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2:].split()[0] == b"Z"


def test_free_ports_are_free_and_never_a_developers_redis() -> None:
    for _ in range(50):
        port = free_port(with_bus=True)
        assert port not in RESERVED_PORTS and port + 10_000 not in RESERVED_PORTS
        assert _port_free(port) and _port_free(port + 10_000)


def test_wait_ready_says_why_when_the_process_exits_first() -> None:
    proc = start([sys.executable, "-c", "import sys; sys.exit(3)"])
    url = f"http://127.0.0.1:{free_port()}/health"
    assert wait_ready(url, proc, 60) == f"process exited with status 3 before {url} answered"


def test_stop_process_ends_the_process_and_the_children_it_leaves_behind() -> None:
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "time.sleep(600)\n")
    proc = start([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not (kids := descendants(proc.pid)):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    stop_process(proc, "parent")
    assert proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in kids):   # the orphan got SIGTERM from stop_process, by its PID
        assert time.monotonic() < deadline, f"left running: {kids}"
        time.sleep(0.05)


def test_the_mock_upstream_starts_answers_and_stops(tmp_path: Path) -> None:
    port = free_port()
    proc = start_mock_upstream(port, tmp_path / "mock.log")
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        assert status == 200, body
    finally:
        stop_process(proc, "mock")
    assert proc.returncode == 0 and not port_in_use(port)   # stopped cleanly: nothing listens there any more


def test_a_private_redis_server_starts_and_stops(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        assert redis_pong(port)
    finally:
        stop_process(proc, "redis-server")
    assert proc.returncode is not None and not redis_pong(port)
