"""Routing rules and strategies as pure functions: policies from YAML text, decisions checked exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.policy import Policies, PolicyError, load_policies
from gateway.routing.detectors import detect, has_card_number, has_email, has_phone, has_secret, request_text
from gateway.routing.explain import explain, route_input, run_cases
from gateway.routing.resolve import HealthView, RouteInput, required_capabilities, resolve_policy

MODELS = """
models:
  big:
    deployments:
      - {provider: simulated, name: big-a, model: big-1, context_window: 100000,
         price: {input_per_mtok: 10, output_per_mtok: 30}}
      - {provider: simulated, name: big-b, model: big-2, context_window: 100000, weight: 0,
         price: {input_per_mtok: 10, output_per_mtok: 30}}
  small:
    deployments:
      - {provider: simulated, name: small-a, model: small-1, context_window: 60,
         price: {input_per_mtok: 1, output_per_mtok: 2}}
  local:
    deployments:
      - {provider: simulated, name: local-a, model: local-1, self_hosted: true, context_window: 8000,
         capabilities: [chat], price: {gpu_hour_usd: 3.6, output_tokens_per_second: 1000}}
  embedder:
    deployments:
      - {provider: simulated, name: embed-a, model: embed-1, capabilities: [embeddings],
         price: {input_per_mtok: 0.1, output_per_mtok: 0}}
"""


def load(tmp_path: Path, routes: str = "", extra: str = "") -> Policies:
    (tmp_path / "models.yaml").write_text(textwrap.dedent(MODELS))
    if routes:
        (tmp_path / "routes.yaml").write_text("routes:\n" + textwrap.indent(textwrap.dedent(routes), "  "))
    if extra:
        (tmp_path / "extra.yaml").write_text(textwrap.dedent(extra))
    return load_policies(str(tmp_path))


def ask(model: str, text: str = "hello", team: str = "default", **kw: Any) -> RouteInput:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **kw.pop("body", {})}
    return RouteInput(team=team, model=model, endpoint=kw.pop("endpoint", "chat"), body=body,
                      raw_size=len(str(body)), **kw)


def ids(policies: Policies, inp: RouteInput, **kw: Any) -> tuple[str, list[str]]:
    plan = resolve_policy(policies, inp, pick=kw.pop("pick", 0.0), **kw)
    return plan.route, [d.id for d in plan.candidates]


def test_no_rule_uses_the_models_own_deployments_weighted(tmp_path: Path) -> None:
    p = load(tmp_path)
    assert ids(p, ask("big")) == ("default", ["big-a", "big-b"])   # big-b has weight 0: never drawn first
    assert ids(p, ask("big"), pick=0.99) == ("default", ["big-a", "big-b"])


RULES = """
- name: by-team
  match: {teams: [legal]}
  candidates: [local]
- name: by-key
  match: {keys: [key_abc]}
  candidates: [small]
- name: by-header
  match: {headers: {X-Tier: gold}, models: [auto]}
  candidates: [big]
- name: by-tag
  match: {tags: [batch], models: [auto]}
  candidates: [local, small]
- name: pii
  match: {contains: [personal_data]}
  candidates: [local]
- name: tools
  match: {capabilities: [tools], models: [auto]}
  candidates: [big]
- name: long
  match: {models: [auto], min_prompt_tokens: 40}
  candidates: [big]
- name: short
  match: {models: [auto]}
  candidates: [small, big]
