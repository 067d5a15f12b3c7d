"""Budget-store fixtures: private redis-servers (one standalone, one 3-master cluster per session) and
a harness ``h`` that runs a test against the memory store (fake clock) and the Redis store (real time).

Every server is a fresh ``redis-server`` child with no persistence, bound to 127.0.0.1 on a
free port chosen here (never 6379), in its own temporary directory, and is stopped by PID.
Tests isolate themselves with unique team names; only these private servers are ever
flushed. Also holds the multiprocessing worker of the cross-process budget test (it must
live in an importable module for the ``spawn`` start method).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness  # bench/harness.py
import pytest
import redis
from harness import free_port
from redis.asyncio import Redis

from gateway.state.budgets import BudgetStore
from gateway.state.budgets_memory import MemoryBudgetStore
from gateway.state.budgets_redis import RedisBudgetStore, team_tag
from gateway.state.budgets_sqlite import SqliteBudgetStore
from gateway.state.resp import FastRedis
from gateway.state.sqlite_db import connect


class RedisProc:
    """A private redis-server (bench/harness.py starts it and waits for PING), stopped by PID."""

    def __init__(self, port: int, workdir: Path, *extra: str) -> None:
        self.port = port
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "redis.log"
        self.proc = harness.start(harness.redis_command(port, workdir, "--logfile", str(self.log), *extra))
        why = harness.wait_redis(port, self.proc, timeout=20.0)
        if why is not None:
            self.stop()
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{why}:\n{log}")

    def stop(self) -> None:
        harness.stop_process(self.proc, f"redis-server on {self.port}")


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a private standalone redis-server for this test session (flushed at start)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    server = RedisProc(port, tmp_path_factory.mktemp("redis"))
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        client.flushall()  # our own private server
        client.close()
        yield port
    finally:
        server.stop()


def _cluster_ok(port: int) -> bool:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
                         capture_output=True, text=True, timeout=10)
    return "cluster_state:ok" in out.stdout


def start_cluster(base: Path, *extra: str) -> list[RedisProc]:
    """A 3-master Redis Cluster (no replicas) of private redis-servers under ``base``; ``extra``: more
    redis-server options for every node. The caller stops the nodes (also when this raises: see ``out``)."""
    nodes: list[RedisProc] = []
    try:
        for _ in range(3):
            port = free_port(with_bus=True)
            nodes.append(RedisProc(port, base / str(port), "--cluster-enabled", "yes",
                                   "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
                                   *extra))
        ports = [n.port for n in nodes]
        create = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                                 "--cluster-replicas", "0", "--cluster-yes"],
                                capture_output=True, text=True, timeout=60)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok within 30s")
            time.sleep(0.2)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _need_cluster_tools() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on PATH: cannot create a Redis Cluster")


@pytest.fixture(scope="session")
def redis_cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Ports of a private 3-master Redis Cluster (no replicas) for this test session."""
    _need_cluster_tools()
    nodes = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield [n.port for n in nodes]
    finally:
        for node in nodes:
            node.stop()


