"""Offline token counting (gateway.tokens) against real tiktoken encodings and the OpenAI cookbook."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
import tiktoken

from gateway import tokens
from gateway.tokens import count_chat, count_completion_text, count_prompt, count_text, encoding_name_for

ROOT = Path(__file__).resolve().parent.parent

# The cookbook "How_to_count_tokens_with_tiktoken" example. The last message is the cookbook's own text
# ("... for the client deliverable."); the counts it reports from the API are 129 (cl100k) and 124 (o200k).
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {"role": "system",
     "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user",
     "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]

# The cookbook's tools example (section 7): the API reported 105 (gpt-3.5-turbo, gpt-4) and 101 (gpt-4o, -mini).
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
WEATHER_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def n(encoding: str, text: str) -> int:
    return len(tiktoken.get_encoding(encoding).encode(text))


def tool(name: str, description: str = "Does a thing.", **props: str) -> dict[str, Any]:
    properties = {k: {"type": "string", "description": v} for k, v in props.items()}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties}}}


# --- offline encodings -------------------------------------------------------------------------------

def test_cache_dir_points_into_litellm() -> None:
    locations = importlib.util.find_spec("litellm").submodule_search_locations  # type: ignore[union-attr]
    package = Path(list(locations)[0]).resolve()  # type: ignore[arg-type]
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"]).resolve()
    assert cache == package / "litellm_core_utils" / "tokenizers"
    assert cache.is_relative_to(package)


@pytest.mark.e2e
def test_encodings_load_with_network_blocked() -> None:
    """A fresh interpreter with no cache dir set and every proxy pointing at a closed port loads all three."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    code = textwrap.dedent("""
        import sys
        from gateway import tokens
        assert "litellm" not in sys.modules, "gateway.tokens must not import litellm"
        for model in ("gpt-4o", "gpt-4", "text-davinci-003"):
            print(tokens.encoding_name_for(model), tokens.count_text("hello world", model))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["o200k_base", "2", "cl100k_base", "2", "p50k_base", "2"]