"""


def test_first_matching_rule_wins_on_each_condition(tmp_path: Path) -> None:
    p = load(tmp_path, RULES)
    assert ids(p, ask("big", team="legal"))[0] == "by-team"
    assert ids(p, ask("big", key_id="key_abc"))[0] == "by-key"
    assert ids(p, ask("auto", headers={"x-tier": "gold"}))[0] == "by-header"
    assert ids(p, ask("auto", headers={"x-tier": "silver"}))[0] == "short"
    assert ids(p, ask("auto", headers={"x-gateway-tags": "nightly, batch"})) == ("by-tag", ["local-a", "small-a"])
    assert ids(p, ask("big", "write to jane@example.org")) == ("pii", ["local-a"])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ids(p, ask("auto", body={"tools": tools}))[0] == "tools"
    assert ids(p, ask("auto", " ".join(["word"] * 60)))[0] == "long"
    assert ids(p, ask("auto", "hi"))[0] == "short"
    assert ids(p, ask("big"))[0] == "default"


def test_route_only_names_and_unknown_models(tmp_path: Path) -> None:
    p = load(tmp_path, RULES)
    assert p.route_names == frozenset({"auto"})
    with pytest.raises(GatewayError) as err:
        resolve_policy(p, ask("nope"))
    assert (err.value.status_code, err.value.code) == (404, "model_not_found")
    only_rules = load(tmp_path, "- {name: a, match: {models: [auto], teams: [x]}, candidates: [big]}")
    with pytest.raises(GatewayError) as err:
        resolve_policy(only_rules, ask("auto", team="y"))
    assert err.value.code == "model_not_found" and "No routing rule" in err.value.message


def test_candidates_must_fit_capabilities_window_and_permissions(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: all
          match: {models: [auto]}
          candidates: [local, small, big]
        """)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ids(p, ask("auto", body={"tools": tools}))[1] == ["small-a", "big-a", "big-b"]   # local: no tools
    long_text = " ".join(["word"] * 80)                                                      # > small's 60 window
    assert ids(p, ask("auto", long_text))[1] == ["local-a", "big-a", "big-b"]
    allowed = frozenset({"auto", "small"})
    assert ids(p, ask("auto", allowed=allowed))[1] == ["small-a"]
    with pytest.raises(GatewayError) as err:
        resolve_policy(p, ask("big", allowed=allowed))
    assert (err.value.status_code, err.value.code) == (403, "model_not_allowed")
    with pytest.raises(GatewayError) as err:
        resolve_policy(p, ask("auto", " ".join(["word"] * 200_000)))
    assert (err.value.status_code, err.value.code) == (400, "context_length_exceeded")


def test_strategies(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: cheap
          match: {models: [cheap]}
          candidates: [big, local, small]
          strategy: cheapest
        - name: fast
          match: {models: [fast]}
          candidates: [big]
          strategy: latency
        - name: weighted
          match: {models: [spread]}
          candidates: [big-b, small, big-a]
          strategy: weighted
        - name: ordered
          match: {models: [ordered]}
          candidates: [small, big-b, big-a]
        """)
    # cheapest: 9 prompt tokens + 256 expected output; GPU-hour local: $3.6/h at 1000 out tok/s = $1/Mtok out,
    # 10000 in tok/s = $0.1/Mtok in, so local < small ($1 in, $2 out) < big.
    assert ids(p, ask("cheap"))[1] == ["local-a", "small-a", "big-a", "big-b"]
    assert ids(p, ask("ordered"))[1] == ["small-a", "big-b", "big-a"]
    # weighted: weights 0 (big-b), 1 (small), 1 (big-a); the draw picks the first, the rest keep their order
    assert ids(p, ask("spread"), pick=0.2)[1] == ["small-a", "big-b", "big-a"]
    assert ids(p, ask("spread"), pick=0.7)[1] == ["big-a", "big-b", "small-a"]
    seen = HealthView(latency={"big-a": 0.9, "big-b": 0.1}, ttft={"big-a": 0.05, "big-b": 0.3})
    assert ids(p, ask("fast"), health=seen)[1] == ["big-b", "big-a"]
    assert ids(p, ask("fast", body={"stream": True}), health=seen)[1] == ["big-a", "big-b"]
    assert ids(p, ask("fast"), health=HealthView(latency={"big-a": 0.9}))[1] == ["big-b", "big-a"]  # unknown first


def test_cooled_down_deployments_go_last(tmp_path: Path) -> None:
    p = load(tmp_path, "- {name: r, match: {models: [auto]}, candidates: [small, big]}")
    health = HealthView(cooled=frozenset({"small-a"}))
    assert ids(p, ask("auto"), health=health)[1] == ["big-a", "big-b", "small-a"]


def test_retry_settings_attempts_and_baseline(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: r
          match: {models: [auto]}
          candidates: [small, big]
          retry_on: [timeout]
          max_attempts: 2
          deadline_s: 1.5
          baseline: big
        """)
    plan = resolve_policy(p, ask("auto"), pick=0.0)
    assert plan.retry_on == frozenset({"timeout"}) and plan.max_attempts == 2 and plan.deadline_s == 1.5
    assert plan.baseline.id == "big-a" and plan.model.name == "big"
    assert resolve_policy(p, ask("small"), pick=0.0).baseline.id == "small-a"   # default route: the model itself