class KillableCluster:
    """A 3-master cluster of a test's own, whose masters may be stopped and started again: each keeps its
    data in an AOF (fsynced on every write) and its slots in its nodes file, and the others keep serving
    their own slots while one is down (``cluster-require-full-coverage no``)."""

    OPTIONS = ("--appendonly", "yes", "--appendfsync", "always", "--cluster-require-full-coverage", "no")

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes = start_cluster(base, *self.OPTIONS)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def kill(self, port: int) -> None:
        """SIGKILL the master on ``port`` (a crash: no shutdown save), by PID."""
        proc = next(n for n in self.nodes if n.port == port).proc
        proc.kill()
        proc.wait(10)

    def restart(self, port: int) -> None:
        i = next(i for i, n in enumerate(self.nodes) if n.port == port)
        self.nodes[i] = RedisProc(port, self.base / str(port), "--cluster-enabled", "yes",
                                  "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
                                  *self.OPTIONS)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def killable_cluster(tmp_path: Path) -> Iterator[KillableCluster]:
    """A private 3-master Redis Cluster for one test, which may stop and restart its masters."""
    _need_cluster_tools()
    cluster = KillableCluster(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


def server_time(port: int) -> float:
    """The private server's clock (unix seconds), which the budget script uses for rate windows."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        sec, usec = client.time()
        return sec + usec / 1e6
    finally:
        client.close()


def budget_worker(port: int, team: str, n: int, worker: int, barrier: Any, out: Any) -> None:
    """One OS process of the cross-process test: ``n`` concurrent $0.05 reserve/settle rounds."""
    out.put(asyncio.run(_budget_worker(port, team, n, worker, barrier)))


async def _budget_worker(port: int, team: str, n: int, worker: int, barrier: Any) -> int:
    from gateway.state.budgets import BudgetRule, ReserveRequest

    store = RedisBudgetStore(Redis(host="127.0.0.1", port=port, max_connections=n + 4))
    rule = BudgetRule("team", team, "daily", 1_000_000_000)
    now = datetime.now(UTC)
    reqs = [ReserveRequest(f"p{worker}-{i}", team, 50_000_000, 100, (rule,), (), now) for i in range(n)]
    try:
        assert await store.ping()
        barrier.wait(60)  # every process connected: start all requests at once

        async def one(req: ReserveRequest) -> int:
            admission = await store.reserve(req)
            if admission.admitted:
                await store.settle(req, 50_000_000, 100)
            return int(admission.admitted)

        return sum(await asyncio.gather(*(one(r) for r in reqs)))
    finally:
        await store.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_800_000_030.0  # 30 s into a minute

    def __call__(self) -> float:
        return self.t


class Harness:
    """Makes stores of one kind and moves their clock: a fake clock (memory) or real time (Redis)."""

    def __init__(self, kind: str, port: int | None, data_dir: Path | None = None) -> None:
        self.kind, self.port, self.clock = kind, port, FakeClock()
        self.data_dir = data_dir
        self.stores: list[BudgetStore] = []

    @property
    def faked(self) -> bool:
        """The stores run on the fake clock (memory, SQLite), not on the server's real one."""
        return self.kind in ("memory", "sqlite")

    def make(self, ttl_s: float = 600, partial: bool = True) -> BudgetStore:
        store: BudgetStore
        if self.kind == "memory":
            store = MemoryBudgetStore(ttl_s, clock=self.clock, partial_reservations=partial)
        elif self.kind == "sqlite":
            assert self.data_dir is not None
            store = SqliteBudgetStore(connect(self.data_dir), ttl_s, clock=self.clock, partial_reservations=partial)
        else:
            assert self.port is not None
            client = FastRedis("127.0.0.1", self.port) if self.kind == "redis-fast" else \
                Redis(host="127.0.0.1", port=self.port)
            store = RedisBudgetStore(client, ttl_s, partial_reservations=partial)
        self.stores.append(store)
        return store

    async def fresh_window(self) -> None:
        """Make sure the next few seconds stay inside one rate window (minute)."""
        if self.faked:
            self.clock.t = (self.clock.t // 60 + 1) * 60 + 5
            return
        assert self.port is not None
        for _ in range(80):  # at most ~8 s
            if server_time(self.port) % 60 < 50:
                return
            await asyncio.sleep(0.1)

    async def wait_past(self, seconds: float) -> None:
        if self.faked:
            self.clock.t += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.e2e),
                        pytest.param("redis-fast", marks=pytest.mark.e2e)])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """Budget stores in memory, in SQLite (one database per test), on Redis through redis-py, and on Redis
    through the pipelining client."""
    port = request.getfixturevalue("redis_port") if request.param not in ("memory", "sqlite") else None
    harness = Harness(request.param, port, tmp_path / "state")
    yield harness
    for store in harness.stores:
        await store.aclose()


def teams_on_masters(cluster: Any, n: int, avoid: str | None = None, prefix: str = "ct") -> list[str]:
    """``n`` fresh team names whose keys live on different masters of ``cluster`` (and, with ``avoid``, not on
    the master holding the key ``avoid + ":x"``)."""
    import uuid

    taken = {cluster.get_node_from_key(avoid + ":x").name} if avoid is not None else set()
    out: list[str] = []
    for i in range(1000):
        name = f"{prefix}-{uuid.uuid4().hex[:6]}-{i}"
        node = cluster.get_node_from_key(team_tag(name) + ":x").name
        if node not in taken:
            out.append(name)
            taken.add(node)
        if len(out) == n:
            return out
    raise AssertionError("not enough masters")
