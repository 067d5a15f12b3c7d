"""Offline token counting: the gateway's own estimate of prompt and completion tokens.

This module owns the model-to-encoding mapping, the lazily loaded tiktoken
encodings (read from the cache files bundled inside the installed ``litellm``
package, so no network is ever needed), and the counting rules for the three
endpoints: chat messages follow the OpenAI cookbook "How to count tokens with
tiktoken" (per-message and per-name overheads, reply priming, tool definitions;
image parts by their size, detail and the model, see :mod:`gateway.image_tokens`),
legacy completions and embeddings count strings and token-id lists. Counting
never raises on malformed input; it counts what it can.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import orjson
import tiktoken

from gateway.image_tokens import part_tokens as image_part_tokens

DEFAULT_ENCODING = "cl100k_base"
_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"   # tiktoken's cache key source


def _bundled_tokenizers_dir() -> str | None:
    spec = importlib.util.find_spec("litellm")   # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "litellm_core_utils", "tokenizers")
    return path if os.path.isdir(path) else None


# Point tiktoken at litellm's bundled cache unless the user chose a cache dir (an empty value would
# mean "no cache, always download", which cannot work offline, so it is replaced too).
BUNDLED_TOKENIZERS_DIR = _bundled_tokenizers_dir()
if BUNDLED_TOKENIZERS_DIR and not os.environ.get("TIKTOKEN_CACHE_DIR"):
    os.environ["TIKTOKEN_CACHE_DIR"] = BUNDLED_TOKENIZERS_DIR

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002")
_P50K_PREFIXES = ("text-davinci-002", "text-davinci-003", "code-davinci")

# Chat overheads (cookbook): every message is framed as <|start|>{role/name}\n{content}<|end|>\n.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3            # every reply is primed with <|start|>assistant<|message|>
LEGACY_0301 = (4, -1)        # gpt-3.5-turbo-0301: 4 per message; a name replaced the role
# Assistant tool calls: name + arguments are counted, plus this fixed framing estimate per call
# (the same +3 that hmarr/openai-chat-tokens adds for a function_call; OpenAI publishes no figure).
TOOL_CALL_OVERHEAD = 3
CACHED_TEXT_CHARS = 16_384   # texts up to this long have their token count cached ...
CACHED_TEXTS = 4096          # ... at most this many of them ...
CACHED_TEXT_BYTES = 8 << 20  # ... holding at most this much memory in texts (the keys are the texts)
ROUGH_CHARS_PER_TOKEN = 4    # other parts (input_audio, file, ...): JSON size / 4, a rough estimate
# Tool definitions: OpenAI does not publish the exact formula; this is an estimate. It follows the
# cookbook's num_tokens_for_tools(), which matches the API for flat schemas: per function
# FUNC_INIT + tokens("name:description"), then PROP_INIT once, and per property PROP_KEY +
# tokens("key:type:description") (+ENUM_INIT, +ENUM_ITEM + tokens(item) per enum value), and
# FUNC_END once for the whole list. Descriptions lose one trailing ".". Schema keywords the
# cookbook ignores (nested "properties", "items", ...) add the tokens of their JSON as an estimate.
FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}   # cl100k's value for any other encoding
PROP_INIT = 3
PROP_KEY = 3
ENUM_INIT = -3
ENUM_ITEM = 3
FUNC_END = 12


def _strip_model(model: str) -> str:
    name = str(model).strip().lower().rsplit("/", 1)[-1]   # "openai/gpt-4o", "azure/..." -> bare name
    return name.removeprefix("ft:")                          # fine-tunes: "ft:gpt-4o-mini:org::id"


@lru_cache(maxsize=1024)
def encoding_name_for(model: str) -> str:
    """The tiktoken encoding used to count ``model``'s tokens (cl100k_base when unknown)."""
    name = _strip_model(model)
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_P50K_PREFIXES):
        return "p50k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return DEFAULT_ENCODING   # claude, llama, mistral, unknown: an approximation


def _is_bundled(encoding: str) -> bool:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache_dir:
        return True   # no cache to inspect: let tiktoken decide
    key = hashlib.sha1(_BLOB_URL.format(encoding).encode()).hexdigest()
    return os.path.exists(os.path.join(cache_dir, key))


@lru_cache(maxsize=8)
def _encoding(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name if _is_bundled(name) else DEFAULT_ENCODING)


def _text(value: Any) -> str:
    """Any value as text: str as is, None as "", containers as compact JSON, the rest via str()."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):
            return str(value)
    return str(value)


def _len(enc: tiktoken.Encoding, value: Any) -> int:
    text = _text(value)
    if not text:
        return 0
    if len(text) <= CACHED_TEXT_CHARS:   # system prompts and conversation history repeat request after request
        return _COUNTS.get(enc, text)
    return len(enc.encode(text, disallowed_special=()))


class _CountCache:
    """Token counts by (encoding, text), least recently used first out, bounded in entries and in the
    memory of the texts it keeps as keys: a bound in entries alone would let 4096 distinct long prompts
    (pasted documents) hold 64 MB of ASCII, and two or four times that of other scripts, for good."""

    __slots__ = ("_items", "bytes", "max_items", "max_bytes")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._items: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.bytes = 0
        self.max_items, self.max_bytes = max_items, max_bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, enc: tiktoken.Encoding, text: str) -> int:
        key = (enc.name, text)
        n = self._items.get(key)
        if n is not None:
            self._items.move_to_end(key)
            return n
        n = self._items[key] = len(enc.encode(text, disallowed_special=()))
        self.bytes += sys.getsizeof(text)
        while len(self._items) > self.max_items or self.bytes > self.max_bytes:
            (_, old), _ = self._items.popitem(last=False)
            self.bytes -= sys.getsizeof(old)
        return n

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


_COUNTS = _CountCache(CACHED_TEXTS, CACHED_TEXT_BYTES)


def _rough(value: Any) -> int:
    return math.ceil(len(_text(value)) / ROUGH_CHARS_PER_TOKEN)


def count_text(text: str, model: str) -> int:
    """Tokens of ``text`` in ``model``'s encoding; special-token text such as <|endoftext|> is plain text."""
    return _len(_encoding(encoding_name_for(model)), text)