@pytest.mark.e2e
def test_litellm_provider_import_never_fetches_the_price_map() -> None:
    """Importing the litellm provider in a fresh interpreter, without LITELLM_LOCAL_MODEL_COST_MAP set and with
    every socket refused, makes no network attempt and leaves litellm's prices equal to its bundled file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM_LOCAL_")}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    code = textwrap.dedent("""
        import json, os, socket
        attempts = []

        def refuse(what):
            def blocked(*args, **kwargs):
                attempts.append(what)
                raise OSError("network blocked in this test")
            return blocked

        socket.socket.connect = refuse("connect")
        socket.socket.connect_ex = refuse("connect")
        socket.getaddrinfo = refuse("getaddrinfo")
        socket.create_connection = refuse("create_connection")
        import gateway.providers.litellm_provider  # noqa: F401
        import litellm
        path = os.path.join(os.path.dirname(litellm.__file__), "model_prices_and_context_window_backup.json")
        with open(path, encoding="utf-8") as fh:
            bundled = json.load(fh)
        cost = litellm.model_cost
        print(json.dumps({"attempts": attempts, "models": len(cost),
                          "not_bundled": sorted(set(cost) - set(bundled)),
                          "changed": sorted(k for k in cost if cost[k] != bundled.get(k)),
                          "dropped": sorted(set(bundled) - set(cost)),
                          "gpt-4o-mini": cost["gpt-4o-mini"]["input_cost_per_token"]}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []                        # no DNS lookup, no connection: nothing fetched
    assert report["models"] > 1000                         # populated ...
    assert report["not_bundled"] == [] and report["changed"] == []   # ... from the bundled file, entry for entry
    assert set(report["dropped"]) <= {"fallback_generalizations", "sample_spec"}   # non-model entries litellm pops
    assert report["gpt-4o-mini"] == 1.5e-07


def test_missing_encoding_falls_back_to_cl100k() -> None:
    assert tokens._encoding("r50k_base").name == "cl100k_base"   # r50k is not bundled with litellm


# --- encoding choice -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"), ("openai/gpt-4o", "o200k_base"),
    ("azure/gpt-4.1-mini", "o200k_base"), ("gpt-5-nano", "o200k_base"), ("o1-preview", "o200k_base"),
    ("o3-mini", "o200k_base"), ("o4-mini", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"),
    ("gpt-oss-120b", "o200k_base"), ("ft:gpt-4o-mini:acme::abc123", "o200k_base"), ("GPT-4O", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"), ("azure/gpt-35-turbo", "cl100k_base"),
    ("text-embedding-3-small", "cl100k_base"), ("openai/text-embedding-ada-002", "cl100k_base"),
    ("claude-3-5-sonnet-20241022", "cl100k_base"), ("anthropic/claude-sonnet-4", "cl100k_base"),
    ("llama-3.1-70b", "cl100k_base"), ("mistral-large", "cl100k_base"), ("who-knows", "cl100k_base"),
    ("", "cl100k_base"),
    ("text-davinci-003", "p50k_base"), ("text-davinci-002", "p50k_base"), ("code-davinci-002", "p50k_base"),
])
def test_encoding_name_for(model: str, encoding: str) -> None:
    assert encoding_name_for(model) == encoding


# --- text ------------------------------------------------------------------------------------------------

def test_count_text_matches_tiktoken() -> None:
    text = "The gateway routes every request to a model. お誕生日おめでとう"
    assert count_text(text, "gpt-4o") == n("o200k_base", text)
    assert count_text(text, "gpt-4") == n("cl100k_base", text)
    assert count_text(text, "text-davinci-003") == n("p50k_base", text)
    assert count_text("", "gpt-4o") == 0
    assert count_completion_text(text, "gpt-4o") == count_text(text, "gpt-4o")


def test_special_token_text_is_plain_text() -> None:
    text = "before <|endoftext|> after <|fim_prefix|>"
    expected = len(tiktoken.get_encoding("cl100k_base").encode(text, disallowed_special=()))
    assert count_text(text, "gpt-4") == expected > 1
    assert count_chat([{"role": "user", "content": text}], "gpt-4o") > 0
    assert count_prompt({"prompt": text}, "completions", "gpt-4") == expected


# --- chat: the cookbook ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124),
    ("gpt-3.5-turbo-0301", 127),   # the older cookbook run: 4 per message, -1 per name
])
def test_cookbook_example(model: str, expected: int) -> None:
    assert count_chat(COOKBOOK_MESSAGES, model) == expected


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_cookbook_example_by_hand(encoding: str) -> None:
    model = "gpt-4" if encoding == "cl100k_base" else "gpt-4o"
    total = 0
    for message in COOKBOOK_MESSAGES:
        total += 3                                                  # <|start|>{role/name}\n ... <|end|>\n
        total += n(encoding, message["role"]) + n(encoding, message["content"])
        if "name" in message:
            total += n(encoding, message["name"]) + 1              # tokens_per_name
    total += 3                                                      # <|start|>assistant<|message|>
    assert count_chat(COOKBOOK_MESSAGES, model) == total == {"cl100k_base": 129, "o200k_base": 124}[encoding]


def test_small_cases_by_hand() -> None:
    assert count_chat([{"role": "user", "content": "hello"}], "gpt-4o") == (
        3 + n("o200k_base", "user") + n("o200k_base", "hello") + 3)
    assert count_chat([], "gpt-4") == 3
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "bob", "content": "Hi there"},
        {"role": "assistant", "content": None},
    ]
    enc = "cl100k_base"
    expected = (3 + n(enc, "system") + n(enc, "Be brief.")
                + 3 + n(enc, "user") + n(enc, "bob") + 1 + n(enc, "Hi there")
                + 3 + n(enc, "assistant")
                + 3)
    assert count_chat(messages, "openai/gpt-4-turbo") == expected
    # gpt-3.5-turbo-0301: 4 per message, name replaces the role (-1)
    assert count_chat([{"role": "user", "name": "bob", "content": "hi"}], "gpt-3.5-turbo-0301") == (
        4 + n(enc, "user") + n(enc, "bob") - 1 + n(enc, "hi") + 3)


# --- chat: parts, images, tool calls, tools ---------------------------------------------------------------

