"""Process settings, read once from ``GATEWAY_*`` environment variables.

Everything an operator sets per process (not per policy) lives here: where the
policies are, where to listen, Redis, the master key, limits and timeouts (and
prometheus-client's own ``PROMETHEUS_MULTIPROC_DIR``, which ``gateway serve``
prepares for its workers), and where embedded state lives on disk (``GATEWAY_DATA_DIR``,
default a per-user state directory; ``:memory:`` keeps it in memory). The CLI overrides a few
of them from flags; nothing else reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

MEMORY = ":memory:"   # GATEWAY_DATA_DIR value: embedded state in this process's memory only


class SettingsError(ValueError):
    pass


def default_data_dir(env: Mapping[str, str]) -> str:
    """The per-user state directory: ``$XDG_STATE_HOME/llm-gateway``, else ``~/.local/state/llm-gateway``."""
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "llm-gateway")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise SettingsError(f"{name} must be 0 or more, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if not value > 0:
        raise SettingsError(f"{name} must be more than 0, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or choices[0]).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True, slots=True)
class Settings:
    config_dir: str = "policies"
    host: str = "127.0.0.1"
    port: int = 4000
    workers: int = 1
    redis_url: str | None = None
    master_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    connect_timeout_s: float = 10.0
    upstream_timeout_s: float = 600.0
    log_level: str = "info"
    redis_cluster: bool = False
    redis_fail_mode: str = "refuse"       # Redis unreachable: "refuse" requests, or "allow" and reconcile
    redis_timeout_s: float = 1.0
    reservation_ttl_s: float = 900.0      # a hold whose replica died expires after this
    worker_lease_s: float = 10.0          # Redis: a dead worker's open requests are swept after this (0: off)
    key_cache_ttl_s: float = 2.0          # revocation is seen everywhere within this
    policy_watch_s: float = 2.0           # poll the policy files this often and hot-reload them (0: off)
    metrics_key: str | None = None        # when set, GET /metrics needs "Authorization: Bearer <it>"
    metrics_dir: str | None = None        # PROMETHEUS_MULTIPROC_DIR: the workers' metric files (workers > 1)
    ledger_max_records: int = 0           # records kept in the ledger's log (0: Redis unbounded, embedded 20,000)
    spool_dir: str | None = None          # ledger records Redis could not take yet wait here on disk (else memory)
    responses_ttl_s: float = 2_592_000.0  # stored Responses conversations expire after this (30 days)
    responses_max_entries: int = 10_000   # the embedded conversation store's bounds
    responses_max_bytes: int = 64 << 20
    log_format: str = "text"              # "text" or "json": every log line, the access log included
    keepalive_timeout_s: float = 5.0      # a connection with no request in flight is closed after this
    request_read_timeout_s: float = 30.0  # a request must arrive in full (head and body) within this
    data_dir: str = MEMORY                # embedded state (no Redis): a SQLite database here, or MEMORY
    clickhouse_url: str | None = None     # the ledger's history in ClickHouse (http(s)://... or chdb://...)
    clickhouse_retention_days: int = 400  # ClickHouse keeps records and rollups this long (0: for ever)
    ledger_buffer_records: int = 100_000  # with ClickHouse, the Redis stream keeps only this many records

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        return cls(
            config_dir=e.get("GATEWAY_CONFIG_DIR") or "policies",
            host=e.get("GATEWAY_HOST") or "127.0.0.1",
            port=_int(e, "GATEWAY_PORT", 4000),
            workers=_int(e, "GATEWAY_WORKERS", 1),
            redis_url=e.get("GATEWAY_REDIS_URL") or None,
            master_key=e.get("GATEWAY_MASTER_KEY") or None,
            max_body_bytes=_int(e, "GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024),
            connect_timeout_s=_float(e, "GATEWAY_CONNECT_TIMEOUT_S", 10.0),
            upstream_timeout_s=_float(e, "GATEWAY_UPSTREAM_TIMEOUT_S", 600.0),
            log_level=(e.get("GATEWAY_LOG_LEVEL") or "info").lower(),
            redis_cluster=_bool(e, "GATEWAY_REDIS_CLUSTER"),
            redis_fail_mode=_choice(e, "GATEWAY_REDIS_FAIL_MODE", ("refuse", "allow")),
            redis_timeout_s=_float(e, "GATEWAY_REDIS_TIMEOUT_S", 1.0),
            reservation_ttl_s=_float(e, "GATEWAY_RESERVATION_TTL_S", 900.0),
            worker_lease_s=_float(e, "GATEWAY_WORKER_LEASE_S", 10.0),
            key_cache_ttl_s=_float(e, "GATEWAY_KEY_CACHE_TTL_S", 2.0),
            policy_watch_s=_float(e, "GATEWAY_POLICY_WATCH_S", 2.0),
            metrics_key=e.get("GATEWAY_METRICS_KEY") or None,
            metrics_dir=e.get("PROMETHEUS_MULTIPROC_DIR") or None,
            ledger_max_records=_count(e, "GATEWAY_LEDGER_MAX_RECORDS", 0),
            spool_dir=e.get("GATEWAY_SPOOL_DIR") or None,
            responses_ttl_s=_float(e, "GATEWAY_RESPONSES_TTL_S", 2_592_000.0),
            responses_max_entries=_count(e, "GATEWAY_RESPONSES_MAX_ENTRIES", 10_000),
            responses_max_bytes=_count(e, "GATEWAY_RESPONSES_MAX_BYTES", 64 << 20),
            log_format=_choice(e, "GATEWAY_LOG_FORMAT", ("text", "json")),
            keepalive_timeout_s=_positive(e, "GATEWAY_KEEPALIVE_TIMEOUT_S", 5.0),
            request_read_timeout_s=_positive(e, "GATEWAY_REQUEST_READ_TIMEOUT_S", 30.0),
            data_dir=e.get("GATEWAY_DATA_DIR") or default_data_dir(e),
            clickhouse_url=e.get("GATEWAY_CLICKHOUSE_URL") or None,
            clickhouse_retention_days=_count(e, "GATEWAY_CLICKHOUSE_RETENTION_DAYS", 400),
            ledger_buffer_records=_count(e, "GATEWAY_LEDGER_BUFFER_RECORDS", 100_000),
        )

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    @property
    def persistent(self) -> bool:
        """Embedded state kept on disk: no Redis, and a data directory other than ``:memory:``."""
        return not self.redis_url and self.data_dir != MEMORY

    def to_env(self) -> dict[str, str]:
        """The settings as environment variables, for worker processes to read back."""
        env = {
            "GATEWAY_CONFIG_DIR": self.config_dir,
            "GATEWAY_HOST": self.host,
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_WORKERS": str(self.workers),
            "GATEWAY_MAX_BODY_BYTES": str(self.max_body_bytes),
            "GATEWAY_CONNECT_TIMEOUT_S": str(self.connect_timeout_s),
            "GATEWAY_UPSTREAM_TIMEOUT_S": str(self.upstream_timeout_s),
            "GATEWAY_LOG_LEVEL": self.log_level,
            "GATEWAY_REDIS_CLUSTER": "1" if self.redis_cluster else "0",
            "GATEWAY_REDIS_FAIL_MODE": self.redis_fail_mode,
            "GATEWAY_REDIS_TIMEOUT_S": str(self.redis_timeout_s),
            "GATEWAY_RESERVATION_TTL_S": str(self.reservation_ttl_s),
            "GATEWAY_WORKER_LEASE_S": str(self.worker_lease_s),
            "GATEWAY_KEY_CACHE_TTL_S": str(self.key_cache_ttl_s),
            "GATEWAY_POLICY_WATCH_S": str(self.policy_watch_s),
            "GATEWAY_LEDGER_MAX_RECORDS": str(self.ledger_max_records),
            "GATEWAY_RESPONSES_TTL_S": str(self.responses_ttl_s),
            "GATEWAY_RESPONSES_MAX_ENTRIES": str(self.responses_max_entries),
            "GATEWAY_RESPONSES_MAX_BYTES": str(self.responses_max_bytes),
            "GATEWAY_LOG_FORMAT": self.log_format,
            "GATEWAY_KEEPALIVE_TIMEOUT_S": str(self.keepalive_timeout_s),
            "GATEWAY_REQUEST_READ_TIMEOUT_S": str(self.request_read_timeout_s),
            "GATEWAY_DATA_DIR": self.data_dir,
            "GATEWAY_CLICKHOUSE_RETENTION_DAYS": str(self.clickhouse_retention_days),
            "GATEWAY_LEDGER_BUFFER_RECORDS": str(self.ledger_buffer_records),
        }
        if self.redis_url:
            env["GATEWAY_REDIS_URL"] = self.redis_url
        if self.master_key:
            env["GATEWAY_MASTER_KEY"] = self.master_key
        if self.metrics_key:
            env["GATEWAY_METRICS_KEY"] = self.metrics_key
        if self.spool_dir:
            env["GATEWAY_SPOOL_DIR"] = self.spool_dir
        if self.clickhouse_url:
            env["GATEWAY_CLICKHOUSE_URL"] = self.clickhouse_url
        if self.metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        return env