def count_completion_text(text: str, model: str) -> int:
    """Tokens of generated text (used to estimate streamed output)."""
    return count_text(text, model)


def _content_tokens(enc: tiktoken.Encoding, content: Any, model: str) -> int:
    if not isinstance(content, list):
        return _len(enc, content)
    total = 0
    for part in content:
        if not isinstance(part, dict):
            total += _len(enc, part)
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") or (kind is None and "text" in part):
            total += _len(enc, part.get("text"))
        elif kind == "refusal":
            total += _len(enc, part.get("refusal"))
        elif kind in ("image_url", "input_image", "image"):   # by size, detail and model: gateway.image_tokens
            total += image_part_tokens(part, model)
        else:
            total += _rough(part)
    return total


def has_images(body: Any) -> bool:
    """Whether a chat body has an image part (the prompt's count then depends on the model's family)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") in ("image_url", "input_image", "image") for p in content):
            return True
    return False


def _call_tokens(enc: tiktoken.Encoding, call: Any) -> int:
    if not isinstance(call, dict):
        return _len(enc, call)
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    return TOOL_CALL_OVERHEAD + _len(enc, fn.get("name")) + _len(enc, fn.get("arguments"))


def _property_tokens(enc: tiktoken.Encoding, key: str, prop: Any) -> int:
    if not isinstance(prop, dict):
        return PROP_KEY + _len(enc, f"{key}:{_text(prop)}")
    total = PROP_KEY
    enum = prop.get("enum")
    if isinstance(enum, list):
        total += ENUM_INIT + sum(ENUM_ITEM + _len(enc, item) for item in enum)
    desc = _text(prop.get("description")).removesuffix(".")
    total += _len(enc, f"{key}:{_text(prop.get('type'))}:{desc}")
    extra = {k: v for k, v in prop.items() if k not in ("type", "description", "enum")}
    return total + (_len(enc, extra) if extra else 0)


def _tools_tokens(enc: tiktoken.Encoding, tools: Any) -> int:
    if not isinstance(tools, list) or not tools:
        return 0
    func_init = FUNC_INIT.get(enc.name, FUNC_INIT["cl100k_base"])
    total = FUNC_END
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn, dict) or "name" not in fn:   # built-in or malformed tool: its JSON
            total += _len(enc, tool)
            continue
        desc = _text(fn.get("description")).removesuffix(".")
        total += func_init + _len(enc, f"{_text(fn.get('name'))}:{desc}")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            total += PROP_INIT + sum(_property_tokens(enc, str(k), v) for k, v in props.items())
    return total


def count_chat(messages: list[dict[str, Any]], model: str, tools: list[dict[str, Any]] | None = None) -> int:
    """Prompt tokens of a chat request: messages by the cookbook rules plus an estimate for ``tools``."""
    enc = _encoding(encoding_name_for(model))
    per_message, per_name = (
        LEGACY_0301 if _strip_model(model).startswith("gpt-3.5-turbo-0301") else (TOKENS_PER_MESSAGE, TOKENS_PER_NAME))
    raw: Any = messages   # callers pass request JSON as is: check the shape instead of trusting the hint
    items: list[Any] = list(raw) if isinstance(raw, list | tuple) else [] if raw is None else [raw]
    total = REPLY_PRIMING
    for message in items:
        total += per_message
        if not isinstance(message, dict):
            total += _len(enc, message)
            continue
        for key, value in message.items():
            if key == "content":
                total += _content_tokens(enc, value, model)
            elif key == "tool_calls" and isinstance(value, list):
                total += sum(_call_tokens(enc, call) for call in value)
            elif key == "function_call" and isinstance(value, dict):   # legacy single call
                total += _call_tokens(enc, value)
            else:
                total += _len(enc, value)
            if key == "name":
                total += per_name
    return total + _tools_tokens(enc, tools)


def _inputs_tokens(value: Any, model: str) -> int:
    """A completions prompt or embeddings input: str, list[str], list[int] or list[list[int]]."""
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)   # one prompt given as token ids
        total = 0
        for item in value:
            if isinstance(item, list):
                total += sum(1 if isinstance(t, int) else count_text(_text(t), model) for t in item)
            else:
                total += count_text(_text(item), model)
        return total
    return count_text(_text(value), model)


def count_prompt(body: dict[str, Any], endpoint: str, model: str) -> int:
    """Prompt tokens of a request body for endpoint "chat", "completions" or "embeddings" (0 otherwise)."""
    raw: Any = body
    if not isinstance(raw, dict):
        return 0
    if endpoint == "chat":
        tools = body.get("tools") or body.get("functions")   # "functions": the legacy spelling
        return count_chat(body.get("messages") or [], model, tools if isinstance(tools, list) else None)
    if endpoint == "completions":
        return _inputs_tokens(body.get("prompt"), model)
    if endpoint == "embeddings":
        return _inputs_tokens(body.get("input"), model)
    return 0