def test_list_of_parts_content() -> None:
    parts = [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this picture."}]
    base = 3 + n("o200k_base", "user") + 3
    assert count_chat([{"role": "user", "content": parts}], "gpt-4o") == (
        base + n("o200k_base", "Describe ") + n("o200k_base", "this picture."))


def test_image_parts_of_unknown_size_count_the_worst_case_for_their_detail() -> None:
    base = 3 + n("o200k_base", "user") + 3

    def image(**url: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png", **url}}]}]

    assert count_chat(image(detail="low"), "gpt-4o") == base + 85
    assert count_chat(image(detail="high"), "gpt-4o") == base + 85 + 16 * 170   # a remote URL: the worst case
    assert count_chat(image(), "gpt-4o") == base + 85 + 16 * 170                 # auto is high
    data = "data:image/png;base64," + "A" * 100_000       # the URL itself is never tokenised
    assert count_chat(image(url=data, detail="low"), "gpt-4o") == base + 85


def test_other_parts_are_json_size_over_four() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "U" * 400, "format": "wav"}}
    rough = -(-len(orjson.dumps(part, option=orjson.OPT_SORT_KEYS)) // 4)
    base = 3 + n("o200k_base", "user") + 3
    assert count_chat([{"role": "user", "content": [part]}], "gpt-4o") == base + rough
    file_part = {"type": "file", "file": {"file_id": "file-abc"}}
    assert count_chat([{"role": "user", "content": [file_part]}], "gpt-4o") > base


def test_tool_calls_and_tool_results() -> None:
    enc = "o200k_base"
    args = '{"location": "Paris", "unit": "celsius"}'
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_current_weather", "arguments": args}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]
    expected = (3 + n(enc, "assistant")
                + tokens.TOOL_CALL_OVERHEAD + n(enc, "get_current_weather") + n(enc, args)
                + tokens.TOOL_CALL_OVERHEAD + n(enc, "get_time") + n(enc, "{}")
                + 3 + n(enc, "tool") + n(enc, "call_1") + n(enc, "22 C")
                + 3)
    assert count_chat(messages, "gpt-4o") == expected


@pytest.mark.parametrize(("model", "expected"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101),
                                                 ("gpt-4o-mini", 101)])
def test_cookbook_tools_example(model: str, expected: int) -> None:
    assert count_chat(WEATHER_MESSAGES, model, [WEATHER_TOOL]) == expected


def test_tools_estimate_grows_with_more_tools() -> None:
    messages = [{"role": "user", "content": "hi"}]
    none = count_chat(messages, "gpt-4o")
    assert count_chat(messages, "gpt-4o", []) == none
    one = count_chat(messages, "gpt-4o", [tool("a", location="Where.")])
    two = count_chat(messages, "gpt-4o", [tool("a", location="Where."), tool("b", query="What to look up.")])
    nested = tool("c", filter="A filter.")
    nested["function"]["parameters"]["properties"]["filter"].update(
        type="object", properties={"field": {"type": "string"}, "value": {"type": "number"}})
    three = count_chat(messages, "gpt-4o", [tool("a", location="Where."), tool("b", query="What to look up."), nested])
    assert none < one < two < three
    # legacy "functions" (bare function objects) count like tools
    legacy = count_prompt({"messages": messages, "functions": [tool("a", location="Where.")["function"]]},
                          "chat", "gpt-4o")
    assert legacy == one


def test_tools_estimate_is_deterministic() -> None:
    tools_ = [tool("a", x="X."), {"type": "web_search"}, {"type": "function", "function": {"name": "noargs"}}]
    first = count_chat([], "gpt-4", tools_)
    assert first == count_chat([], "gpt-4", [dict(t) for t in tools_]) > 3


# --- count_prompt ------------------------------------------------------------------------------------------

def test_count_prompt_chat() -> None:
    body = {"model": "x", "messages": WEATHER_MESSAGES, "tools": [WEATHER_TOOL], "temperature": 0}
    assert count_prompt(body, "chat", "gpt-4o") == 101
    assert count_prompt({"messages": COOKBOOK_MESSAGES}, "chat", "gpt-4") == 129


