"""previous_response_id chains at the unit level: three turns through translation to a chat-only
deployment, then continued on a Responses-speaking one that does not hold the conversation (history
inlined) and on the one that does (id forwarded), each against the loopback mock; foreign ids refused."""

from __future__ import annotations

from typing import Any

from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401  (fixtures)

from gateway.api.responses import (
    chat_to_response,
    holds_state,
    native_body,
    previous_not_found,
    response_not_found,
    responses_to_chat,
    stored_record,
)
from gateway.policy.models import Deployment
from gateway.pricing import Price
from gateway.providers.base import Call
from gateway.providers.httpclient import HttpClient
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.state.responses_store import MemoryResponsesStore, StoredResponse


def native(base: str, name: str) -> Deployment:
    return Deployment(id=name, model="m", provider="openai", upstream_model="gpt-5", api_base=f"{base}/v1",
                      api_key=None, api_key_env=None, weight=1.0, context_window=None, max_output_tokens=None,
                      capabilities=frozenset({"chat"}), price=Price(0, 0, 0, 0, 0), price_source="policy",
                      timeout_s=None, headers=(), simulated=None, self_hosted=False,
                      apis=frozenset({"chat", "responses"}))


def fake_chat(chat_body: dict[str, Any]) -> dict[str, Any]:
    """A chat-only deployment that answers with how many messages it was given."""
    n = len(chat_body["messages"])
    return {"model": "local", "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": f"saw {n} messages"}}],
            "usage": {"prompt_tokens": 10 * n, "completion_tokens": 3, "total_tokens": 10 * n + 3}}


async def test_three_translated_turns_then_native_continuations(mock_responses: MockResponses) -> None:  # noqa: F811
    store = MemoryResponsesStore(60)
    prior: StoredResponse | None = None
    ids = []
    for turn, text in enumerate(["one", "two", "three"]):
        body: dict[str, Any] = {"model": "demo", "input": text, "instructions": "Be brief."}
        if prior is not None:
            body["previous_response_id"] = prior.id
        chat, dropped = responses_to_chat(body, prior.history() if prior else None)
        assert dropped == ()
        assert len(chat["messages"]) == 2 + 2 * turn              # system, then user/assistant pairs
        response = chat_to_response(fake_chat(chat), body, f"resp_turn{turn}")
        assert response["output"][0]["content"][0]["text"] == f"saw {2 + 2 * turn} messages"
        await store.put(stored_record(body, prior, response, team="alpha", deployment_id="local-1",
                                      upstream_state=False))
        prior = await store.get(response["id"], "alpha")
        assert prior is not None
        ids.append(prior.id)
    assert prior is not None
    assert [i["content"][0]["text"] for i in prior.history()] == [
        "one", "saw 2 messages", "two", "saw 4 messages", "three", "saw 6 messages"]
    assert await store.get(ids[-1], "beta") is None              # another team: previous_not_found for it

    provider = OpenAICompatProvider(HttpClient())
    try:
        fresh = native(mock_responses.url, "openai-b")
        body = {"model": "gpt-5", "input": "four", "previous_response_id": prior.id}
        sent = native_body(body, prior, fresh.id)
        assert "previous_response_id" not in sent and "previous_response_id" in body   # the request is not touched
        assert [i.get("role") for i in sent["input"]] == ["user", "assistant"] * 3 + ["user"]
        assert all("id" not in i for i in sent["input"])
        reply = await provider.complete(Call("responses", sent, fresh, 10.0))    # the mock knows no earlier id
        assert mock_responses.last.body["input"][-1]["content"][0]["text"] == "four"
        holder = stored_record(body, prior, reply, team="alpha", deployment_id=fresh.id, upstream_state=True)
        assert len(holder.input_items) == 7 and holder.upstream_state

        follow = {"model": "gpt-5", "input": "five", "previous_response_id": holder.id}
        assert holds_state(holder, fresh.id) and not holds_state(holder, "openai-c")
        assert native_body(follow, holder, fresh.id) is follow         # affinity: forwarded as is
        again = await provider.complete(Call("responses", follow, fresh, 10.0))
        assert again["previous_response_id"] == holder.id
        elsewhere = native_body(follow, holder, "openai-c")
        assert len(elsewhere["input"]) == 7 + 1 + 1                   # 7 inputs, the reply, the new input
    finally:
        await provider.aclose()


def test_not_found_errors() -> None:
    err = previous_not_found("resp_x")
    assert (err.status_code, err.code, err.param) == (400, "previous_response_not_found", "previous_response_id")
    missing = response_not_found("resp_y")
    assert missing.status_code == 404 and "resp_y" in missing.message
    assert missing.body()["error"]["type"] == "invalid_request_error"
