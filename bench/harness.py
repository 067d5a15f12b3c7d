"""Processes on loopback for the tests and the benchmarks: free ports, waiting for a URL or a redis-server to
answer, stopping a process (and what it left running) by PID, and starting the mock upstream, a gateway or a
private redis-server. Standard library only, so every benchmark script can import it; ``tests/`` finds it through
pytest's ``pythonpath = ["bench"]``. Only processes started here (and their descendants) are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MOCK_UPSTREAM = BENCH / "mock_upstream.py"
RESERVED_PORTS = frozenset({6379, 16379})   # a developer's own Redis (and its cluster bus): never ours


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (32768 unless configured)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(with_bus: bool = False) -> int:
    """A free loopback port, never 6379, below the kernel's ephemeral range when it can be (so no outgoing
    connection takes it while a server restarts on it). ``with_bus``: also ``port + 10000`` free (a Redis
    Cluster node's bus)."""
    high = _ephemeral_low() if _ephemeral_low() > 21_000 else 45_000
    for _ in range(500):
        port = random.randrange(20_000, high)
        if port in RESERVED_PORTS or not _port_free(port):
            continue
        if with_bus and not _port_free(port + 10_000):
            continue
        return port
    raise RuntimeError("no free loopback port found")


def port_in_use(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; an HTTP error status is returned, a connection error raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """None once ``url`` answers 200, else why not: ``proc`` exited, or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"process exited with status {proc.returncode} before {url} answered"
        try:
            status, body = http_get(url, 1.0)
            if status == 200:
                return None
            last = f"HTTP {status}: {body[:200]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.05)
    return f"{url} not ready after {timeout:.0f}s (last: {last})"


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """:func:`wait_ready` raising :class:`RuntimeError` instead of returning the reason."""
    why = wait_ready(url, proc, timeout)
    if why is not None:
        raise RuntimeError(why)


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stop_process(proc: subprocess.Popen[bytes], name: str = "", grace: float = 10.0,
                 log: Callable[[str], None] = _stderr) -> None:
    """SIGTERM the process we started, by PID; SIGKILL after ``grace`` seconds; then SIGTERM the descendants it
    had when asked to stop and left running. A process that already exited is only reaped."""
    if proc.poll() is not None:
        return
    kids = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"{name or proc.args} (pid {proc.pid}) ignored SIGTERM for {grace:g} s, sending SIGKILL")
        proc.kill()
        proc.wait(10)
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in kids:   # a leftover that ignores SIGTERM (a worker mid-shutdown) is killed, never left behind
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            log(f"pid {pid} (left by {name or proc.args}) ignored SIGTERM, sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie of another parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def start(args: Sequence[str], log_path: Path | None = None, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, cpu: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``args`` (pinned to ``cpu`` with taskset when given), output to ``log_path`` or discarded."""
    cmd = [*(["taskset", "-c", cpu] if cpu is not None else []), *args]
    if log_path is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                                cwd=None if cwd is None else str(cwd))
    with open(log_path, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=None if cwd is None else str(cwd))


def _read(path: Path | None) -> str:
    return path.read_text(errors="replace") if path is not None and path.exists() else ""


def start_mock_upstream(port: int, log_path: Path | None = None, cpu: str | None = None,
                        timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """bench/mock_upstream.py on 127.0.0.1:``port``, once its ``/health`` answers; RuntimeError if it does not."""
    proc = start([sys.executable, str(MOCK_UPSTREAM), "--port", str(port)], log_path, cpu=cpu)
    why = wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout)
    if why is not None:
        stop_process(proc, "mock upstream")
        raise RuntimeError(f"mock upstream did not start: {why}\n{_read(log_path)[-3000:]}")
    return proc


def gateway_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``GATEWAY_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra or {})
    return env


def start_gateway(config: Path | str, port: int, log_path: Path, env: Mapping[str, str] | None = None,
                  args: Sequence[str] = (), timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """``python -m gateway serve`` from the repository root with ``env`` (see :func:`gateway_env`), once its
    ``/health/ready`` answers; RuntimeError with its log if it does not."""
    proc = start([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port), *args],
                 log_path, env=env if env is not None else gateway_env(), cwd=ROOT)
    why = wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, timeout)
    if why is not None:
        stop_process(proc, "gateway")
        raise RuntimeError(f"{why}\n{_read(log_path)}")
    return proc


def redis_command(port: int, workdir: Path | str, *extra: str) -> list[str]:
    """redis-server on 127.0.0.1:``port`` with no persistence (``extra`` may turn the AOF on), files in ``workdir``."""
    return ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(workdir), *extra]


def redis_pong(port: int, timeout: float = 1.0) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING (not while it is still loading its data)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_redis(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str | None:
    """None once the redis-server ``proc`` answers PING on ``port``, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"redis-server on {port} exited with {proc.returncode}"
        if redis_pong(port):
            return None
        time.sleep(0.05)
    return f"redis-server on {port} did not answer within {timeout:g}s"


def start_redis(port: int, workdir: Path | str, *extra: str, cpu: str | None = None,
                timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """A private redis-server (see :func:`redis_command`), once it answers PING; RuntimeError if it does not."""
    proc = start(redis_command(port, workdir, *extra), cpu=cpu)
    why = wait_redis(port, proc, timeout)
    if why is not None:
        stop_process(proc, "redis-server")
        raise RuntimeError(why)
    return proc
