"""Bad input of every kind gets the right status and OpenAI's envelope, never a 500."""

from __future__ import annotations

import httpx
import pytest

from conftest import GatewayFactory, Server, mock_policy

pytestmark = pytest.mark.e2e   # starts a gateway process on the mock upstream

AUTH = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Server:
    from conftest import start_gateway, stop

    d = tmp_path_factory.mktemp("bad-input")
    (d / "models.yaml").write_text(mock_policy(mock_upstream))
    server = start_gateway(d, d / "gateway.log", env={"GATEWAY_MAX_BODY_BYTES": "65536"})
    yield server
    stop(server.proc)


def post(gw: Server, path: str, content: bytes | str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", content=content, headers={**AUTH, "content-type": "application/json",
                                                                    **(headers or {})}, timeout=10)


def envelope(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["message"]
    return body["error"]


CASES = [
    # (path, body, status, type, code, param)
    ("/v1/chat/completions", b"{not json", 400, "invalid_request_error", "invalid_json", "body"),
    ("/v1/chat/completions", b"", 400, "invalid_request_error", "invalid_json", "body"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_request_error", "invalid_json", "body"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400,
     "invalid_request_error", "missing_field", "model"),
    ("/v1/chat/completions", b'{"model": "mock"}', 400, "invalid_request_error", "missing_field", "messages"),
    ("/v1/chat/completions", b'{"model": 42, "messages": []}', 400, "invalid_request_error", "invalid_type", "model"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": "hi"}', 400, "invalid_request_error",
     "invalid_type", "messages"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [42]}', 400, "invalid_request_error",
     "invalid_type", "messages[0]"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "invalid_request_error", "invalid_value", "messages[0].role"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [{"role": "user", "content": 7}]}', 400,
     "invalid_request_error", "invalid_type", "messages[0].content"),
    ("/v1/chat/completions",
     b'{"model": "mock", "messages": [{"role": "user", "content": [{"type": "hologram", "data": 1}]}]}',
     400, "invalid_request_error", "unsupported_content", "messages[0].content[0].type"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
     400, "invalid_request_error", "invalid_type", "stream"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "n": 0}',
     400, "invalid_request_error", "invalid_value", "n"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
     400, "invalid_request_error", "invalid_value", "max_tokens"),
    ("/v1/chat/completions", b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "tools": {}}',
     400, "invalid_request_error", "invalid_type", "tools"),
    ("/v1/chat/completions", b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
     404, "invalid_request_error", "model_not_found", "model"),
    ("/v1/embeddings", b'{"model": "mock-embed"}', 400, "invalid_request_error", "missing_field", "input"),
    ("/v1/embeddings", b'{"model": "mock", "input": "x"}', 400, "invalid_request_error",
     "unsupported_capability", "model"),
    ("/v1/completions", b'{"model": "mock", "prompt": {"a": 1}}', 400, "invalid_request_error",
     "invalid_type", "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "etype", "code", "param"), CASES)
def test_bad_requests(gw: Server, path: str, body: bytes, status: int, etype: str, code: str, param: str) -> None:
    resp = post(gw, path, body)
    assert resp.status_code == status, resp.text
    err = envelope(resp)
    assert (err["type"], err["code"], err["param"]) == (etype, code, param)
    assert resp.headers["x-request-id"]


def test_missing_key_is_401(gw: Server) -> None:
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "mock", "messages": []})
    assert resp.status_code == 401
    assert envelope(resp)["code"] == "invalid_api_key"
    assert envelope(resp)["type"] == "authentication_error"


def test_oversized_body_is_413(gw: Server) -> None:
    big = b'{"model": "mock", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}'
    resp = post(gw, "/v1/chat/completions", big)
    assert resp.status_code == 413
    assert envelope(resp)["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(gw: Server) -> None:
    def gen():
        yield b'{"model": "mock", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}]}'
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=gen(), headers=AUTH)
    assert resp.status_code == 413


def test_wrong_method_and_unknown_path(gw: Server) -> None:
    resp = httpx.get(f"{gw.url}/v1/chat/completions", headers=AUTH)
    assert resp.status_code == 405 and envelope(resp)["type"] == "invalid_request_error"
    resp = httpx.get(f"{gw.url}/v1/nothing-here", headers=AUTH)
    assert resp.status_code == 404 and envelope(resp)["code"] == "not_found"


def test_paths_without_v1_prefix(gw: Server) -> None:
    resp = post(gw, "/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "x"}]}')
    assert resp.status_code == 200 and resp.json()["choices"]
    assert httpx.get(f"{gw.url}/models", headers=AUTH).status_code == 200


def test_unknown_model_in_models_endpoint(gw: Server) -> None:
    resp = httpx.get(f"{gw.url}/v1/models/nope", headers=AUTH)
    assert resp.status_code == 404 and envelope(resp)["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    b"null", b"0", b'"str"', b'{"model": null, "messages": null}', b'{"model": "mock", "messages": [null]}',
    b'{"model": "mock", "messages": [{"role": "user", "content": [null]}]}',
    b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "stream_options": 5}',
    b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "n": true}',
    b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
    b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"function": 3}, "tools": [{}]}',
    b'{"model": "demo-embed-does-not-exist", "input": []}',
    b"{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}",
    b'\xff\xfe\x00',
])
def test_no_input_yields_500(gw: Server, body: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        resp = post(gw, path, body)
        assert resp.status_code < 500, (path, body, resp.text)
        if resp.status_code >= 400:
            envelope(resp)


def test_refusals_before_routing_are_counted(gateway: GatewayFactory, mock_reset: str) -> None:
    server = gateway(mock_policy(mock_reset))

    def count(**labels: str) -> float:
        total = 0.0
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("gateway_requests_total{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    assert post(server, "/v1/chat/completions", b"{oops").status_code == 400
    unknown = b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'
    assert post(server, "/v1/chat/completions", unknown).status_code == 404
    assert post(server, "/v1/chat/completions", b'{"model": "mock", "messages": 5}').status_code == 400
    assert httpx.post(f"{server.url}/v1/chat/completions", content=b"{}", timeout=10).status_code == 401
    assert count(status="invalid_json", route="none", team="none", model="other") == 1
    assert count(status="model_not_found", route="none", team="default", model="other") == 1
    assert count(status="invalid_type", route="none", team="default", model="mock") == 1
    assert count(status="invalid_api_key", route="none") == 1
    assert count(route="none") == 4
