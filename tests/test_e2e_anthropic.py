"""OpenAI SDK → gateway process → litellm → a mock Anthropic Messages API, with cache-token pricing."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import openai
import pytest
from mock_anthropic import MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401  (fixtures)

from conftest import Server, start_gateway, stop

pytestmark = pytest.mark.e2e   # starts a gateway process

# $3 in, $15 out, $0.30 cache read, $3.75 5-minute write, $6 1-hour write per Mtok, in nano-USD per token
IN, OUT, READ, WRITE_5M, WRITE_1H = 3000, 15000, 300, 3750, 6000


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_anthropic_server: MockAnthropic) -> Iterator[Server]:  # noqa: F811
    policy_dir = tmp_path_factory.mktemp("anthropic")
    (policy_dir / "models.yaml").write_text(textwrap.dedent(f"""
        models:
          claude:
            deployments:
              - provider: anthropic
                model: claude-3-5-haiku-20241022
                api_base: {mock_anthropic_server.url}
                api_key_env: TEST_ANTHROPIC_KEY
                headers: {{x-mock-cache-read: "40", x-mock-cache-write-5m: "30", x-mock-cache-write-1h: "20"}}
                price:
                  input_per_mtok: 3
                  output_per_mtok: 15
                  cache_read_per_mtok: 0.30
                  cache_write_per_mtok: 3.75
                  cache_write_1h_per_mtok: 6
        """))
    server = start_gateway(policy_dir, policy_dir / "gateway.log", env={"TEST_ANTHROPIC_KEY": "sk-ant-test"})
    yield server
    stop(server.proc)


def expected_nano(completion_tokens: int) -> int:
    return 25 * IN + 40 * READ + 30 * WRITE_5M + 20 * WRITE_1H + completion_tokens * OUT


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)


def test_non_streaming_translation_and_cache_cost(gw: Server, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude", max_tokens=100,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
        tools=tools)
    reply = raw.parse()
    sent = mock_anthropic.last
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test"
    system = sent.body["system"]
    assert "Be brief." in (system if isinstance(system, str) else system[0]["text"])
    assert sent.body["messages"][0]["role"] == "user"
    assert sent.body["tools"][0]["name"] == "weather" and "input_schema" in sent.body["tools"][0]
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "weather" and reply.choices[0].finish_reason == "tool_calls"
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens == 25 + 40 + 50
    assert usage.model_extra["cost_usd"] == pytest.approx(expected_nano(usage.completion_tokens) / 1e9, abs=0)
    assert raw.headers["x-gateway-provider"] == "anthropic"
    assert int(round(float(raw.headers["x-gateway-cost-usd"]) * 1e9)) == expected_nano(usage.completion_tokens)


def test_streaming_translation_and_cache_cost(gw: Server, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    chunks = list(client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Hello"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock Anthropic API."
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.prompt_tokens == 115
    assert int(round(usage.model_extra["cost_usd"] * 1e9)) == expected_nano(usage.completion_tokens)


def test_anthropic_errors_through_gateway(gw: Server, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(status=429, retry_after="3")
    with pytest.raises(openai.RateLimitError) as err:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert err.value.response.headers.get("retry-after") == "3"
    mock_anthropic.set(status=500)
    with pytest.raises(openai.APIStatusError) as err2:
        client(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert err2.value.status_code == 502
