"""The alert rules in deploy/prometheus/: `promtool check rules` and the `promtool test rules` unit tests
(each alert firing and not firing), plus a check that those unit tests notice a broken rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.e2e   # starts promtool

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
ALERTS = {"GatewayBudgetSoftThreshold", "GatewayBudgetExhausted", "GatewayBudgetProjectedToExceed",
          "GatewayUpstreamErrorRatioHigh", "GatewayRequestLatencyP99High", "GatewayTimeToFirstTokenP99High",
          "GatewayOverheadP99High", "GatewayDeploymentUnhealthy", "GatewayDown"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian package prometheus; .ci/run installs it)")
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=str(cwd))


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES), cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_alert_is_defined_and_unit_tested_firing_and_silent(promtool: str) -> None:
    rules = yaml.safe_load(RULES.read_text())
    defined = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert defined == ALERTS
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    tests = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == ALERTS and silent == ALERTS
    result = run(promtool, "test", "rules", str(RULE_TESTS), cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The unit tests have teeth: shifting the weekly period-end formula by a day, raising the error
    ratio threshold or inverting the health check each makes `promtool test rules` fail."""
    original = RULES.read_text()
    for old, new in (("(7 - scalar(day_of_week())) % 7", "(8 - scalar(day_of_week())) % 7"),
                     ("> 0.05\n          and on (provider)", "> 0.5\n          and on (provider)"),
                     ("== 0\n        for: 2m", "== 1\n        for: 2m")):
        assert old in original, old
        (tmp_path / "alerts.yml").write_text(original.replace(old, new))
        shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yml")
        result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
        assert result.returncode != 0, f"a rule broken by {new!r} still passes its unit tests"
        assert "FAILED" in result.stdout + result.stderr


def test_compose_prometheus_config_passes_promtool(promtool: str) -> None:
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    result = run(promtool, "check", "config", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
