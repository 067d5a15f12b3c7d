"""Budget notifications: exactly one signed POST per webhook, budget, period and threshold, also when
several workers (here: several notifiers, then 4 gateway workers on Redis) see the same crossing; a
receiver that fails or is down at first gets the POST later; the policy section is validated."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from notify_receiver import Receiver
from redis.asyncio import Redis
from redis_fixtures import free_port

from gateway.budgets.notify import Notifier, reached
from gateway.metrics import Metrics
from gateway.policy import PolicyError, load_policies
from gateway.policy.notify import NotifySpec, Webhook
from gateway.state.budgets import BudgetRule, ReserveRequest
from gateway.state.budgets_memory import MemoryBudgetStore
from gateway.state.budgets_redis import RedisBudgetStore
from gateway.state.notify_store import MemoryNotifyStore, RedisNotifyStore

USD = 1_000_000_000
SECRET = "s3cret-for-tests"


def signed(body: bytes, headers: dict[str, str]) -> bool:
    want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("x-gateway-signature", ""), want)


async def wait_for(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_thresholds_are_exact_integers() -> None:
    assert reached(50 * USD // 100, USD, 0.5) and not reached(50 * USD // 100 - 1, USD, 0.5)
    assert reached(USD, USD, 1.0) and not reached(USD - 1, USD, 1.0) and not reached(5, 0, 0.5)


async def test_several_notifiers_send_one_post_per_threshold_and_retry_failures(redis_port: int) -> None:
    receiver = Receiver(fail_first=2)                       # the first two attempts get a 500
    client = Redis(host="127.0.0.1", port=redis_port)
    team = f"t{uuid.uuid4().hex[:8]}"
    spec = NotifySpec((Webhook("finance", receiver.url, (0.5, 0.8, 1.0), (("team", team),), SECRET),))
    budgets = RedisBudgetStore(client)
    store = RedisNotifyStore(client)
    await client.delete(store.outbox)
    metrics = Metrics()
    notifiers = [Notifier(lambda: spec, budgets, store, metrics, max_backoff_s=0.2) for _ in range(4)]
    rule = BudgetRule("team", team, "monthly", USD)
    try:
        for step in range(10):                              # $0.10 at a time, every notifier sees every settle
            r = ReserveRequest(uuid.uuid4().hex, team, USD // 10, 10, (rule,), (), datetime.now(UTC))
            assert (await budgets.reserve(r)).admitted
            await budgets.settle(r, USD // 10, 10)
            for n in notifiers:
                n.touched(r)
            claimed = sum(await asyncio.gather(*(n.check() for n in notifiers)))
            assert claimed == {4: 1, 7: 1, 9: 1}.get(step, 0), step   # 50%, 80%, 100%: one winner each
        for _ in range(40):
            await asyncio.gather(*(n.deliver() for n in notifiers))
            if len(receiver.posts) == 3:
                break
            await asyncio.sleep(0.1)
        docs = [orjson.loads(body) for body, _ in receiver.posts]
        assert sorted(d["threshold"] for d in docs) == [0.5, 0.8, 1.0]
        assert all(signed(body, headers) for body, headers in receiver.posts)
        assert all(d["scope"] == "team" and d["owner"] == team and "reached" in d["text"] for d in docs)
        assert receiver.attempts == 5                       # two failures retried, then three deliveries
        assert await store.take(0.1, 10) == []              # nothing left in the outbox
        text = metrics.registry.get_sample_value("gateway_budget_notifications_total",
                                                 {"scope": "team", "result": "delivered"})
        assert text == 3
    finally:
        receiver.close()
        await client.aclose()


async def test_a_receiver_down_at_first_gets_the_post_later() -> None:
    port = free_port()
    spec = NotifySpec((Webhook("ops", f"http://127.0.0.1:{port}/hook", (0.5,), (("user", None),), SECRET),))
    budgets, store = MemoryBudgetStore(), MemoryNotifyStore()
    notifier = Notifier(lambda: spec, budgets, store, Metrics(), max_backoff_s=0.2, timeout_s=1)
    rule = BudgetRule("user", "ann", "daily", USD)
    r = ReserveRequest("r1", "t", USD, 10, (rule,), (), datetime.now(UTC))
    assert (await budgets.reserve(r)).admitted
    await budgets.settle(r, USD // 2, 10)
    notifier.touched(r)
    assert await notifier.check() == 1
    assert await notifier.deliver() == 0                    # nobody listens yet
    receiver = Receiver(port=port)
    try:
        for _ in range(40):
            if await notifier.deliver():
                break
            await asyncio.sleep(0.1)
        [(body, headers)] = receiver.posts
        assert signed(body, headers) and orjson.loads(body)["owner"] == "ann"
        assert headers["x-gateway-delivery-attempt"] != "1"
    finally:
        receiver.close()
        await notifier.aclose()


def test_notify_policy_is_validated(tmp_path: Path) -> None:
    models = "models:\n  demo: {deployments: [{provider: simulated, name: d, model: demo}]}\n"
    (tmp_path / "p.yaml").write_text(models + """notify:
  webhooks:
    - {name: fin, url: "https://hooks.example.com/x", thresholds: [1.0, 0.5], budgets: [team, "user:vip"],
       secret_env: HOOK_SECRET}
