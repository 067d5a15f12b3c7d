"""Process settings: read once from ``GATEWAY_*`` variables, defaults as documented, a bad value is
a one-line error naming the variable (from the command too), and ``to_env`` hands workers the
same settings back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gateway.settings import Settings, SettingsError


def test_defaults_are_the_documented_ones() -> None:
    s = Settings.from_env({})
    assert (s.config_dir, s.host, s.port, s.workers) == ("policies", "127.0.0.1", 4000, 1)
    assert (s.redis_url, s.master_key, s.metrics_key) == (None, None, None)
    assert s.max_body_bytes == 16 * 1024 * 1024
    assert (s.connect_timeout_s, s.upstream_timeout_s, s.redis_timeout_s) == (10.0, 600.0, 1.0)
    assert (s.redis_cluster, s.redis_fail_mode, s.log_level) == (False, "refuse", "info")
    assert (s.reservation_ttl_s, s.key_cache_ttl_s, s.policy_watch_s) == (900.0, 2.0, 2.0)
    assert (s.ledger_max_records, s.spool_dir) == (0, None)
    assert (s.log_format, s.keepalive_timeout_s, s.request_read_timeout_s) == ("text", 5.0, 30.0)
    assert Settings.from_env({"HOME": "/home/u"}).data_dir == "/home/u/.local/state/llm-gateway"
    assert Settings.from_env({"XDG_STATE_HOME": "/x/state"}).data_dir == "/x/state/llm-gateway"
    assert Settings.from_env({"HOME": "/home/u"}).persistent and not Settings().persistent   # in code: memory
    assert not Settings.from_env({"GATEWAY_DATA_DIR": ":memory:"}).persistent
    assert not Settings.from_env({"GATEWAY_REDIS_URL": "redis://h:1"}).persistent


def test_every_variable_is_read_and_survives_the_trip_to_a_worker() -> None:
    env = {"GATEWAY_CONFIG_DIR": "/etc/gw", "GATEWAY_HOST": "0.0.0.0", "GATEWAY_PORT": "4100",
           "GATEWAY_WORKERS": "4", "GATEWAY_REDIS_URL": "redis://127.0.0.1:6390/2", "GATEWAY_MASTER_KEY": "sk-m",
           "GATEWAY_MAX_BODY_BYTES": "1024", "GATEWAY_CONNECT_TIMEOUT_S": "2.5", "GATEWAY_UPSTREAM_TIMEOUT_S": "30",
           "GATEWAY_LOG_LEVEL": "DEBUG", "GATEWAY_REDIS_CLUSTER": "1", "GATEWAY_REDIS_FAIL_MODE": "allow",
           "GATEWAY_REDIS_TIMEOUT_S": "0.5", "GATEWAY_RESERVATION_TTL_S": "60", "GATEWAY_KEY_CACHE_TTL_S": "0.5",
           "GATEWAY_POLICY_WATCH_S": "0", "GATEWAY_METRICS_KEY": "sk-metrics", "GATEWAY_LEDGER_MAX_RECORDS": "5000",
           "GATEWAY_SPOOL_DIR": "/var/lib/gateway/spool", "GATEWAY_LOG_FORMAT": "JSON",
           "GATEWAY_KEEPALIVE_TIMEOUT_S": "2.5", "GATEWAY_REQUEST_READ_TIMEOUT_S": "12",
           "GATEWAY_DATA_DIR": "/var/lib/gateway/state"}
    s = Settings.from_env(env)
    assert (s.config_dir, s.host, s.port, s.workers, s.redis_url) == (
        "/etc/gw", "0.0.0.0", 4100, 4, "redis://127.0.0.1:6390/2")
    assert (s.master_key, s.metrics_key, s.max_body_bytes, s.log_level) == ("sk-m", "sk-metrics", 1024, "debug")
    assert (s.connect_timeout_s, s.upstream_timeout_s, s.redis_timeout_s) == (2.5, 30.0, 0.5)
    assert (s.redis_cluster, s.redis_fail_mode, s.reservation_ttl_s) == (True, "allow", 60.0)
    assert (s.key_cache_ttl_s, s.policy_watch_s, s.ledger_max_records) == (0.5, 0.0, 5000)
    assert (s.spool_dir, s.data_dir) == ("/var/lib/gateway/spool", "/var/lib/gateway/state")
    assert (s.log_format, s.keepalive_timeout_s, s.request_read_timeout_s) == ("json", 2.5, 12.0)
    assert Settings.from_env(s.to_env()) == s
    assert s.with_overrides(port=5000, host=None).port == 5000 and s.with_overrides(host=None).host == "0.0.0.0"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("GATEWAY_PORT", "http", "must be an integer"),
    ("GATEWAY_UPSTREAM_TIMEOUT_S", "soon", "must be a number"),
    ("GATEWAY_REDIS_CLUSTER", "maybe", "must be true or false"),
    ("GATEWAY_REDIS_FAIL_MODE", "ignore", "must be one of refuse, allow"),
    ("GATEWAY_LEDGER_MAX_RECORDS", "-1", "must be 0 or more"),
    ("GATEWAY_LOG_FORMAT", "xml", "must be one of text, json"),
    ("GATEWAY_KEEPALIVE_TIMEOUT_S", "0", "must be more than 0"),
    ("GATEWAY_REQUEST_READ_TIMEOUT_S", "-3", "must be more than 0"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value})
    assert str(err.value).startswith(name) and says in str(err.value)


@pytest.mark.e2e
def test_the_command_reports_a_bad_setting_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"GATEWAY_PORT": "http"}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve"], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "GATEWAY_PORT must be an integer, got 'http'" in done.stderr and "Traceback" not in done.stderr
