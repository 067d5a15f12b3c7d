"""The real coding clients through the gateway: Claude Code on ``/v1/messages``, Codex on ``/v1/responses``.

A session fixture installs ``@anthropic-ai/claude-code`` and ``@openai/codex`` (pinned; their
native binaries ship inside the registry packages) with ``npm install --prefix`` into a cache
directory reused across runs (``~/.cache/llm-gateway-tests``), and skips with the reason when npm
or its registry cannot be reached. One gateway process serves the module, on a private Redis
(so every ledger record can be read back one by one) with a master key (virtual keys are created
through the admin API). Each client runs with ``HOME``, ``CLAUDE_CONFIG_DIR`` and ``CODEX_HOME``
in this test's temporary directory, never the user's own, and with a timeout after which its
process group is killed by PID. Upstreams: the loopback Messages mock (``tests/mock_anthropic.py``,
told to answer in text, or to call Claude Code's Read tool once), the Responses mock
(``tests/mock_responses.py``), the chat-only mock (``bench/mock_upstream.py``) and the simulated
model, the last two through translation. Checked: the answer the client prints, tool round trips,
one ledger record per upstream call (and one access line per client request), each priced to the
nano-dollar from the mock's usage and the policy's prices, the upstream key substituted for the
virtual key, and a budget refusal the client reports as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from mock_anthropic import SIGNATURE, MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401
from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401
from mock_upstream import chat_prompt_tokens
from redis.asyncio import Redis

from conftest import Server, start_gateway, stop
from gateway.state.ledger import LedgerRecord, RedisLedger

pytestmark = pytest.mark.e2e

CLAUDE_CODE = ("@anthropic-ai/claude-code", "2.1.332", "claude")
CODEX = ("@openai/codex", "0.171.0", "codex")
MASTER = "sk-clients-e2e-master"
ANTHROPIC_UPSTREAM_KEY = "sk-ant-upstream-clients-e2e"
OPENAI_UPSTREAM_KEY = "sk-openai-upstream-clients-e2e"
DB = 11                 # this module's logical database on the session's private redis-server
CLIENT_TIMEOUT_S = 45   # one client run; its process group is killed when it overruns
NPM_VIEW_TIMEOUT_S = 30
NPM_INSTALL_TIMEOUT_S = 300

# pico-USD per token, the policy's prices below: $3 in and $15 out per Mtok (claude-gw; its cache reads and
# writes are priced too, worked out by hand in the test), $2 in, $8 out and $0.50 cached in (gpt-gw, gpt-chat),
# $1 in and $2 out (the simulated model)
A_IN, A_OUT = 3_000_000, 15_000_000
O_IN, O_OUT, O_CACHED = 2_000_000, 8_000_000, 500_000
SIM_IN, SIM_OUT = 1_000_000, 2_000_000

POLICY = """\
models:
  claude-gw:
    deployments:
      - provider: anthropic
        name: anthropic-mock
        model: claude-sonnet-4-5
        api_base: {anthropic}
        api_key_env: CLIENTS_E2E_ANTHROPIC_KEY
        price: {{input_per_mtok: 3, output_per_mtok: 15, cache_read_per_mtok: 0.3, cache_write_per_mtok: 3.75,
                cache_write_1h_per_mtok: 6}}
  gpt-gw:
    deployments:
      - provider: openai
        name: responses-mock
        model: gpt-mock
        api_base: {responses}/v1
        api_key_env: CLIENTS_E2E_OPENAI_KEY
        price: {{input_per_mtok: 2, output_per_mtok: 8, cache_read_per_mtok: 0.5}}
  gpt-chat:
    deployments:
      - provider: openai
        name: chat-mock
        model: mock-cached40-reasoning7-chunks5
        api_base: {chat}/v1
        apis: [chat]
        api_key_env: CLIENTS_E2E_OPENAI_KEY
        price: {{input_per_mtok: 2, output_per_mtok: 8, cache_read_per_mtok: 0.5}}
  claude-chat:
    deployments:
      - provider: openai
        name: chat-mock-for-claude
        model: mock-cached40-chunks5
        api_base: {chat}/v1
        apis: [chat]
        api_key_env: CLIENTS_E2E_OPENAI_KEY
        price: {{input_per_mtok: 2, output_per_mtok: 8, cache_read_per_mtok: 0.5}}
  local:
    deployments:
      - provider: simulated
        name: local-sim
        price: {{input_per_mtok: 1, output_per_mtok: 2}}
