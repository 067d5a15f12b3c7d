"""Response-cache building blocks (keys, eligibility, the cache-control header, the in-memory store,
stream assembly and replay) and the strict parsing of the cache, prompt_cache and compression
policy sections."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.api.anthropic.codec import MessagesStream
from gateway.api.anthropic.replay import MessagesAssembler, replayed
from gateway.api.anthropic.replay import replay_events as messages_replay_events
from gateway.api.openai_sse import StreamAssembler, replay_events
from gateway.pipeline.request import Request
from gateway.policy import CacheSettings, PolicyError, load_policies
from gateway.pricing import Usage
from gateway.savings.response_cache import (
    Entry,
    MemoryStore,
    cache_key,
    cacheable,
    deterministic,
    directives,
    key_headers,
)

BODY = {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
        "temperature": 0}


def test_key_covers_team_model_and_request_but_not_stream_or_formatting() -> None:
    k = cache_key("t", "m", "chat", BODY)
    assert k.startswith("gw:v1:rcache:") and len(k) == len("gw:v1:rcache:") + 64
    same = [{**BODY, "stream": True, "stream_options": {"include_usage": True}},
            {**BODY, "model": "alias-of-m"}, {**BODY, "temperature": 0.0, "user": None},
            dict(reversed(list(BODY.items())))]
    assert {cache_key("t", "m", "chat", b) for b in same} == {k}
    different = [("u", "m", "chat", BODY), ("t", "n", "chat", BODY), ("t", "m", "completions", BODY),
                 ("t", "m", "chat", {**BODY, "messages": [{"role": "system", "content": "T"}, BODY["messages"][1]]}),
                 ("t", "m", "chat", {**BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}),
                 ("t", "m", "chat", {**BODY, "response_format": {"type": "json_object"}}),
                 ("t", "m", "chat", {**BODY, "top_p": 0.5}), ("t", "m", "chat", {**BODY, "n": 2})]
    assert len({cache_key(*args) for args in different} | {k}) == len(different) + 1



def test_a_responses_key_leaves_out_store_but_not_the_conversation() -> None:
    body = {"model": "m", "input": [{"role": "user", "content": "hi"}], "instructions": "I", "temperature": 0}
    k = cache_key("t", "m", "responses", body)
    assert cache_key("t", "m", "responses", {**body, "store": False, "stream": True}) == k
    assert cache_key("t", "m", "chat", {**body, "store": False}) != cache_key("t", "m", "chat", body)
    different = [{**body, "input": [{"role": "user", "content": "hello"}]}, {**body, "instructions": "J"},
                 {**body, "include": ["reasoning.encrypted_content"]}, {**body, "reasoning": {"summary": "auto"}},
                 {**body, "previous_response_id": "resp_1"}]
    assert len({cache_key("t", "m", "responses", b) for b in different} | {k}) == len(different) + 1

MESSAGES = {"model": "m", "max_tokens": 100, "system": [{"type": "text", "text": "S"}],
            "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_a_messages_key_leaves_out_metadata_and_covers_the_rest() -> None:
    k = cache_key("t", "m", "messages", MESSAGES)
    same = [{**MESSAGES, "metadata": {"user_id": "u-2"}, "stream": True}, {**MESSAGES, "model": "alias"},
            {**MESSAGES, "temperature": 0.0}]
    assert {cache_key("t", "m", "messages", b) for b in same} == {k}
    assert cache_key("t", "m", "chat", {**MESSAGES, "metadata": {"user_id": "u"}}) != cache_key("t", "m", "chat",
                                                                                                MESSAGES)
    tool = {"name": "f", "input_schema": {"type": "object"}}
    different = [{**MESSAGES, "system": "T"}, {**MESSAGES, "max_tokens": 101}, {**MESSAGES, "stop_sequences": ["x"]},
                 {**MESSAGES, "tools": [tool]}, {**MESSAGES, "tools": [tool], "tool_choice": {"type": "any"}},
                 {**MESSAGES, "thinking": {"type": "enabled", "budget_tokens": 50}}, {**MESSAGES, "top_k": 1},
                 {**MESSAGES, "messages": [{"role": "user", "content": "hello"}]},
                 {**MESSAGES, "context_management": {"edits": []}}]
    assert len({cache_key("t", "m", "messages", b) for b in different} | {k}) == len(different) + 1
    # the headers that change what the API does: beta features (as a set) and the version
    assert key_headers("chat", {"anthropic-beta": "a"}) == {} and key_headers("messages", {}) == {}
    beta = cache_key("t", "m", "messages", MESSAGES, key_headers("messages", {"anthropic-beta": "b-1, a-2"}))
    assert beta == cache_key("t", "m", "messages", MESSAGES, key_headers("messages", {"anthropic-beta": "a-2,b-1,a-2"}))
    assert len({k, beta, cache_key("t", "m", "messages", MESSAGES, key_headers("messages", {"anthropic-beta": "a-2"})),
                cache_key("t", "m", "messages", MESSAGES,
                          key_headers("messages", {"anthropic-version": "2023-06-01"}))}) == 4


def test_what_is_deterministic_and_the_modes() -> None:
    assert deterministic("chat", {"temperature": 0}) and deterministic("chat", {"temperature": 0.0})
    assert deterministic("chat", {"seed": 3, "temperature": 0.7}) and deterministic("embeddings", {})
    assert not deterministic("chat", {}) and not deterministic("chat", {"temperature": 0.2})
    assert not deterministic("chat", {"temperature": False}) and not deterministic("chat", {"seed": True})
    assert not deterministic("completions", {"seed": "3"})
    assert deterministic("messages", {"temperature": 0, "thinking": {"type": "enabled", "budget_tokens": 50}})
    assert not deterministic("messages", {"seed": 3}) and not deterministic("messages", {"temperature": 1})
    assert cacheable(CacheSettings(mode="always"), "chat", {}) and not cacheable(CacheSettings(mode="off"), "chat",
                                                                                 {"temperature": 0})


def test_cache_control_directives() -> None:
    assert directives({}) == (False, False)
    assert directives({"cache-control": "no-cache"}) == (True, False)
    assert directives({"cache-control": "max-age=0, No-Store"}) == (True, True)


async def test_memory_store_expiry_and_bounds() -> None:
    now = [100.0]
    store = MemoryStore(max_entries=2, max_bytes=10, clock=lambda: now[0])
    await store.set("a", b"1234", ttl_s=5)
    assert await store.get("a") == b"1234"
    now[0] = 105.0
    assert await store.get("a") is None and len(store) == 0 and store.bytes == 0     # expired
    await store.set("a", b"1", 60)
    await store.set("b", b"2", 60)
    assert await store.get("a") == b"1"           # a is now the most recently used
    await store.set("c", b"3", 60)                # over two entries: b, the least recently used, goes
    assert await store.get("b") is None and await store.get("a") == b"1" and await store.get("c") == b"3"
    await store.set("d", b"123456789", 60)        # over ten bytes: the least recently used go until it fits
    assert len(store) == 2 and store.bytes == 10 and await store.get("a") is None
    await store.set("huge", b"x" * 11, 60)        # bigger than the whole store: not kept
    assert await store.get("huge") is None and await store.get("d") == b"123456789"


def test_entry_round_trip_and_junk() -> None:
    entry = Entry({"id": "x", "choices": []}, "chat", 10, 2, "openai/m", 1.5)
    assert Entry.decode(entry.encode()) == entry
    for junk in (b"not json", b"[]", b'{"v": 99, "body": {}}', b'{"v": 1, "body": {}}'):
        assert Entry.decode(junk) is None


ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m", "system_fingerprint": "fp",
          "choices": [
              {"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": None},
               "logprobs": None, "finish_reason": "stop"},
              {"index": 1, "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                  {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
               "logprobs": None, "finish_reason": "tool_calls"}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def events_to_chunks(events: list[bytes]) -> list[dict[str, Any]]:
    assert events[-1] == b"data: [DONE]\n\n" and all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    return [orjson.loads(e[6:-2]) for e in events[:-1]]


def test_replay_then_assemble_gives_the_answer_back() -> None:
    chunks = events_to_chunks(replay_events(ANSWER, "chat", wants_usage=True))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {**ANSWER["usage"], "cost_usd": 0.0}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assembler = StreamAssembler("chat")
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.complete()
    rebuilt = assembler.answer()
    assert rebuilt["choices"] == ANSWER["choices"]
    assert rebuilt["usage"] == {**ANSWER["usage"], "cost_usd": 0.0}
    no_usage = events_to_chunks(replay_events(ANSWER, "chat", wants_usage=False))
    assert all(c["choices"] for c in no_usage)


def test_assembler_merges_fragments_and_knows_a_cut_stream() -> None:
    a = StreamAssembler("chat")
    parts = [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"},
             {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]},
             {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]},
             {"tool_calls": [{"index": 0, "function": {"arguments": ": 2}"}}]}]
    for delta in parts:
        a.add({"id": "i", "created": 1, "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    assert not a.complete()
    a.add({"id": "i", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    message = a.answer()["choices"][0]["message"]
    assert message["content"] == "Hello" and message["tool_calls"] == [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}]
    text = StreamAssembler("completions")
    for piece, finish in (("Once", None), (" upon", "length")):
        text.add({"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": piece,
                                                                       "finish_reason": finish}]})
    assert text.answer()["choices"][0]["text"] == "Once upon" and text.answer()["object"] == "text_completion"


MESSAGE = {"id": "msg_stored", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "thinking", "thinking": "Hm.", "signature": "c2ln"},
                       {"type": "redacted_thinking", "data": "opaque"},
                       {"type": "text", "text": "See", "citations": [{"type": "char_location", "cited_text": "a"}]},
                       {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}},
                       {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}],
           "stop_reason": "tool_use", "stop_sequence": None,
           "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 7}}


def messages_events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for event in raw:
        name, data = event.split(b"\n", 1)
        assert name.startswith(b"event: ") and data.startswith(b"data: ") and event.endswith(b"\n\n")
        out.append(orjson.loads(data[6:-2]))
        assert out[-1]["type"] == name[7:].decode()
    return out


def test_messages_replay_then_assemble_gives_the_message_back() -> None:
    hit = replayed(MESSAGE)
    assert hit["id"].startswith("msg_") and hit["id"] != MESSAGE["id"] and hit["usage"]["cost_usd"] == 0.0
    events = messages_events(messages_replay_events(hit))
    assert [e["type"] for e in events[:2]] == ["message_start", "content_block_start"]
    assert events[0]["message"]["content"] == [] and "cost_usd" not in events[0]["message"]["usage"]
    assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["cost_usd"] == 0.0
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert deltas == ["thinking_delta", "signature_delta", "citations_delta", "text_delta", "input_json_delta",
                      "input_json_delta"]
    assembler = MessagesAssembler()
    for event in events:
        assembler.add(event)
    assert assembler.answer() == hit


def test_messages_assembler_keeps_only_finished_streams() -> None:
    events = messages_events(messages_replay_events(replayed(MESSAGE)))
    cut = MessagesAssembler()
    for event in events[:-1]:                  # no message_stop
        cut.add(event)
    assert cut.answer() is None
    failed = MessagesAssembler()
    for event in events[:4] + [{"type": "error", "error": {"type": "overloaded_error"}}] + events[4:]:
        failed.add(event)
    assert failed.answer() is None
    open_tool = MessagesAssembler()            # a tool block whose input never closed
    for event in events:
        if not (event["type"] == "content_block_stop" and event["index"] == 3):
            open_tool.add(event)
    assert open_tool.answer() is None


def test_a_translated_messages_stream_is_stored_only_when_the_chat_stream_finished() -> None:
    def relayed(finish: str | None) -> dict[str, Any] | None:
        req = Request("messages", "chat", {}, "local", True, True, 50, 0, {}, "r")
        stream = MessagesStream(req, "chat", assemble=True)
        for delta, reason in (({"role": "assistant", "content": "Hel"}, None), ({"content": "lo"}, finish)):
            stream.feed({"id": "c", "object": "chat.completion.chunk", "model": "m",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})
        stream.feed({"id": "c", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                                         "total_tokens": 6}})
        stream.close(Usage(input_tokens=4, output_tokens=2), 1234)
        return stream.answer()

    message = relayed("length")
    assert message is not None and message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "max_tokens" and message["usage"]["output_tokens"] == 2
    assert relayed(None) is None           # cut before its finish_reason: the closing events are the gateway's
    unassembled = MessagesStream(Request("messages", "chat", {}, "local", True, True, 50, 0, {}, "r"), "chat")
    assert unassembled.assembler is None and unassembled.answer() is None   # not cacheable: nothing kept


# ---------------------------------------------------------------- policy sections
MODELS = """\
models:
  demo:
    deployments: [{provider: simulated}]
  cheap:
    deployments: [{provider: simulated}]
