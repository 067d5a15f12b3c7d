"""A worker killed mid-load on Redis Cluster: ``gateway serve --workers 2`` on the private 3-master cluster, 288 slow
streams (24 clients), one worker SIGKILLed (by PID) while it has requests in flight. Its lease (2 s) runs out, the
other worker sweeps it: every answered request has exactly one ledger record, every request in flight on the dead
worker one ``interrupted`` record charged exactly its hold, the team's spend equals the ledger's sum to the
nano-dollar and nothing stays reserved, although the reservation TTL is 900 s. Every wait is on a condition with a
generous deadline.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import RedisCluster
from test_fault_matrix_e2e import (
    KillRun,
    check_every_answer_recorded,
    check_interrupted_charged_their_hold,
    check_nothing_doubled_and_holds_ended,
    kill_mid_stream,
    load_policy,
    worker_pids,
)

from gateway.state.budgets_redis import open_key, team_tag
from gateway.state.keys import RedisKeyStore

pytestmark = pytest.mark.e2e

LEASE_S = 2          # the workers' lease: a dead worker's holds end within a few seconds (the TTL stays 900 s)


def cluster_client(ports: list[int]) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=ports[0])


@pytest.fixture(scope="module")
def cluster_kill_run(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str,
                     redis_cluster_ports: list[int]) -> KillRun:
    from conftest import start_gateway, stop
    team = f"wc-{uuid.uuid4().hex[:8]}"
    policy_dir = tmp_path_factory.mktemp("cluster-killed")
    (policy_dir / "models.yaml").write_text(load_policy(mock_upstream, team))
    server = start_gateway(policy_dir, policy_dir / "gateway.log",
                           env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_cluster_ports[0]}/0",
                                "GATEWAY_REDIS_CLUSTER": "1", "GATEWAY_WORKER_LEASE_S": str(LEASE_S),
                                "GATEWAY_RESERVATION_TTL_S": "900"},
                           args=("--workers", "2"))
    try:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2, workers
        return asyncio.run(_kill_run(server.url, workers, team, redis_cluster_ports))
    finally:
        stop(server.proc)


async def _kill_run(url: str, workers: list[int], team: str, ports: list[int]) -> KillRun:
    rc = cluster_client(ports)
    try:
        await rc.initialize()
        _, key = await RedisKeyStore(rc).create(team, "leases")
        return await kill_mid_stream(rc, url, key, team, workers, open_key(team_tag(team)), 90)
    finally:
        await rc.aclose()


def test_cluster_worker_killed_its_holds_end_within_seconds_and_nothing_is_doubled(cluster_kill_run: KillRun) -> None:
    check_nothing_doubled_and_holds_ended(cluster_kill_run, 90)


def test_cluster_worker_killed_every_answer_has_its_record(cluster_kill_run: KillRun) -> None:
    check_every_answer_recorded(cluster_kill_run)


def test_cluster_worker_killed_its_requests_in_flight_are_recorded_as_interrupted(cluster_kill_run: KillRun) -> None:
    check_interrupted_charged_their_hold(cluster_kill_run)