""")
    spec = load_policies(str(tmp_path), env={"HOOK_SECRET": "abc"}).notify
    [hook] = spec.webhooks
    assert hook.thresholds == (0.5, 1.0) and hook.secret == "abc" and "abc" not in repr(hook)
    assert hook.watches_budget("user", "vip") and not hook.watches_budget("user", "bob")
    with pytest.raises(PolicyError, match="HOOK_SECRET is not set"):
        load_policies(str(tmp_path), env={})
    for bad, where in (("url: ftp://x", "url"), ("url: http://x, thresholds: [0]", "thresholds"),
                       ("url: http://x, budgets: [galaxy]", "budgets"), ("url: http://x, colour: red", "colour")):
        (tmp_path / "p.yaml").write_text(models + f"notify:\n  webhooks:\n    - {{{bad}}}\n")
        with pytest.raises(PolicyError, match=f"notify.webhooks\\[0\\].{where}"):
            load_policies(str(tmp_path), env={})


async def test_four_workers_push_a_team_past_every_threshold_and_a_restart_loses_nothing(
        gateway, mock_reset: str, redis_port: int) -> None:  # type: ignore[no-untyped-def]
    from test_budgets_e2e import ask, client_for, new_key, policy

    from conftest import stop

    team, port = f"t{uuid.uuid4().hex[:8]}", free_port()
    text = policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1}}]}}") + f"""
notify:
  webhooks:
    - {{name: finance, url: "http://127.0.0.1:{port}/hook", thresholds: [0.5, 0.8, 1.0], budgets: ["team:{team}"],
       secret_env: TEST_HOOK_SECRET}}
"""
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "TEST_HOOK_SECRET": SECRET}
    first = gateway(text, env=env, args=("--workers", "4"))       # the receiver is down all along
    _, secret = await new_key(redis_port, team)
    client = client_for(first, secret)
    results = await asyncio.gather(*(ask(client) for _ in range(30)))
    assert sum(r[0] == "ok" for r in results) == 20                # the whole $1 spent
    await client.close()
    rc = Redis(host="127.0.0.1", port=redis_port)
    store = RedisNotifyStore(rc)

    async def pending() -> list[dict]:  # type: ignore[type-arg]
        raw = await rc.hgetall(store.payloads)
        return [d for d in (orjson.loads(v) for v in raw.values()) if d["owner"] == team]

    deadline = time.monotonic() + 15
    while len(await pending()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop(first.proc)                                               # the gateway stops before any delivery
    assert sorted(d["threshold"] for d in await pending()) == [0.5, 0.8, 1.0]
    receiver = Receiver(port=port)
    try:
        gateway(text, env=env)                                     # back up: it delivers what was persisted
        await wait_for(lambda: len(receiver.posts) >= 3, timeout=30)
        await asyncio.sleep(1.0)                                   # and nothing more comes
        docs = [orjson.loads(body) for body, _ in receiver.posts]
        assert sorted(d["threshold"] for d in docs) == [0.5, 0.8, 1.0]
        assert all(signed(body, headers) for body, headers in receiver.posts)
        assert {d["owner"] for d in docs} == {team} and all(d["text"].startswith("Budget alert") for d in docs)
        assert await pending() == []
    finally:
        receiver.close()
        await rc.aclose()