CAPABLE = """
models:
  seer:                              # sees images, no JSON mode
    deployments:
      - {provider: simulated, name: seer-a, model: seer-1, capabilities: [chat, vision],
         price: {input_per_mtok: 2, output_per_mtok: 4}}
  structured:                        # JSON mode, no images
    deployments:
      - {provider: simulated, name: json-a, model: json-1, capabilities: [chat, json],
         price: {input_per_mtok: 2, output_per_mtok: 4}}
"""
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def looking(text: str = "what is in this picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, IMAGE]}]


def test_required_capabilities_of_vision_and_json_requests() -> None:
    assert required_capabilities("chat", {"messages": looking()}) == {"chat", "vision"}
    for kind in ("json_object", "json_schema"):
        assert required_capabilities("chat", {"messages": [], "response_format": {"type": kind}}) == {"chat", "json"}
    assert required_capabilities("chat", {"messages": [], "response_format": {"type": "text"}}) == {"chat"}
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "no picture"}]}]
    assert required_capabilities("chat", {"messages": text_parts}) == {"chat"}
    both = {"messages": [{"role": "system", "content": "be terse"}, *looking()],
            "response_format": {"type": "json_object"}}
    assert required_capabilities("chat", both) == {"chat", "vision", "json"}


def test_vision_and_json_requests_match_capability_rules_and_skip_candidates_lacking_them(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: pictures
          match: {models: [auto], capabilities: [vision]}
          candidates: [local, structured, seer, big]
        - name: json-mode
          match: {models: [auto], capabilities: [json]}
          candidates: [local, seer, structured, big]
        - name: only-seer
          match: {models: [blind-json]}
          candidates: [seer]
        - name: rest
          match: {models: [auto]}
          candidates: [local]
        """, extra=CAPABLE)
    json_mode = {"response_format": {"type": "json_object"}}
    # local has chat only, structured lacks vision, seer lacks json: each is left out where it cannot serve
    assert ids(p, ask("auto", body={"messages": looking()})) == ("pictures", ["seer-a", "big-a", "big-b"])
    assert ids(p, ask("auto", body=json_mode)) == ("json-mode", ["json-a", "big-a", "big-b"])
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}
    assert ids(p, ask("auto", body=schema)) == ("json-mode", ["json-a", "big-a", "big-b"])
    # an image *and* JSON mode: the first rule matches, and only big has both
    assert ids(p, ask("auto", body={"messages": looking(), **json_mode})) == ("pictures", ["big-a", "big-b"])
    # neither: the capability rules do not match
    assert ids(p, ask("auto", body={"response_format": {"type": "text"}})) == ("rest", ["local-a"])
    # no candidate has what the request needs: 400 unsupported_capability, before any upstream call
    for model, body in (("blind-json", json_mode), ("local", {"messages": looking()}), ("structured",
                                                                                        {"messages": looking()})):
        with pytest.raises(GatewayError) as err:
            resolve_policy(p, ask(model, body=body), pick=0.0)
        assert (err.value.status_code, err.value.code, err.value.param) == (400, "unsupported_capability", "model")
        assert f"No candidate for '{model}' supports" in err.value.message
    with pytest.raises(GatewayError) as err:
        resolve_policy(p, ask("local", body={"messages": looking()}), pick=0.0)
    assert err.value.message == "No candidate for 'local' supports chat, vision."


ALIASED = """
models:
  mini:
    aliases: [small-talk, quick]
    deployments:
      - {provider: simulated, name: mini-a, model: mini-1, price: {input_per_mtok: 1, output_per_mtok: 2}}
  other:
    aliases: [second, alt]
    deployments:
      - {provider: simulated, name: other-a, model: other-1, price: {input_per_mtok: 1, output_per_mtok: 2}}
"""


def test_rules_on_a_model_match_its_aliases(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: on-model
          match: {models: [mini]}
          candidates: [big]
        - name: on-alias
          match: {models: [alt, auto]}
          candidates: [small]
        """, extra=ALIASED)
    # the names are widened once, at load: a request still compares one string with one set
    assert p.routes[0].match.models == frozenset({"mini", "small-talk", "quick"})
    assert p.routes[1].match.models == frozenset({"alt", "other", "second", "auto"})
    assert p.route_names == frozenset({"auto"})           # aliases are models' names, not route-only names
    for name in ("mini", "small-talk", "quick"):          # a rule on the model: its aliases too
        assert ids(p, ask(name)) == ("on-model", ["big-a", "big-b"]), name
    for name in ("alt", "other", "second", "auto"):       # a rule on an alias: still the alias, and the model
        assert ids(p, ask(name)) == ("on-alias", ["small-a"]), name
    assert ids(p, ask("big"))[0] == "default"
    # the baseline of a request for an alias is its model's first deployment
    assert resolve_policy(p, ask("quick"), pick=0.0).baseline.id == "mini-a"
    # explain names the rule written on the model for a request that used an alias
    text, plan = explain(p, route_input(p, "default", "small-talk", {"messages": [{"role": "user", "content": "hi"}]}))
    assert plan is not None and plan.route == "on-model" and "rule on-model" in text and "matches" in text