teams:        # one per test, so each reads back only its own ledger records
  claude-native: {{}}
  claude-tools: {{}}
  claude-local: {{}}
  claude-chat: {{}}
  codex-native: {{}}
  codex-local: {{}}
  codex-chat: {{}}
  claude-broke:
    budgets: [{{period: daily, usd: 0.000001}}]
  codex-broke:
    budgets: [{{period: daily, usd: 0.000001}}]
  codex-broke-retrying:
    budgets: [{{period: daily, usd: 0.000001}}]
"""


def nano_of(pico: int) -> int:
    return (pico + 500) // 1000


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit status {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_bounded(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Run | None:
    """Run ``cmd`` in its own process group; None when it overran ``timeout`` (the group is then killed).
    Whatever it left running in its group after it exits is ended too (by the group's id, its PID)."""
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return Run(proc.returncode, out, err)


def run_client(cmd: list[str], env: dict[str, str], cwd: Path) -> Run:
    result = run_bounded(cmd, env, cwd, CLIENT_TIMEOUT_S)
    if result is None:
        pytest.fail(f"{Path(cmd[0]).name} ran longer than {CLIENT_TIMEOUT_S}s and was killed: {cmd[1:]}")
    return result


# ---------------------------------------------------------------------------------------------- install
@dataclass(frozen=True)
class Clients:
    claude: Path
    codex: Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-gateway-tests"


def _installed_version(prefix: Path, package: str) -> str | None:
    try:
        return str(json.loads((prefix / "node_modules" / package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time across concurrent test sessions sharing the cache."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _runs(binary: Path, version: str, env: dict[str, str], cwd: Path) -> Run | None:
    """``binary --version`` when it names ``version``, else None."""
    if not binary.exists():
        return None
    with contextlib.suppress(OSError):     # e.g. a placeholder its package's postinstall did not replace
        probe = run_bounded([str(binary), "--version"], env, cwd, 30)
        if probe is not None and probe.returncode == 0 and version in probe.stdout:
            return probe
    return None


class ClientsUnavailable(Exception):
    """Why the coding clients cannot be installed here (the tests that need them skip with it)."""


def npm_env(cache: Path, **settings: str) -> dict[str, str]:
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false",
               npm_config_cache=str(cache), npm_config_fetch_retries="1", npm_config_fetch_timeout="20000")
    env.update(settings)
    return env


def install_clients(prefix: Path, env: dict[str, str]) -> Clients:
    """Claude Code and Codex at their pinned versions in ``prefix`` (installed there unless they already run):
    a short ``npm view`` of each first, then ``npm install --prefix``; every step bounded."""
    packages = (CLAUDE_CODE, CODEX)
    prefix.mkdir(parents=True, exist_ok=True)
    binaries = [prefix / "node_modules" / ".bin" / name for _, _, name in packages]

    def ready() -> bool:
        return all(_installed_version(prefix, p) == v and _runs(b, v, env, prefix) is not None
                   for (p, v, _), b in zip(packages, binaries, strict=True))

    with _locked(prefix / ".install.lock"):
        if ready():
            return Clients(*binaries)
        npm = shutil.which("npm", path=env.get("PATH"))
        if npm is None:
            raise ClientsUnavailable("npm is not on the PATH: cannot install Claude Code and Codex")
        for package, version, _ in packages:
            view = run_bounded([npm, "view", f"{package}@{version}", "version"], env, prefix, NPM_VIEW_TIMEOUT_S)
            if view is None or view.returncode != 0 or view.stdout.strip() != version:
                detail = f"timed out after {NPM_VIEW_TIMEOUT_S}s" if view is None else \
                    (view.stderr.strip() or view.stdout.strip())[-300:]
                raise ClientsUnavailable(f"the npm registry is unreachable or lacks {package}@{version} "
                                         f"(npm view: {detail})")
        shutil.rmtree(prefix / "node_modules", ignore_errors=True)   # a fresh install runs the postinstalls
        install = run_bounded([npm, "install", "--prefix", str(prefix), *(f"{p}@{v}" for p, v, _ in packages)],
                              env, prefix, NPM_INSTALL_TIMEOUT_S)
        if install is None or install.returncode != 0:
            detail = f"timed out after {NPM_INSTALL_TIMEOUT_S}s" if install is None else install.stderr[-500:]
            raise ClientsUnavailable(f"npm install of the coding clients failed: {detail}")
        if not ready():
            raise ClientsUnavailable(f"Claude Code {CLAUDE_CODE[1]} and Codex {CODEX[1]} are installed in {prefix}, "
                                     f"but a binary does not run on this platform ({install.stderr[-300:]})")
    return Clients(*binaries)


@pytest.fixture(scope="session")
def coding_clients() -> Clients:
    """The clients, installed once into the cache directory and reused across runs; a skip says why not."""
    name = "npm-" + "-".join(f"{p.split('/')[-1]}-{v}" for p, v, _ in (CLAUDE_CODE, CODEX))
    try:
        return install_clients(cache_root() / name, npm_env(cache_root() / "npm-cache"))
    except ClientsUnavailable as exc:
        pytest.skip(str(exc))


def test_install_says_why_without_npm(tmp_path: Path) -> None:
    env = npm_env(tmp_path / "cache", PATH=str(tmp_path / "empty-bin"))
    with pytest.raises(ClientsUnavailable, match="npm is not on the PATH"):
        install_clients(tmp_path / "prefix", env)


def test_install_says_why_when_the_registry_is_unreachable(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not on the PATH")
    with socket.socket() as s:      # a loopback port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = npm_env(tmp_path / "cache", npm_config_registry=f"http://127.0.0.1:{closed}/", npm_config_fetch_retries="0")
    with pytest.raises(ClientsUnavailable, match="registry is unreachable") as refused:
        install_clients(tmp_path / "prefix", env)
    assert CLAUDE_CODE[0] in str(refused.value)
    assert not (tmp_path / "prefix" / "node_modules").exists()


# ---------------------------------------------------------------------------------------------- gateway
@dataclass
class Gateway:
    server: Server
    redis_port: int

    def key(self, team: str) -> str:
        reply = httpx.post(f"{self.server.url}/admin/keys", headers={"Authorization": f"Bearer {MASTER}"},
                           json={"team": team, "name": "coding-client"}, timeout=30)
        assert reply.status_code == 201, reply.text
        return str(reply.json()["secret"])

    def records(self, team: str, since: float, expect: int, timeout: float = 10.0) -> list[LedgerRecord]:
        """The team's ledger records since ``since``, once ``expect`` are written (a short wait for more
        shows any extra record)."""
        async def read() -> list[LedgerRecord]:
            client = Redis(host="127.0.0.1", port=self.redis_port, db=DB)
            try:
                ledger = RedisLedger(client)
                deadline = time.monotonic() + timeout
                while True:
                    records = await ledger.read(since, team=team)
                    if len(records) >= expect or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)    # the writer flushes every 0.1 s: a record beyond those expected shows
                return await ledger.read(since, team=team)
            finally:
                await client.aclose()
        return asyncio.run(read())

    def access(self, team: str, expect: int) -> list[dict[str, str]]:
        """The gateway's access lines for ``team`` (one per request it answered, whatever the outcome), once
        ``expect`` of them are out (access lines are written in batches), or after 15 s."""
        deadline = time.monotonic() + 15
        while True:
            lines = [line.split("gateway.access: ", 1)[1] for line in self.server.output().splitlines()
                     if "gateway.access: " in line]
            fields = [dict(part.split("=", 1) for part in line.split() if "=" in part) for line in lines]
            mine = [f for f in fields if f.get("team") == team]
            if len(mine) >= expect or time.monotonic() > deadline:
                return mine
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway_for_clients(tmp_path_factory: pytest.TempPathFactory, redis_port: int,
                        mock_anthropic_server: MockAnthropic,  # noqa: F811
                        mock_responses_server: MockResponses,  # noqa: F811
                        mock_upstream: str) -> Iterator[Gateway]:
    flush = redis.Redis(host="127.0.0.1", port=redis_port, db=DB)
    flush.flushdb()
    flush.close()
    root = tmp_path_factory.mktemp("clients-gateway")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "models.yaml").write_text(textwrap.dedent(POLICY.format(
        anthropic=mock_anthropic_server.url, responses=mock_responses_server.url, chat=mock_upstream)))
    server = start_gateway(policy_dir, root / "gateway.log", {
        "GATEWAY_MASTER_KEY": MASTER, "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{DB}",
        "CLIENTS_E2E_ANTHROPIC_KEY": ANTHROPIC_UPSTREAM_KEY, "CLIENTS_E2E_OPENAI_KEY": OPENAI_UPSTREAM_KEY})
    try:
        yield Gateway(server, redis_port)
    finally:
        stop(server.proc)


def base_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment with nothing of the user's but PATH: HOME and the working directory are fresh."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "TERM": "dumb", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    return env, work


# ---------------------------------------------------------------------------------------------- Claude Code
def claude(clients: Clients, gw: Gateway, tmp_path: Path, key: str, model: str, prompt: str,
           *args: str) -> Run:
    env, work = base_env(tmp_path)
    env.update({
        "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"),
        "ANTHROPIC_BASE_URL": gw.server.url,
        "ANTHROPIC_API_KEY": key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "ANTHROPIC_SMALL_FAST_MODEL": model,       # any background call goes to a model the gateway knows
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
    })
    return run_client([str(clients.claude), "-p", prompt, "--model", model, *args], env, work)


def test_claude_code_native_answer_ledger_and_cost(coding_clients: Clients, gateway_for_clients: Gateway,
                                                   mock_anthropic: MockAnthropic,  # noqa: F811
                                                   tmp_path: Path) -> None:
    gw = gateway_for_clients
    mock_anthropic.set(tool="off", input=25, cache_read=1000, cache_write_5m=200, cache_write_1h=100, output=7,
                       text="Four, said the mock.")
    key = gw.key("claude-native")
    since = time.time() - 1
    result = claude(coding_clients, gw, tmp_path, key, "claude-gw", "What is 2 + 2?")
    assert result.returncode == 0, result
    assert result.stdout.strip() == "Four, said the mock.", result
    calls = [r for r in mock_anthropic.requests if r.path.split("?")[0] == "/v1/messages"]
    assert calls, result
    for call in calls:   # the virtual key never reaches the upstream; the client's own fields do
        assert call.headers["x-api-key"] == ANTHROPIC_UPSTREAM_KEY and key not in json.dumps(call.headers)
        assert call.body["model"] == "claude-sonnet-4-5" and call.body["stream"] is True
        assert call.headers["anthropic-version"] and call.body["tools"] and isinstance(call.body["system"], list)
    records = gw.records("claude-native", since, len(calls))
    assert len(records) == len(calls), (records, result)
    # no other request failed
    assert [a["status"] for a in gw.access("claude-native", len(calls))] == ["ok"] * len(calls)
    # by hand, in nano-USD: 25 in x 3000 + 1000 cache reads x 300 + 200 5-minute writes x 3750
    # + 100 1-hour writes x 6000 + 7 out x 15000 = 75,000 + 300,000 + 750,000 + 600,000 + 105,000
    cost = 1_830_000
    for record in records:
        assert (record.status, record.requested_model, record.deployment, record.provider, record.stream) == \
            ("ok", "claude-gw", "anthropic-mock", "anthropic", True)
        assert (record.input_tokens, record.cached_input_tokens, record.cache_write_tokens, record.output_tokens) \
            == (1325, 1000, 300, 7)
        assert record.cost_nano == cost


def test_claude_code_tool_round_trip_with_thinking(coding_clients: Clients, gateway_for_clients: Gateway,
                                                   mock_anthropic: MockAnthropic,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """The mock asks Claude Code to Read a file in its working directory, after a signed thinking block; Claude
    Code runs the tool and sends its result (and the thinking block, signature intact) back through the gateway."""
    gw = gateway_for_clients
    note = tmp_path / "work" / "note.txt"
    note.parent.mkdir()
    secret = f"the note's secret is {uuid.uuid4().hex}"
    note.write_text(secret + "\n")
    mock_anthropic.set(tool="Read", tool_input=json.dumps({"file_path": str(note)}), thinking="Read the note first.",
                       input=40, output=9, text="The note has been read.")
    result = claude(coding_clients, gw, tmp_path, gw.key("claude-tools"), "claude-gw", "What does note.txt say?",
                    "--output-format", "json")
    assert result.returncode == 0, result
    summary = json.loads(result.stdout)
    assert (summary["result"], summary["is_error"], summary["num_turns"]) == ("The note has been read.", False, 2)
    calls = [r for r in mock_anthropic.requests if r.path.split("?")[0] == "/v1/messages"]
    assert len(calls) == 2, result
    *_, assistant, user = calls[1].body["messages"]
    assert [b["type"] for b in assistant["content"]] == ["thinking", "tool_use"]
    assert assistant["content"][0]["signature"] == SIGNATURE and assistant["content"][0]["thinking"]
    assert assistant["content"][1]["id"] == "toolu_mock_01" and assistant["content"][1]["name"] == "Read"
    [tool_result] = [b for b in user["content"] if b.get("type") == "tool_result"]
    assert tool_result["tool_use_id"] == "toolu_mock_01" and not tool_result.get("is_error")
    assert secret in json.dumps(tool_result["content"])
    records = gw.records("claude-tools", time.time() - 120, 2)
    assert [a["status"] for a in gw.access("claude-tools", 2)] == ["ok", "ok"]
    assert [(r.status, r.input_tokens, r.output_tokens, r.cost_nano) for r in records] == \
        [("ok", 40, 9, nano_of(40 * A_IN + 9 * A_OUT))] * 2
    seen = summary["modelUsage"]["claude-gw"]     # the usage Claude Code read from the streams is the ledger's
    assert (seen["inputTokens"], seen["outputTokens"]) == (sum(r.input_tokens for r in records),
                                                           sum(r.output_tokens for r in records))


def test_claude_code_reports_a_budget_refusal(coding_clients: Clients, gateway_for_clients: Gateway,
                                              mock_anthropic: MockAnthropic,  # noqa: F811
                                              tmp_path: Path) -> None:
    gw = gateway_for_clients
    mock_anthropic.set(tool="off")
    since = time.time() - 1
    result = claude(coding_clients, gw, tmp_path, gw.key("claude-broke"), "claude-gw", "What is 2 + 2?")
    assert result.returncode != 0, result
    assert "429" in result.stdout and "budget_exceeded" in result.stdout, result     # Claude Code shows the
    assert "The daily budget of team 'claude-broke'" in result.stdout, result        # gateway's code and message
    assert mock_anthropic.requests == []        # refused before any upstream call
    records = gw.records("claude-broke", since, 1)
    assert [a["status"] for a in gw.access("claude-broke", 1)] == ["budget_exceeded"]
    assert [(r.status, r.cost_nano, r.requested_model) for r in records] == [("budget_exceeded", 0, "claude-gw")]


def test_claude_code_on_the_simulated_model_through_translation(coding_clients: Clients,
                                                                 gateway_for_clients: Gateway,
                                                                 tmp_path: Path) -> None:
    gw = gateway_for_clients
    team_key = gw.key("claude-local")
    since = time.time() - 1
    result = claude(coding_clients, gw, tmp_path, team_key, "local", "Say hello.")
    assert result.returncode == 0, result
    assert result.stdout.strip(), result
    records = gw.records("claude-local", since, 1)
    assert records, result
    # every request the client sent
    assert [a["status"] for a in gw.access("claude-local", len(records))] == ["ok"] * len(records)
    for record in records:
        assert (record.status, record.requested_model, record.provider) == ("ok", "local", "simulated")
        assert record.input_tokens > 0 and record.output_tokens > 0
        assert record.cost_nano == nano_of(record.input_tokens * SIM_IN + record.output_tokens * SIM_OUT)


def test_claude_code_through_translation_to_a_chat_only_upstream(coding_clients: Clients,
                                                                  gateway_for_clients: Gateway,
                                                                  mock_reset: str, tmp_path: Path) -> None:
    """Claude Code's Messages requests become chat completions; the mock calls Claude Code's first tool with
    input it refuses (a tool_use translated from tool_calls), Claude Code sends the refusal as a tool_result (a
    tool message upstream), the mock answers in text. Each record's tokens are the mock's own count."""
    gw = gateway_for_clients
    result = claude(coding_clients, gw, tmp_path, gw.key("claude-chat"), "claude-chat", "What is 2 + 2?",
                    "--output-format", "json")
    assert result.returncode == 0, result
    summary = json.loads(result.stdout)
    assert summary["result"].strip() and not summary["is_error"] and summary["num_turns"] == 2, result
    calls = [r for r in httpx.get(f"{mock_reset}/_requests", timeout=10).json()
             if r["path"].endswith("/chat/completions")]
    assert len(calls) == 2, result
    first, second = (c["body"] for c in calls)
    assert first["model"] == "mock-cached40-chunks5" and first["stream"] is True and first["tools"]
    assert first["messages"][0]["role"] == "system"
    assert any("What is 2 + 2?" in json.dumps(m["content"]) for m in first["messages"] if m["role"] == "user")
    [tool_call] = second["messages"][-2]["tool_calls"]
    assert (tool_call["function"]["name"], json.loads(tool_call["function"]["arguments"])) == \
        (first["tools"][0]["function"]["name"], {"q": "mock"})
    assert second["messages"][-1]["role"] == "tool" and second["messages"][-1]["tool_call_id"] == tool_call["id"]
    records = gw.records("claude-chat", time.time() - 120, 2)
    assert [a["status"] for a in gw.access("claude-chat", 2)] == ["ok", "ok"]
    # the mock: a tool call costs 16 completion tokens, a stream of text 5 chunks
    expected = [(chat_prompt_tokens(body["messages"]), 40, completion)
                for body, completion in ((first, 16), (second, 5))]
    assert [(r.input_tokens, r.cached_input_tokens, r.output_tokens) for r in records] == expected
    assert [r.cost_nano for r in records] == [nano_of((prompt - 40) * O_IN + 40 * O_CACHED + out * O_OUT)
                                             for prompt, _, out in expected]
    seen = summary["modelUsage"]["claude-chat"]   # what Claude Code read: uncached input apart from cache reads
    assert (seen["inputTokens"] + seen["cacheReadInputTokens"], seen["cacheReadInputTokens"], seen["outputTokens"]) \
        == (sum(e[0] for e in expected), 80, 21)


# ---------------------------------------------------------------------------------------------- Codex
def codex(clients: Clients, gw: Gateway, tmp_path: Path, key: str, model: str, prompt: str,
          retries: bool = False) -> Run:
    """``codex exec`` with a provider block for the gateway (no retries unless ``retries``: Codex's defaults)."""
    env, work = base_env(tmp_path)
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    no_retries = "" if retries else "request_max_retries = 0\nstream_max_retries = 0\n"
    (codex_home / "config.toml").write_text(textwrap.dedent(f"""\
        model = "{model}"
        model_provider = "gateway"

        [model_providers.gateway]
        name = "LLM gateway"
        base_url = "{gw.server.url}/v1"
        env_key = "GATEWAY_VIRTUAL_KEY"
        wire_api = "responses"
        """) + no_retries)
    env.update({"CODEX_HOME": str(codex_home), "GATEWAY_VIRTUAL_KEY": key})
    return run_client([str(clients.codex), "exec", "--skip-git-repo-check", prompt], env, work)


def test_codex_native_answer_ledger_and_cost(coding_clients: Clients, gateway_for_clients: Gateway,
                                             mock_responses: MockResponses,  # noqa: F811
                                             tmp_path: Path) -> None:
    gw = gateway_for_clients
    text = f"Four, said the mock {uuid.uuid4().hex[:6]}."
    mock_responses.set(input=1000, cached=600, output=50, reasoning=20, text=text)
    key = gw.key("codex-native")
    since = time.time() - 1
    result = codex(coding_clients, gw, tmp_path, key, "gpt-gw", "What is 2 + 2?")
    assert result.returncode == 0, result
    assert result.stdout.strip() == text, result
    calls = [r for r in mock_responses.requests if r.path == "/v1/responses"]
    assert calls and len(calls) == len(mock_responses.requests), result
    for call in calls:
        assert call.headers["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}" and key not in json.dumps(call.headers)
        assert call.body["model"] == "gpt-mock" and call.body["stream"] is True and call.body["store"] is False
    # the mock calls Codex's first function tool with arguments Codex refuses; Codex sends the refusal back
    # as a function_call_output, and the mock answers that in text
    assert [item.get("type") for item in calls[-1].body["input"]].count("function_call_output") == len(calls) - 1
    records = gw.records("codex-native", since, len(calls))
    assert len(records) == len(calls), (records, result)
    # no other request failed
    assert [a["status"] for a in gw.access("codex-native", len(calls))] == ["ok"] * len(calls)
    # by hand, in nano-USD: 400 uncached in x 2000 + 600 cached x 500 + (50 + 20 reasoning) out x 8000
    # = 800,000 + 300,000 + 560,000
    cost = 1_660_000
    for record in records:
        assert (record.status, record.requested_model, record.deployment, record.provider, record.stream) == \
            ("ok", "gpt-gw", "responses-mock", "openai", True)
        assert (record.input_tokens, record.cached_input_tokens, record.output_tokens, record.reasoning_tokens) \
            == (1000, 600, 70, 20)
        assert record.cost_nano == cost


def test_codex_on_the_simulated_model_through_translation(coding_clients: Clients, gateway_for_clients: Gateway,
                                                          tmp_path: Path) -> None:
    gw = gateway_for_clients
    since = time.time() - 1
    result = codex(coding_clients, gw, tmp_path, gw.key("codex-local"), "local", "Say hello.")
    assert result.returncode == 0, result
    assert result.stdout.strip(), result
    records = gw.records("codex-local", since, 1)
    assert records, result
    # every request the client sent
    assert [a["status"] for a in gw.access("codex-local", len(records))] == ["ok"] * len(records)
    for record in records:
        assert (record.status, record.requested_model, record.provider) == ("ok", "local", "simulated")
        assert record.input_tokens > 0 and record.output_tokens > 0
        assert record.cost_nano == nano_of(record.input_tokens * SIM_IN + record.output_tokens * SIM_OUT)


def test_codex_through_translation_to_a_chat_only_upstream(coding_clients: Clients, gateway_for_clients: Gateway,
                                                            mock_reset: str, tmp_path: Path) -> None:
    """Codex's Responses requests become chat completions for a deployment without ``responses`` in its
    ``apis``; the mock calls Codex's first tool (arguments Codex refuses), Codex answers with the refusal as a
    function_call_output (a tool message upstream), the mock answers in text. Each record's tokens are the mock's
    own count of the request it got, cached and reasoning tokens priced apart."""
    gw = gateway_for_clients
    result = codex(coding_clients, gw, tmp_path, gw.key("codex-chat"), "gpt-chat", "What is 2 + 2?")
    assert result.returncode == 0, result
    assert result.stdout.strip(), result
    calls = [r for r in httpx.get(f"{mock_reset}/_requests", timeout=10).json()
             if r["path"].endswith("/chat/completions")]
    assert len(calls) == 2, result
    first, second = (c["body"] for c in calls)
    assert first["model"] == "mock-cached40-reasoning7-chunks5" and first["stream"] is True and first["tools"]
    assert first["messages"][-1]["role"] == "user" and second["messages"][-1]["role"] == "tool"
    assert all(c["headers"]["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}" for c in calls)
    records = gw.records("codex-chat", time.time() - 120, 2)
    assert [a["status"] for a in gw.access("codex-chat", 2)] == ["ok", "ok"]
    # the mock: a tool call costs 16 completion tokens, a stream of text 5 chunks; both plus 7 reasoning
    expected = [(chat_prompt_tokens(body["messages"]), 40, completion + 7, 7)
                for body, completion in ((first, 16), (second, 5))]
    assert [(r.input_tokens, r.cached_input_tokens, r.output_tokens, r.reasoning_tokens) for r in records] == expected
    assert [r.cost_nano for r in records] == [nano_of((prompt - 40) * O_IN + 40 * O_CACHED + out * O_OUT)
                                             for prompt, _, out, _ in expected]
    assert all((r.status, r.deployment, r.provider) == ("ok", "chat-mock", "openai") for r in records)


@pytest.mark.parametrize("retries", [False, True], ids=["no-retries", "codex-default-retries"])
def test_codex_reports_a_budget_refusal(coding_clients: Clients, gateway_for_clients: Gateway,
                                        mock_responses: MockResponses,  # noqa: F811
                                        tmp_path: Path, retries: bool) -> None:
    """Refused at once, and final: even with its default retries Codex asks only once."""
    gw = gateway_for_clients
    team = "codex-broke-retrying" if retries else "codex-broke"
    since = time.time() - 1
    result = codex(coding_clients, gw, tmp_path, gw.key(team), "gpt-gw", "What is 2 + 2?", retries=retries)
    assert result.returncode != 0, result
    # the gateway's OpenAI error type insufficient_quota, which Codex renders in its own words
    assert "ERROR: Quota exceeded" in result.stderr, result
    assert mock_responses.requests == []
    records = gw.records(team, since, 1)
    assert [a["status"] for a in gw.access(team, 1)] == ["budget_exceeded"]
    assert [(r.status, r.cost_nano, r.requested_model) for r in records] == [("budget_exceeded", 0, "gpt-gw")]