"""


def load(tmp_path: Path, extra: str) -> Any:
    (tmp_path / "models.yaml").write_text(MODELS + textwrap.dedent(extra))
    return load_policies(str(tmp_path))


def error(tmp_path: Path, extra: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, extra)
    return info.value


def test_defaults_without_sections(tmp_path: Path) -> None:
    p = load(tmp_path, "")
    assert p.cache.for_request("any") == CacheSettings()
    assert not p.prompt_cache.for_request("any").enabled and not p.compression.for_request("any").enabled


def test_sections_layer_global_team_and_route(tmp_path: Path) -> None:
    p = load(tmp_path, """\
        cache:
          mode: always
          ttl_s: 120
          memory_max_entries: 50
          teams:
            legal: {mode: off}
            quick: {ttl_s: 5}
        prompt_cache:
          enabled: true
          teams:
            batch: {ttl: 1h, openai_cache_key: prefix}
        compression:
          enabled: true
          summary_model: cheap
          teams:
            agents: {keep_last_turns: 6, strategies: [clear_tool_outputs]}
        """)
    assert p.cache.for_request("x") == CacheSettings("always", 120.0, 1 << 20) and p.cache.memory_max_entries == 50
    assert p.cache.for_request("legal").mode == "off" and p.cache.for_request("quick") == CacheSettings("always", 5.0)
    assert p.prompt_cache.for_request("batch").ttl == "1h" and p.prompt_cache.for_request("batch").enabled
    assert p.prompt_cache.for_request("batch").openai_cache_key == "prefix"
    c = p.compression.for_request("x")
    assert c.strategies == ("clear_tool_outputs", "summarize", "drop_middle") and c.summary_model == "cheap"
    assert p.compression.for_request("agents").strategies == ("clear_tool_outputs",)
    routed = p.cache.layers.with_route("pii", {"mode": "off"})
    assert routed.for_request("quick", "pii") == CacheSettings("off", 5.0) and routed.for_request("quick") == \
        CacheSettings("always", 5.0)


@pytest.mark.parametrize(("extra", "line", "key", "message"), [
    ("cache:\n  mode: sometimes\n", 7, "cache.mode", "must be one of"),
    ("cache:\n  ttl: 5\n", 7, "cache.ttl", "unknown key"),
    ("cache:\n  teams:\n    a: {memory_max_entries: 3}\n", 8, "cache.teams.a.memory_max_entries", "unknown key"),
    ("prompt_cache:\n  ttl: 2h\n", 7, "prompt_cache.ttl", "must be one of"),
    ("prompt_cache:\n  enabled: yes please\n", 7, "prompt_cache.enabled", "true or false"),
    ("compression:\n  strategies: [summarize]\n", 7, "compression.strategies", "summary_model"),
    ("compression:\n  summary_model: nope\n", 7, "compression.summary_model", "unknown model"),
    ("compression:\n  strategies: [squeeze]\n", 7, "compression.strategies", "unknown value"),
    ("compression:\n  trigger_fraction: 1.5\n", 7, "compression.trigger_fraction", "at most"),
    ("compression:\n  trigger_tokens: 100\n  target_tokens: 200\n", 8, "compression.target_tokens", "must not exceed"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, extra: str, line: int, key: str, message: str) -> None:
    err = error(tmp_path, extra)
    assert err.file.endswith("models.yaml") and err.key == key and message in err.message
    assert err.line == line, str(err)


ROOT = Path(__file__).resolve().parent.parent


def test_shipped_examples_load_when_uncommented(tmp_path: Path) -> None:
    lines = (ROOT / "policies" / "caching.yaml").read_text().splitlines()
    example = re.compile(r"^( *)# ( *[a-z_]+:.*)$")
    uncommented = "\n".join(m.group(1) + m.group(2) if (m := example.match(line)) else line for line in lines)
    assert uncommented.count("\n") == len(lines) - 1 and "# compression:" not in uncommented
    (tmp_path / "caching.yaml").write_text(uncommented)
    p = load(tmp_path, "")
    assert p.cache.for_request("legal").mode == "off" and p.cache.for_request("batch").ttl_s == 86400
    assert p.prompt_cache.for_request("research").ttl == "1h" and p.compression.for_request("agents").enabled
    assert p.compression.for_request("x").summary_model == "demo"
    text = (ROOT / "policies" / "README.md").read_text()
    section = text[text.index("## Caching and compression"):]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    for i, block in enumerate(blocks):
        d = tmp_path / f"readme{i}"
        d.mkdir()
        (d / "models.yaml").write_text(MODELS + block)
        load_policies(str(d))


def test_ledger_records_written_before_these_fields_still_load() -> None:
    from gateway.state.ledger import LedgerRecord
    old = {"request_id": "r", "ts": 1.0, "team": "t", "key_id": None, "requested_model": "m", "model": "m",
           "deployment": "d", "provider": "p", "route": "default", "input_tokens": 1, "output_tokens": 2}
    record = LedgerRecord.from_json(orjson.dumps(old))
    assert (record.cache, record.compressed, record.compression_saved_tokens) == ("bypass", False, 0)
    new = LedgerRecord(**{**old, "cache": "hit", "compressed": True, "compression_saved_tokens": 7})
    assert LedgerRecord.from_json(new.to_json()) == new