@pytest.mark.parametrize(("routes", "key", "message"), [
    ("- {name: r, candidates: [big], colour: red}", "routes[0].colour", "unknown key"),
    ("- {name: r, candidates: [nope]}", "routes[0].candidates", "neither a model"),
    ("- {name: r, candidates: [big], strategy: random}", "routes[0].strategy", "must be one of"),
    ("- {name: r, candidates: [big], match: {contains: [gossip]}}", "routes[0].match.contains", "unknown value"),
    ("- {name: r, candidates: [big], match: {min_prompt_tokens: 9, max_prompt_tokens: 3}}",
     "routes[0].match.max_prompt_tokens", "below"),
    ("- {name: r, candidates: [big]}\n- {name: r, candidates: [small]}", "routes[1].name", "used twice"),
    ("- {name: default, candidates: [big]}", "routes[0].name", "reserved"),
    ("- {name: r, candidates: [big], retry_on: [weather]}", "routes[0].retry_on", "unknown value"),
    ("- {name: r, candidates: [big], cache: {mode: sometimes}}", "routes[0].cache.mode", "must be one of"),
    ("- {name: r, candidates: [big], compression: {enabled: true, colour: red}}", "routes[0].compression.colour",
     "unknown key"),
])
def test_route_validation_names_file_line_and_key(tmp_path: Path, routes: str, key: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        load(tmp_path, routes)
    assert err.value.key == key and message in err.value.message
    assert err.value.file.endswith("routes.yaml") and err.value.line >= 2


def test_detectors() -> None:
    assert has_email("reach me at first.last+tag@mail.example.co.uk please")
    assert not has_email("an @ sign alone, or user@localhost")
    assert has_phone("call +44 20 7946 0958") and has_phone("(415) 555-0100") and has_phone("415-555-0100")
    assert not has_phone("version 1.2.3 of 2024") and not has_phone("order 12345")
    assert has_card_number("card 4111 1111 1111 1111 exp 12/29")
    assert not has_card_number("4111 1111 1111 1112")   # fails the Luhn check
    assert has_secret("key=sk-proj-abcdefghijklmnopqrstuvwxyz012345")
    assert has_secret("AKIAIOSFODNN7EXAMPLE") and has_secret("-----BEGIN RSA PRIVATE KEY-----\nMIIE")
    assert has_secret("ghp_" + "a" * 36)
    assert not has_secret("sk-short and a skeleton key")
    assert detect(frozenset({"personal_data"}), "mail a@b.io, card 4111111111111111") == ["email", "card_number"]
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi a@b.io"}]},
                         {"role": "assistant", "tool_calls": [{"function": {"arguments": '{"to": "x"}'}}]}]}
    assert request_text("chat", body) == 'hi a@b.io\n{"to": "x"}'
    assert request_text("embeddings", {"input": ["one", "two"]}) == "one\ntwo"


def test_explain_and_policy_cases(tmp_path: Path) -> None:
    p = load(tmp_path, RULES, extra="""
        tests:
          - name: legal stays local
            team: legal
            model: big
            request: {messages: [{role: user, content: hi}]}
            expect: {route: by-team, deployment: local-a}
          - name: wrong on purpose
            model: auto
            request: {messages: [{role: user, content: hi}]}
            expect: {route: long}
          - name: unknown
            model: nope
            request: {messages: [{role: user, content: hi}]}
            expect: {error: model_not_found}
        """)
    results = run_cases(p)
    assert [r.ok for r in results] == [True, False, True]
    assert "expected route long" in results[1].line() and "extra.yaml" in results[1].line()
    text, plan = explain(p, route_input(p, "default", "auto", {"messages": [{"role": "user", "content": "hi"}]}))
    assert plan is not None and plan.route == "short"
    assert "rule by-team" in text and "no, team 'default' not in ['legal']" in text
    assert "rule short" in text and "matches" in text and "decision: route short" in text
    text, plan = explain(p, route_input(p, "default", "nope", {"messages": []}))
    assert plan is None and "404 model_not_found" in text and "rule by-team" in text