@pytest.mark.parametrize("key,endpoint", [("prompt", "completions"), ("input", "embeddings")])
def test_count_prompt_inputs(key: str, endpoint: str) -> None:
    model = "text-embedding-3-small"
    a, b = "The quick brown fox", "jumps over the lazy dog"
    assert count_prompt({key: a}, endpoint, model) == n("cl100k_base", a)
    assert count_prompt({key: [a, b]}, endpoint, model) == n("cl100k_base", a) + n("cl100k_base", b)
    assert count_prompt({key: [1, 2, 3, 4]}, endpoint, model) == 4
    assert count_prompt({key: [[1, 2, 3], [4, 5]]}, endpoint, model) == 5
    assert count_prompt({key: []}, endpoint, model) == 0
    assert count_prompt({}, endpoint, model) == 0


@pytest.mark.parametrize(("body", "endpoint"), [
    ({"messages": "not a list"}, "chat"),
    ({"messages": {"role": "user", "content": "a lone dict"}}, "chat"),
    ({"messages": None}, "chat"),
    ({"messages": [{"role": "user", "content": 42}]}, "chat"),
    ({"messages": [{"content": ["x", 7, None, {"type": "text", "text": 5}, {"type": "image_url"}]}]}, "chat"),
    ({"messages": [{"role": "user", "content": {"nested": [1, 2]}, "extra": 3.5, "flag": True}]}, "chat"),
    ({"messages": [None, 5, "string message", ["list"]]}, "chat"),
    ({"messages": [{"role": "assistant", "tool_calls": [None, 5, {"function": "x"}, {"function": {}}]}]}, "chat"),
    ({"messages": [{"role": "assistant", "tool_calls": "nope", "function_call": {"name": 1, "arguments": {}}}]},
     "chat"),
    ({"messages": [], "tools": [None, 1, "x", {"function": {"name": "f", "parameters": {"properties": [1]}}}]},
     "chat"),
    ({"messages": [], "tools": [{"function": {"name": "f", "parameters": {"properties": {"p": "str", "q": {
        "enum": [1, None, {"a": 1}], "type": ["string", "null"], "description": None}}}}}]}, "chat"),
    ({"messages": [], "tools": {"not": "a list"}}, "chat"),
    ({"prompt": None}, "completions"),
    ({"prompt": 12345}, "completions"),
    ({"prompt": [["a", 1], [1, 2], "s", 3, None, {"x": 1}]}, "completions"),
    ({"prompt": [True, False]}, "completions"),
    ({"input": {"not": "valid"}}, "embeddings"),
    ({"input": [[1, "two"], None, 2 ** 70]}, "embeddings"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "responses"),
])
def test_malformed_bodies_never_raise(body: dict[str, Any], endpoint: str) -> None:
    for model in ("gpt-4o", "gpt-4", "claude-3-haiku", "gpt-3.5-turbo-0301"):
        assert count_prompt(body, endpoint, model) >= 0


def test_non_dict_body_counts_zero() -> None:
    assert count_prompt("nope", "chat", "gpt-4o") == 0  # type: ignore[arg-type]
    assert count_prompt(None, "embeddings", "gpt-4o") == 0  # type: ignore[arg-type]


def test_count_cache_is_bounded_in_memory_and_stays_exact() -> None:
    """Long distinct prompts (pasted documents) cannot pin more than ``CACHED_TEXT_BYTES`` of text, and
    a count from the cache equals a fresh count."""
    enc = tiktoken.get_encoding("o200k_base")
    tokens._COUNTS.clear()
    texts = [f"document {i}: " + "lorem ipsum dolor sit amet " * 600 for i in range(1200)]   # ~16 KB each
    assert all(len(t) <= tokens.CACHED_TEXT_CHARS for t in texts)
    counts = [count_text(t, "gpt-4o") for t in texts]
    assert tokens._COUNTS.bytes <= tokens.CACHED_TEXT_BYTES < sum(sys.getsizeof(t) for t in texts)
    assert len(tokens._COUNTS) < len(texts)
    assert counts[-1] == count_text(texts[-1], "gpt-4o") == len(enc.encode(texts[-1]))   # a hit, exact
    assert counts[0] == count_text(texts[0], "gpt-4o") == len(enc.encode(texts[0]))      # evicted, recounted
    tokens._COUNTS.clear()
