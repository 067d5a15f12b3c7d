"""One dead Redis Cluster master stalls only the ledger writes of the slots it holds (issue 11, item 11).

On a 3-master cluster of the test's own: one master is SIGKILLed while batches of three teams are
written; the parts of the batches in the healthy masters' slots (the stream, the healthy teams' rollups,
the day's indexes) keep being written, the dead master's wait; once it is back every record is in the
ledger exactly once and every total is exact to the nano-dollar.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis_fixtures import KillableCluster
from test_keys_ledger import expected_totals

from conftest import GatewayFactory
from gateway.state.budgets_redis import team_tag
from gateway.state.keys import RedisKeyStore, hash_secret
from gateway.state.ledger import (
    DAY_S,
    NONE,
    STREAM,
    BufferedLedger,
    LedgerRecord,
    RedisLedger,
    roll_key,
    rollm_key,
)

pytestmark = pytest.mark.e2e
DAY0 = 1_700_006_400.0 - 300 * DAY_S   # a UTC midnight; the test searches days from here


def client(port: int) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=port, socket_timeout=2.0, socket_connect_timeout=0.5,
                        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1))


def owner(slots: list[tuple[int, int, int]], key: str) -> int:
    """The port of the master serving ``key``."""
    slot = key_slot(key.encode())
    return next(port for low, high, port in slots if low <= slot <= high)


async def test_a_dead_master_stalls_only_its_slots(killable_cluster: KillableCluster) -> None:
    ports = killable_cluster.ports
    probe = client(ports[0])
    raw = await probe.cluster_slots()
    await probe.aclose()
    slots = [(low, high, int(info["primary"][1])) for (low, high), info in raw.items()]
    model = f"m-{uuid.uuid4().hex[:6]}"
    # a day and a master to kill such that the stream and the day's indexes and model rollup live elsewhere
    for k in range(400):
        start = DAY0 + k * DAY_S
        day = time.strftime("%Y%m%d", time.gmtime(start))
        shared = {owner(slots, key) for key in (STREAM, f"gw:v1:rollidx:teams:{day}",
                                                f"gw:v1:rollidx:models:{day}", rollm_key(model, day))}
        free = [p for p in ports if p not in shared]
        if free:
            dead = free[0]
            break
    else:
        raise AssertionError("no day whose shared keys avoid a master")
    teams: dict[str, str] = {}   # role -> team name: two in different slots of the dead master, two elsewhere
    for i in range(2_000):
        name = f"team-{uuid.uuid4().hex[:6]}-{i}"
        if owner(slots, roll_key(name, day)) == dead:
            taken = {key_slot(roll_key(t, day).encode()) for r, t in teams.items() if r.startswith("dead")}
            if key_slot(roll_key(name, day).encode()) not in taken:
                teams.setdefault("dead" if "dead" not in teams else "dead-2", name)
        else:
            teams.setdefault("healthy-a" if "healthy-a" not in teams else "healthy-b", name)
        if len(teams) == 4:
            break
    # every batch: a healthy team, one of the dead master's two teams (alternating), the other healthy team
    batches = [[LedgerRecord(request_id=f"r{3 * b + j}", ts=start + 60 * (3 * b + j), team=team, key_id=None,
                             requested_model=model, model=model, deployment="d", provider="p", route="default",
                             input_tokens=100 + j, output_tokens=7 * b, cost_nano=1_000_000_007 * (b + 1) + j,
                             baseline_nano=2_000_000_011 * (b + 1))
                for j, team in enumerate([teams["healthy-a"], teams["dead" if b % 2 else "dead-2"],
                                          teams["healthy-b"]])]
               for b in range(6)]
    everything = [r for batch in batches for r in batch]

    redis = client(next(p for p in ports if p != dead))
    ledger = RedisLedger(redis)
    buf = BufferedLedger(ledger)
    try:
        await buf.append(batches[0])
        assert buf.pending == 0
        killable_cluster.kill(dead)
        for batch in batches[1:]:
            await buf.append(batch)
            await buf.flush()
        assert buf.pending == 15                                  # every later batch waits for its dead part
        sent = 0
        pipeline = redis.pipeline

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal sent
            sent += 1
            return pipeline(*args, **kwargs)

        redis.pipeline = counting   # type: ignore[method-assign]
        await buf.flush()
        redis.pipeline = pipeline   # type: ignore[method-assign]
        assert sent == 1 and buf.pending == 15   # one failed try at the dead master per pass, whatever its slots
        # the healthy teams' records are all in, to the nano-dollar; the dead master's team's rollup waits
        got = await ledger.read(start, start + DAY_S)
        assert sorted(r.request_id for r in got) == sorted(r.request_id for r in everything)
        for role in ("healthy-a", "healthy-b"):
            team = teams[role]
            [row] = await ledger.totals(start, start + DAY_S, team=team, source="rollup")
            mine = [r for r in everything if r.team == team]
            assert (row["requests"], row["cost_nano"]) == (6, sum(r.cost_nano for r in mine))

        killable_cluster.restart(dead)
        for _ in range(300):                                      # bounded: until the master serves again
            await buf.flush()
            if buf.pending == 0:
                break
            await asyncio.sleep(0.1)
        assert buf.pending == 0 and buf.dropped == 0 and buf.rejected == 0
        got = await ledger.read(start, start + DAY_S)
        assert sorted(r.request_id for r in got) == sorted(r.request_id for r in everything)
        assert len(got) == len({r.request_id for r in got}) == 18  # exactly once
        for by in ("team", "model", "day"):
            want = expected_totals(everything, by)
            assert await ledger.totals(start, start + DAY_S, by=by, source="rollup") == want
            assert await ledger.totals(start, start + DAY_S, by=by, source="stream") == want
    finally:
        await redis.aclose()


async def test_a_dead_master_refuses_its_keys_with_a_ledger_record_and_spares_the_rest(
        gateway: GatewayFactory, mock_reset: str, killable_cluster: KillableCluster) -> None:
    """A gateway on the cluster, one master SIGKILLed: a key whose record lives there gets 503
    ``state_unavailable`` and leaves a $0 ledger record (team ``(none)``: its key could not be read, issue 11
    item 12); a key of the same team on a healthy master is served and charged; both records reach the
    stream (on a healthy master) although parts of their batches wait for the dead one."""
    from test_budgets_e2e import CENTS_5, USD, ask, budget_used, client_for, policy

    ports = killable_cluster.ports
    probe = client(ports[0])
    raw = await probe.cluster_slots()
    await probe.aclose()
    slots = [(low, high, int(info["primary"][1])) for (low, high), info in raw.items()]
    dead = next(p for p in ports if p != owner(slots, STREAM))
    healthy = next(p for p in ports if p != dead)
    team = next(t for t in (f"t{uuid.uuid4().hex[:8]}" for _ in range(500))
                if owner(slots, team_tag(t) + ":x") != dead)
    rc = client(healthy)
    try:
        keys = RedisKeyStore(rc)
        secrets: dict[bool, str] = {}   # whether the key's record is on the dead master -> its secret
        for _ in range(200):
            _, secret = await keys.create(team, "test")
            secrets.setdefault(owner(slots, f"gw:v1:key:{hash_secret(secret)}") == dead, secret)
            if len(secrets) == 2:
                break
        server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1}}]}}"),
                         env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{healthy}/0", "GATEWAY_REDIS_CLUSTER": "1"},
                         args=("--workers", "1"))
        since = time.time() - 1
        killable_cluster.kill(dead)
        served, refused = client_for(server, secrets[False]), client_for(server, secrets[True])
        assert (await ask(served))[0] == "ok"
        status = await ask(refused)
        assert status[0] == "error" and status[1][:2] == (503, "state_unavailable")
        ledger = RedisLedger(rc)
        for _ in range(150):                       # bounded: until the writer's batches reach the stream
            records = await ledger.read(since)
            if len(records) >= 2:
                break
            await asyncio.sleep(0.1)
        assert sorted((r.team, r.key_id is None, r.status, r.cost_nano) for r in records) == sorted(
            [(team, False, "ok", CENTS_5), (NONE, True, "state_unavailable", 0)])
        assert await budget_used(rc, team, "team", team, USD) == (CENTS_5, 0)
        await served.close()
        await refused.close()
    finally:
        await rc.aclose()
