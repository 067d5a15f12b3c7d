"""The simulated model as the official OpenAI SDK sees it through a running gateway: ``stop``, structured
output (``chat.completions.parse`` with a Pydantic model, streamed too), every choice of ``n`` > 1 streamed,
and tool calls whose arguments follow each tool's JSON schema. Plus the schema walker on its own, checked
with a real JSON-schema validator."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import jsonschema
import openai
import orjson
import pytest
from pydantic import BaseModel, Field

from conftest import GatewayFactory, Server
from gateway.providers.schema_values import value_for
from gateway.tokens import count_completion_text

POLICY = """\
models:
  demo:
    deployments:
      - provider: simulated
        model: demo-sim-1
        price: {input_per_mtok: 0.15, output_per_mtok: 0.60}
        simulated: {output_tokens: 12}
"""
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def server(gateway: GatewayFactory) -> Server:
    return gateway(POLICY)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0)


class Colour(StrEnum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    number: int = Field(ge=5, le=9)
    tags: list[str] = Field(min_length=3)


class Person(BaseModel):
    name: str
    age: int
    favourite: Colour
    mood: Literal["calm", "busy"]
    score: float
    home: Address
    previous: list[Address]
    nickname: str | None
    verified: bool


def test_stop_ends_the_answer_before_the_stop_sequence(server: Server) -> None:
    c = client(server)
    full = c.chat.completions.create(model="demo", messages=HELLO)
    text = full.choices[0].message.content
    assert text is not None and " every" in text
    reply = c.chat.completions.create(model="demo", messages=HELLO, stop=[" nothing", " every"])
    cut = reply.choices[0].message.content
    assert cut == text[:text.index(" every")] and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == count_completion_text(cut, "demo-sim-1") == 3
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
        model="demo", messages=HELLO, stop=" every", stream=True) if chunk.choices)
    assert streamed == cut
    legacy = c.completions.create(model="demo", prompt="Hello", stop=["routes"])
    assert legacy.choices[0].text == "the gateway " and legacy.choices[0].finish_reason == "stop"


def test_parse_with_a_pydantic_model_returns_a_valid_instance(server: Server) -> None:
    c = client(server)
    reply = c.chat.completions.parse(model="demo", messages=HELLO, response_format=Person)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person)
    assert 5 <= person.home.number <= 9 and len(person.home.tags) >= 3 and person.favourite in set(Colour)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == count_completion_text(reply.choices[0].message.content or "", "demo-sim-1")
    with c.chat.completions.stream(model="demo", messages=HELLO, response_format=Person) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == person            # the same answer, streamed in pieces


def test_json_object_mode_answers_json(server: Server) -> None:
    reply = client(server).chat.completions.create(model="demo", messages=HELLO,
                                                   response_format={"type": "json_object"})
    value = orjson.loads(reply.choices[0].message.content or "")
    assert isinstance(value, dict) and value["answer"].startswith("the gateway")


def test_every_choice_is_streamed_when_n_is_above_one(server: Server) -> None:
    c = client(server)
    whole = c.chat.completions.create(model="demo", messages=HELLO, n=3)
    expected = [choice.message.content for choice in whole.choices]
    assert len(set(expected)) == 3                                 # three different answers
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in c.chat.completions.create(model="demo", messages=HELLO, n=3, stream=True,
                                           stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert [texts[i] for i in range(3)] == expected and finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert whole.usage is not None and usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens == 36


class Lookup(BaseModel):
    city: str
    units: Literal["metric", "imperial"]
    days: int = Field(ge=1, le=7)


WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 12}, "unit": {"enum": ["celsius", "kelvin"]},
                   "days": {"type": "integer", "minimum": 3, "maximum": 4},
                   "hours": {"type": "array", "items": {"type": "integer", "multipleOf": 6}, "minItems": 2},
                   "when": {"type": "string", "format": "date"}},
    "required": ["city", "unit", "days"], "additionalProperties": False}}}


def test_tool_calls_carry_arguments_built_from_the_tools_schema(server: Server) -> None:
    c = client(server)
    reply = c.chat.completions.create(model="demo", messages=HELLO, tools=[WEATHER_TOOL])
    [call] = reply.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "weather" and reply.choices[0].finish_reason == \
        "tool_calls"
    args = orjson.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    assert set(args) == {"city", "unit", "days", "hours", "when"}

    forced = c.chat.completions.parse(
        model="demo", messages=HELLO,
        tools=[openai.pydantic_function_tool(Address), openai.pydantic_function_tool(Lookup)],
        tool_choice={"type": "function", "function": {"name": "Lookup"}})
    [call] = forced.choices[0].message.tool_calls or []
    assert call.function.name == "Lookup" and isinstance(call.function.parsed_arguments, Lookup)

    streamed: dict[int, str] = {}
    for chunk in c.chat.completions.create(model="demo", messages=HELLO, tools=[WEATHER_TOOL], stream=True, n=2):
        for choice in chunk.choices:
            for tool_call in choice.delta.tool_calls or ():
                streamed[choice.index] = streamed.get(choice.index, "") + (tool_call.function.arguments or "")
    assert streamed == {0: call_args(reply), 1: call_args(reply)}


def call_args(reply: Any) -> str:
    return str(reply.choices[0].message.tool_calls[0].function.arguments)


SCHEMAS: list[dict[str, Any]] = [
    Person.model_json_schema(),
    {"type": "object", "properties": {"child": {"$ref": "#"}, "name": {"type": "string"}}, "required": ["name"]},
    {"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                             {"type": "null"}]}},
                         "required": ["next"], "additionalProperties": False}},
     "$ref": "#/$defs/node"},
    {"type": "array", "items": {"type": "number", "exclusiveMinimum": 2, "exclusiveMaximum": 3}, "maxItems": 1},
    {"type": "object", "allOf": [{"properties": {"a": {"type": "integer", "multipleOf": 5, "minimum": 7}},
                                  "required": ["a"]},
                                 {"properties": {"b": {"type": ["null", "string"], "maxLength": 2}}}]},
    {"oneOf": [{"type": "string", "const": "x"}, {"type": "integer"}]},
    {"type": "number", "multipleOf": 0.25, "minimum": 1.1},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "string", "format": "email"}]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 3,
                                                "uniqueItems": True}}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_generated_values_validate_against_their_schema(schema: dict[str, Any]) -> None:
    value = value_for(schema)
    jsonschema.validate(value, schema)
    assert value_for(schema) == value                              # deterministic


HOSTILE: list[dict[str, Any]] = [
    {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]},       # no finite instance
    {"allOf": [{"$ref": "#"}]},
    {"anyOf": [{"$ref": "#"}]},
    {"type": "array", "minItems": 10**9},
    {"type": "string", "minLength": 10**9},
    {"type": "array", "minItems": 200, "items": {"type": "array", "minItems": 200,
                                                  "items": {"type": "array", "minItems": 200}}},
    {"type": "integer", "minimum": 1e30},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
]


@pytest.mark.parametrize("schema", HOSTILE)
def test_hostile_schemas_give_a_small_answer(schema: dict[str, Any]) -> None:
    text = orjson.dumps(value_for(schema))                       # encodable, whatever the schema
    assert len(text) < 200_000


def test_a_hostile_schema_through_the_gateway_is_answered_not_a_500(server: Server) -> None:
    tool = {"type": "function", "function": {"name": "loop", "parameters": HOSTILE[0]}}
    for extra in ({"tools": [tool]},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HOSTILE[5]}}}):
        reply = client(server).chat.completions.create(model="demo", messages=HELLO, max_tokens=64, **extra)
        assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
        assert reply.usage is not None and reply.usage.completion_tokens <= 64
