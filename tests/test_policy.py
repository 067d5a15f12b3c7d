"""Policy loading: strict validation with file, line and key in every error; defaults that run keyless."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.policy import PolicyError, load_policies

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def error_of(tmp_path: Path, text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_policies(str(write(tmp_path, text)))
    return info.value


def test_shipped_defaults_load_without_keys() -> None:
    policies = load_policies(str(ROOT / "policies"))
    demo = policies.model("demo")
    assert demo is not None and demo.deployments[0].provider == "simulated"
    assert "auto" in policies.route_names and policies.model("auto") is None  # a route-only name
    assert demo.deployments[0].price.input == 150_000  # $0.15/Mtok in pico-USD per token


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        models:
          demo:
            deployments:
              - provider: simulated
                pricee: {input_per_mtok: 1}
        """)
    assert err.file.endswith("models.yaml") and err.line == 5
    assert err.key == "models.demo.deployments[0].pricee"
    assert "unknown key" in str(err)


def test_unknown_price_key_and_bad_values(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        models:
          m:
            deployments:
              - provider: simulated
                price:
                  input_per_mtok: 1
                  output_per_mtk: 2
        """)
    assert err.line == 7 and err.key.endswith("price.output_per_mtk")
    err = error_of(tmp_path, """\
        models:
          m:
            deployments:
              - provider: simulated
                weight: heavy
        """)
    assert err.line == 5 and err.key.endswith("weight") and "number" in err.message


def test_missing_required_fields(tmp_path: Path) -> None:
    err = error_of(tmp_path, "models:\n  m:\n    description: x\n")
    assert err.key == "models.m.deployments"
    err = error_of(tmp_path, "models:\n  m:\n    deployments:\n      - model: x\n")
    assert err.key == "models.m.deployments[0].provider" and "required" in err.message
    err = error_of(tmp_path, "models:\n  m:\n    deployments:\n      - provider: vllm\n        model: x\n")
    assert err.key.endswith("api_base")


def test_unknown_section_duplicate_key_and_yaml_syntax(tmp_path: Path) -> None:
    err = error_of(tmp_path, "modelz: {}\n")
    assert err.key == "modelz" and err.line == 1
    err = error_of(tmp_path, "models:\n  m:\n    deployments: []\n  m:\n    deployments: []\n")
    assert err.line == 4 and "duplicate" in err.message
    err = error_of(tmp_path, "models:\n  m: [unclosed\n")
    assert err.key == "<yaml>" and err.line >= 2


def test_same_model_in_two_files(tmp_path: Path) -> None:
    body = "models:\n  m:\n    deployments:\n      - provider: simulated\n"
    write(tmp_path, body, "a.yaml")
    write(tmp_path, body, "b.yaml")
    with pytest.raises(PolicyError) as info:
        load_policies(str(tmp_path))
    assert info.value.file.endswith("b.yaml") and "a.yaml" in info.value.message


def test_api_key_from_env_and_price_from_litellm_map(tmp_path: Path) -> None:
    write(tmp_path, """\
        models:
          gpt-4o-mini:
            deployments:
              - provider: openai
                api_key_env: TEST_OPENAI_KEY
        """)
    policies = load_policies(str(tmp_path), env={"TEST_OPENAI_KEY": "sk-xyz"})
    d = policies.models["gpt-4o-mini"].deployments[0]
    assert d.api_key == "sk-xyz" and d.api_base == "https://api.openai.com/v1"
    assert d.price_source == "litellm" and d.price.input == 150_000 and d.price.output == 600_000
    assert d.context_window == 128_000


@pytest.mark.e2e
def test_gateway_check_command(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(ROOT / "policies")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "demo" in ok.stdout and "simulated" in ok.stdout
    write(tmp_path, "models:\n  m:\n    deployments:\n      - provider: simulated\n        colour: red\n")
    bad = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1
    assert "models.yaml:5: models.m.deployments[0].colour: unknown key" in bad.stderr


TEAM_MODELS = ("models:\n  demo:\n    deployments:\n      - provider: simulated\n"
               "  cheap:\n    deployments:\n      - provider: simulated\n")


def test_teams_section(tmp_path: Path) -> None:
    write(tmp_path, TEAM_MODELS)
    write(tmp_path, """\
        teams:
          research:
            budgets:
              - {period: monthly, usd: 500}
              - {period: daily, usd: 0.05}
            on_exceed: downgrade
            downgrade_to: cheap
            soft_alert: 0.9
            rpm: 60
            tpm: 100000
            allowed_models: [demo, cheap]
          support:
        """, "teams.yaml")
    policies = load_policies(str(tmp_path))
    research = policies.teams["research"]
    assert [(b.period, b.limit_nano) for b in research.budgets] == [("monthly", 500 * 10**9), ("daily", 50_000_000)]
    assert research.on_exceed == "downgrade" and research.downgrade_to == "cheap" and research.rpm == 60
    assert research.allows("demo") and not research.allows("other")
    assert policies.teams["support"].budgets == () and policies.teams["support"].allows("anything")
    assert "default" in policies.teams


@pytest.mark.parametrize(("team", "key", "message"), [
    ("budgets:\n      - {period: yearly, usd: 5}", "teams.t.budgets[0].period", "must be one of"),
    ("budgets:\n      - {period: daily, usd: -1}", "teams.t.budgets[0].usd", "at least"),
    ("budgets:\n      - {period: daily, usd: 10000000}", "teams.t.budgets[0].usd", "at most 9007199"),
    ("on_exceed: downgrade", "teams.t.downgrade_to", "needs the model"),
    ("allowed_models: [demo, nope]", "teams.t.allowed_models", "unknown model"),
    ("rpm: fast", "teams.t.rpm", "integer"),
    ("budget: 5", "teams.t.budget", "unknown key"),
])
def test_team_errors(tmp_path: Path, team: str, key: str, message: str) -> None:
    write(tmp_path, TEAM_MODELS)
    write(tmp_path, f"teams:\n  t:\n    {team}\n", "teams.yaml")
    with pytest.raises(PolicyError) as info:
        load_policies(str(tmp_path))
    assert info.value.key == key and message in info.value.message
    assert info.value.file.endswith("teams.yaml")


def _error_in(tmp_path: Path, files: dict[str, str]) -> PolicyError:
    """Load exactly ``files`` (in a fresh directory) and return the policy error they cause."""
    config = tmp_path / f"config-{len(list(tmp_path.iterdir()))}"
    config.mkdir()
    for name, text in files.items():
        write(config, text, name)
    with pytest.raises(PolicyError) as info:
        load_policies(str(config))
    return info.value


def test_scalar_deployment_names_its_file_and_line(tmp_path: Path) -> None:
    err = _error_in(tmp_path, {"models.yaml": """\
        # a comment, so the item is not on line 1
        models:
          m:
            description: a model
            deployments: [simulated]
        """})
    assert (Path(err.file).name, err.line) == ("models.yaml", 5)
    assert err.key == "models.m.deployments[0]" and "expected a mapping" in err.message
    err = _error_in(tmp_path, {"models.yaml": """\
        models:
          m:
            deployments:
              - provider: simulated
                name: one
              - simulated
        """})
    assert (Path(err.file).name, err.line, err.key) == ("models.yaml", 6, "models.m.deployments[1]")


def test_scalar_model_and_team_bodies_name_their_file_and_line(tmp_path: Path) -> None:
    err = _error_in(tmp_path, {"models.yaml": "models:\n  ok:\n    deployments:\n      - provider: simulated\n"
                                              "  m: simulated\n"})
    assert (Path(err.file).name, err.line, err.key) == ("models.yaml", 5, "models.m")
    err = _error_in(tmp_path, {"models.yaml": TEAM_MODELS, "teams.yaml": "teams:\n  a:\n  b: 5\n"})
    assert (Path(err.file).name, err.line, err.key) == ("teams.yaml", 3, "teams.b")


def test_scalar_budget_names_its_file_and_line(tmp_path: Path) -> None:
    err = _error_in(tmp_path, {"models.yaml": TEAM_MODELS, "teams.yaml": """\
        teams:
          t:
            on_exceed: block
            budgets:
              - {period: daily, usd: 5}
              - monthly
        """})
    assert (Path(err.file).name, err.line) == ("teams.yaml", 6)
    assert err.key == "teams.t.budgets[1]" and "expected a mapping" in err.message


def test_scalar_route_names_its_file_and_line_across_files(tmp_path: Path) -> None:
    # routes from two files are concatenated; the bad item must still point into its own file
    err = _error_in(tmp_path, {
        "models.yaml": TEAM_MODELS,
        "routes-a.yaml": "routes:\n  - name: first\n    candidates: [demo]\n",
        "routes-b.yaml": "\n\nroutes:\n  - just-a-name\n",
    })
    assert (Path(err.file).name, err.line) == ("routes-b.yaml", 4)
    assert err.key == "routes[1]" and "expected a mapping" in err.message


def test_scalar_route_override_and_cache_team_name_their_file_and_line(tmp_path: Path) -> None:
    err = _error_in(tmp_path, {"models.yaml": TEAM_MODELS, "routes.yaml": """\
        routes:
          - name: r
            candidates: [demo]
            cache: deterministic
        """})
    # `cache: deterministic` is a scalar, so take_mapping refuses it at the key's own line
    assert (Path(err.file).name, err.line, err.key) == ("routes.yaml", 4, "routes[0].cache")
    err = _error_in(tmp_path, {"models.yaml": TEAM_MODELS, "caching.yaml": """\
        cache:
          mode: deterministic
          teams:
            research: always
        """})
    assert (Path(err.file).name, err.line) == ("caching.yaml", 4)
    assert err.key == "cache.teams.research" and "expected a mapping" in err.message


def test_scalar_policy_case_names_its_file_and_line(tmp_path: Path) -> None:
    err = _error_in(tmp_path, {"models.yaml": TEAM_MODELS, "tests.yaml": """\
        tests:
          - name: fine
            model: demo
            request: {messages: [{role: user, content: hi}]}
            expect: {route: default}

          - demo goes to demo
        """})
    assert (Path(err.file).name, err.line) == ("tests.yaml", 7)
    assert err.key == "tests[1]" and "expected a mapping" in err.message
    err = _error_in(tmp_path, {"models.yaml": TEAM_MODELS, "tests.yaml": """\
        tests:
          - name: fine
            model: demo
            request: {messages: [{role: user, content: hi}]}
            expect: [default]
        """})
    assert (Path(err.file).name, err.line, err.key) == ("tests.yaml", 5, "tests[0].expect")


@pytest.mark.parametrize(("text", "line", "words"), [
    ("models:\n  m: [unclosed\n", 3, "not closed with ']'"),
    ("models:\n  m: {a: 1\n", 3, "not closed with '}'"),
    ("models:\n  m: a: b\n", 2, "put a value that contains ': ' in quotes"),
    ("models:\n\tm: 1\n", 2, "tab character"),
    ("models:\n  m: 'open\n", 3, "quoted string is never closed (it opens on line 2)"),
    ("models:\n  m:\n    a: 1\n   b: 2\n", 4, "indentation does not match"),
    ("models:\n  m: @x\n", 2, "put the value in quotes"),
    ("models:\n  m: *nowhere\n", 2, "anchor (&name) that is not defined"),
])
def test_yaml_syntax_errors_name_file_line_and_say_what_is_wrong(tmp_path: Path, text: str, line: int,
                                                                   words: str) -> None:
    (tmp_path / "models.yaml").write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policies(str(tmp_path))
    err = info.value
    assert (Path(err.file).name, err.line) == ("models.yaml", line)
    assert err.message.startswith("YAML syntax error: ") and words in err.message, err.message
    for parser_words in ("while parsing", "while scanning", "<stream end>", "<block end>"):
        assert parser_words not in err.message


def test_a_policy_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_bytes(b"models:\n  m:\n    description: caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policies(str(tmp_path))
    assert info.value.line == 3 and "not UTF-8" in info.value.message


@pytest.mark.e2e
def test_check_prints_a_yaml_syntax_error_as_one_plain_line(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  m: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'models.yaml'}:3: <yaml>: YAML syntax error: a list in square brackets" in line