TEAMS = """
teams:
  interns: {allowed_models: [auto, small, local]}
"""


def test_explain_says_why_each_candidate_was_skipped(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: all
          match: {models: [auto]}
          candidates: [local, small, big]
        """, extra=TEAMS)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    text, plan = explain(p, route_input(p, "default", "auto", body))
    assert plan is not None and [d.id for d in plan.candidates] == ["small-a", "big-a", "big-b"]
    assert "  local-a: skipped, lacks tools" in text.splitlines()
    assert "order (fallback): small-a, big-a, big-b" in text
    # a prompt too long for small's 60-token window
    text, plan = explain(p, route_input(p, "default", "auto", {"messages": [{"role": "user",
                                                                            "content": " ".join(["word"] * 80)}]}))
    assert plan is not None and plan.prompt_tokens is not None and plan.prompt_tokens > 60
    assert f"  small-a: skipped, {plan.prompt_tokens} prompt tokens do not fit its 60 window" in text.splitlines()
    assert "decision: route all, first deployment local-a" in text
    # a team that may not use big: its deployments are skipped, each with the reason
    text, plan = explain(p, route_input(p, "interns", "auto", {"messages": [{"role": "user", "content": "hi"}]}))
    lines = text.splitlines()
    assert plan is not None and [d.id for d in plan.candidates] == ["local-a", "small-a"]
    assert "  big-a: skipped, team may not use model 'big'" in lines
    assert "  big-b: skipped, team may not use model 'big'" in lines
    assert "request: team interns, model auto, endpoint chat" == lines[0]
    # nothing left at all: the refusal carries the reasons too
    text, plan = explain(p, route_input(p, "interns", "auto", body | {"messages": [{"role": "user", "content": " ".join(
        ["word"] * 80)}]}))
    assert plan is None and "  local-a: skipped, lacks tools" in text.splitlines()
    assert "refused: 400 context_length_exceeded" in text


def test_explain_cost_lines_of_the_cheapest_strategy(tmp_path: Path) -> None:
    p = load(tmp_path, """
        - name: cheap
          match: {models: [auto]}
          candidates: [big, local, small]
          strategy: cheapest
        """)
    text, plan = explain(p, route_input(p, "default", "auto", {"messages": [{"role": "user", "content": "hello"}],
                                                               "max_tokens": 1000}))
    assert plan is not None and plan.prompt_tokens is not None
    n = plan.prompt_tokens
    # USD per million tokens (input, output); local's come from $3.6 per GPU hour at 1000 output tokens/s
    # (and 10x that for input): $1 and $0.1 per million tokens
    prices = {"local-a": ("0.1", "1"), "small-a": ("1", "2"), "big-a": ("10", "30"), "big-b": ("10", "30")}
    expected = [f"  {d}: estimated ${(n * Decimal(i) + 1000 * Decimal(o)) / 10**6:.6f} for {n} in + 1000 out tokens"
                for d, (i, o) in prices.items()]
    lines = text.splitlines()
    start = lines.index("candidates:") + 1
    assert lines[start:start + 4] == expected
    assert "order (cheapest): local-a, small-a, big-a, big-b" in lines
    # without max_tokens, the rule's expected_output_tokens (default 256) is the output estimate
    text, _ = explain(p, route_input(p, "default", "auto", {"messages": [{"role": "user", "content": "hello"}]}))
    assert f"  small-a: estimated ${(n + 256 * 2) / Decimal(10**6):.6f} for {n} in + 256 out tokens" in text


def test_explain_shows_cooled_down_candidates_last(tmp_path: Path) -> None:
    p = load(tmp_path, "- {name: r, match: {models: [auto]}, candidates: [small, big]}")
    inp = route_input(p, "default", "auto", {"messages": [{"role": "user", "content": "hi"}]})
    text, plan = explain(p, inp, HealthView(cooled=frozenset({"small-a"})))
    assert plan is not None and plan.candidates[-1].id == "small-a"
    assert "order (fallback): big-a, big-b, small-a [cooled down]" in text.splitlines()
    assert "decision: route r, first deployment big-a" in text
    text, _ = explain(p, inp)                              # offline, without health data: all count as healthy
    assert "order (fallback): small-a, big-a, big-b" in text.splitlines() and "[cooled down]" not in text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parent.parent))


@pytest.mark.e2e
def test_gateway_route_and_check_commands(tmp_path: Path) -> None:
    load(tmp_path, RULES)
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
    out = run_cli("route", "--config", str(tmp_path), "--file", str(request), "--header", "x-gateway-tags:batch")
    assert out.returncode == 0, out.stderr
    assert "rule by-tag" in out.stdout and "decision: route by-tag, first deployment local-a" in out.stdout
    out = run_cli("route", "--config", str(tmp_path), "--model", "nope")
    assert out.returncode == 1 and "404 model_not_found" in out.stdout
    out = run_cli("route", "--config", str(tmp_path), "--team", "legal", "--model", "big")
    assert out.returncode == 0, out.stderr
    assert "request: team legal, model big" in out.stdout and "rule by-team" in out.stdout
    assert "decision: route by-team, first deployment local-a" in out.stdout
    (tmp_path / "teams.yaml").write_text(textwrap.dedent(TEAMS))
    out = run_cli("route", "--config", str(tmp_path), "--team", "interns", "--file", str(request),
                  "--header", "x-gateway-tags:batch")
    assert out.returncode == 0, out.stderr
    assert "request: team interns, model auto" in out.stdout
    assert "decision: route by-tag, first deployment local-a" in out.stdout
    out = run_cli("route", "--config", str(tmp_path), "--team", "interns", "--model", "auto",
                  "--header", "x-tier:gold")
    assert out.returncode == 1, out.stdout                     # by-header sends auto to big: not for interns
    assert "big-a: skipped, team may not use model 'big'" in out.stdout
    assert "refused: 403 model_not_allowed" in out.stdout
    assert run_cli("check", "--config", str(tmp_path)).returncode == 0      # no cases: nothing to fail
    (tmp_path / "tests.yaml").write_text(textwrap.dedent("""
        tests:
          - {name: ok, model: auto, request: {messages: [{role: user, content: hi}]}, expect: {route: short}}
          - {name: mismatch, model: auto, file: req.json, expect: {deployment: big-a}}
        """))
    out = run_cli("check", "--config", str(tmp_path))
    assert out.returncode == 1 and "policy tests: 1 of 2 pass" in out.stdout
    assert "FAIL mismatch" in out.stdout and "expected deployment big-a" in out.stdout
    shipped = run_cli("check")
    assert shipped.returncode == 0 and "policy tests: 5 of 5 pass" in shipped.stdout


@pytest.mark.e2e
def test_messages_and_responses_requests_route_like_their_chat_translation(tmp_path: Path) -> None:
    """``gateway route --endpoint messages|responses`` and policy cases with those endpoints."""
    from gateway.api.shapes import routing_shape
    from gateway.routing.explain import run_cases
    p = load(tmp_path, RULES)
    messages = {"model": "auto", "max_tokens": 100, "system": [{"type": "text", "text": "be brief"}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    text, plan = explain(p, route_input(p, "default", "auto", messages, "messages", {"x-gateway-tags": "batch"},
                                        shape=routing_shape))
    assert plan is not None and plan.route == "by-tag" and "endpoint chat" in text
    responses = {"model": "auto", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
    _, plan = explain(p, route_input(p, "default", "auto", responses, "responses", shape=routing_shape))
    assert plan is not None and plan.route == "short"
    (tmp_path / "tests.yaml").write_text(textwrap.dedent("""
        tests:
          - {name: msg, model: auto, endpoint: messages, expect: {route: short},
             request: {max_tokens: 5, messages: [{role: user, content: hi}]}}
          - {name: resp, model: auto, endpoint: responses, expect: {route: short}, request: {input: hi}}
        """))
    results = run_cases(load_policies(str(tmp_path)), routing_shape)
    assert [r.ok for r in results] == [True, True], [r.line() for r in results]
    out = run_cli("route", "--config", str(tmp_path), "--endpoint", "messages", "--model", "auto")
    assert out.returncode == 0, out.stdout + out.stderr
