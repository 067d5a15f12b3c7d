"""Image token estimates (issue 11, defect 6): sizes read from image headers, the providers' formulas.

Exact numbers per model family and detail, worked by hand from the providers' documentation
(OpenAI's tile and patch formulas, Anthropic's ``width * height / 750`` after scaling); the image
formats' headers (PNG, JPEG after large APP segments, GIF, the three WebP kinds) read from
``data:`` URLs and Anthropic base64 sources; hostile headers (truncated, garbage, lying, looping)
falling back to the worst case without raising; and the issue's case in process: a 1024x4096
high-detail image whose upstream bills what the formula says (2,125 tokens on GPT-4o, where
the gateway used to hold 765) no longer lets a key budget settle above its limit.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.image_tokens import base64_size, data_url_size, image_family, image_tokens, part_tokens
from gateway.tokens import count_chat, count_text, has_images
from inprocess import Gateway, in_process


# ------------------------------------------------------------------ images, built with the standard library
def png(width: int, height: int) -> bytes:
    """A real, valid PNG (1-bit greyscale, all zero), small even at 1024x4096."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\x00" + bytes((width + 7) // 8)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + bytes(9) + b"\x3b"


def jpeg(width: int, height: int, app_bytes: int = 20_000, progressive: bool = False) -> bytes:
    """SOI, a JFIF APP0, a large APP1 (EXIF-sized), a fill byte, DQT, then the frame header and a scan."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", app_bytes + 2) + bytes(app_bytes)
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + bytes(65)
    sof = (b"\xff" + (b"\xc2" if progressive else b"\xc0") + struct.pack(">HBHHB", 11, 8, height, width, 1)
           + b"\x01\x11\x00")
    return b"\xff\xd8" + app0 + app1 + b"\xff" + dqt + sof + b"\xff\xda" + struct.pack(">H", 8) + bytes(6) + b"\xff\xd9"


def webp(width: int, height: int, kind: str) -> bytes:
    if kind == "VP8X":
        body = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") \
            + (height - 1).to_bytes(3, "little")
    elif kind == "VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits)
    else:
        body = b"VP8 " + struct.pack("<I", 10) + b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{b64(data)}"


# ------------------------------------------------------------------ headers
@pytest.mark.parametrize("build", [png, gif, jpeg, lambda w, h: jpeg(w, h, progressive=True),
                                   lambda w, h: webp(w, h, "VP8X"), lambda w, h: webp(w, h, "VP8L"),
                                   lambda w, h: webp(w, h, "VP8 ")])
@pytest.mark.parametrize("size", [(1, 1), (1024, 4096), (4000, 3000), (16383, 7)])
def test_sizes_are_read_from_every_format_header(build: Any, size: tuple[int, int]) -> None:
    raw = build(*size)
    assert base64_size(b64(raw)) == size
    assert data_url_size(data_url(raw)) == size


@pytest.mark.parametrize("garbage", [
    "",                                                        # nothing
    "!!!!not base64!!!!",                                      # not base64
    b64(b"\x89PNG\r\n\x1a\n")[:12],                            # truncated after the signature
    b64(png(10, 10))[:20],                                     # truncated inside IHDR
    b64(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 0, 5) + bytes(5)),  # 0 wide
    b64(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 2**31, 5) + bytes(5)),  # absurd
    b64(b"GIF89a\x01"),                                        # truncated GIF
    b64(b"\xff\xd8\xff"),                                      # JPEG: only SOI
    b64(b"\xff\xd8" + b"\xff\xe1\x00\x00" * 50),               # JPEG: a segment length below 2
    b64(b"\xff\xd8" + b"\xff" * 4000),                         # JPEG: fill bytes without end
    b64(b"\xff\xd8" + b"\xff\xe1\xff\xff" + bytes(100)),       # JPEG: a segment running past the data
    b64(b"\xff\xd8" + b"\xff\xe0\x00\x04\x00\x00" * 200 + jpeg(640, 480)[2:]),   # JPEG: more segments than walked
    b64(b"\xff\xd8\xff\xda\x00\x08" + bytes(50)),              # JPEG: a scan before any frame header
    b64(b"\xff\xd8\xff\xc0\x00\x11\x08"),                      # JPEG: truncated frame header
    b64(b"RIFF\x00\x00\x00\x00WEBPVP8Z" + bytes(20)),         # unknown WebP chunk
    b64(b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(20)),         # VP8 without its start code
    b64(png(64, 64))[:16] + " \n" + b64(png(64, 64))[16:],     # whitespace inside the header's base64
])
def test_hostile_headers_give_an_unknown_size_never_an_error(garbage: str) -> None:
    assert base64_size(garbage) is None
    assert data_url_size("data:image/png;base64," + garbage) is None


def test_random_bytes_never_raise() -> None:
    rng = random.Random(11)
    prefixes = [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"]
    for i in range(2000):
        raw = prefixes[i % len(prefixes)] + rng.randbytes(rng.randrange(0, 300))
        size = base64_size(b64(raw))
        assert size is None or (0 < size[0] <= 1 << 16 and 0 < size[1] <= 1 << 16)


def test_urls_that_are_not_base64_data_urls_have_no_size() -> None:
    for url in ("https://example.com/cat.png", "data:image/png," + b64(png(8, 8)), "data:image/png;base64",
                None, 42, "data:" + "x" * 300 + ";base64," + b64(png(8, 8))):
        assert data_url_size(url) is None


# ------------------------------------------------------------------ formulas, per family
@pytest.mark.parametrize("model, size, detail, tokens", [
    # GPT-4o / 4.1 / 4.5: 85 + 170 per tile. The docs' examples: 1024x1024 -> 768x768, 4 tiles; 2048x4096 ->
    # 1024x2048 -> 768x1536, 6 tiles. The 1024x4096 -> 512x2048 -> 768x3072: 2 x 6 tiles.
    ("gpt-4o", (1024, 1024), "high", 85 + 4 * 170),
    ("gpt-4o-2024-08-06", (2048, 4096), "auto", 85 + 6 * 170),
    ("openai/gpt-4.1", (1024, 4096), None, 85 + 12 * 170),
    ("gpt-4o", (4096, 8192), "low", 85),
    ("gpt-4o", (1, 4096), "high", 85 + 16 * 170),           # a thin image: at most 16 tiles
    ("gpt-4o", None, "high", 85 + 16 * 170),                # unknown size: the worst case for high ...
    ("gpt-4o", None, "low", 85),                            # ... and for low
    # GPT-4o mini: 2833 + 5667 per tile
    ("gpt-4o-mini", (1024, 1024), "high", 2833 + 4 * 5667),
    ("gpt-4o-mini", (1024, 1024), "low", 2833),
    # GPT-5: 70 + 140; o1 and o3: 75 + 150; computer use: 65 + 129
    ("gpt-5", (2048, 4096), "high", 70 + 6 * 140),
    ("o3", (1024, 1024), "high", 75 + 4 * 150),
    ("computer-use-preview", (1024, 1024), "high", 65 + 4 * 129),
    # patch models: ceil(w/32) x ceil(h/32) patches, at most 1536, times the multiplier (rounded up)
    ("gpt-4.1-mini", (1024, 1024), "low", 1659),            # 1024 x 1.62 = 1658.88
    ("gpt-4.1-nano", (100, 100), "high", 40),               # 16 x 2.46 = 39.36
    ("gpt-5-mini", (1800, 2400), "high", 2489),             # capped: 1536 x 1.62 = 2488.32
    ("o4-mini", None, "high", 2642),                        # unknown: 1536 x 1.72 = 2641.92
    # Claude: w*h/750 (at least one per 28-px patch) after fitting 1568 px and ~1,600 tokens
    ("claude-sonnet-4-5", (1000, 1000), None, 1334),        # the docs' table: ~1334
    ("claude-3-5-sonnet", (1092, 1092), None, 1590),        # ~1590
    ("anthropic/claude-haiku-4-5", (200, 200), None, 64),   # 8 x 8 patches > 40000/750
    ("claude-sonnet-4-5", (1024, 4096), None, 820),         # 392 x 1568 -> 819.5
    ("claude-sonnet-4-5", (8000, 8000), None, 1600),        # capped
    ("claude-sonnet-4-5", None, "low", 1600),               # unknown: the cap, whatever the detail
    ("claude-opus-4-7", (1024, 4096), None, 2212),          # 644 x 2576 -> 2211.9
    ("claude-opus-4-7", None, None, 5000),
    # no known family: the larger of the GPT-4o and Claude estimates, detail ignored
    ("llama-3.2-vision", (1024, 1024), "low", 1399),        # Claude: 1398.1 > GPT-4o 765
    ("llama-3.2-vision", (1024, 4096), "high", 2125),       # GPT-4o: 2125 > Claude 820
    ("llama-3.2-vision", None, "low", 85 + 16 * 170),
])
def test_formulas_per_family(model: str, size: tuple[int, int] | None, detail: str | None, tokens: int) -> None:
    assert image_tokens(size, detail, model) == tokens


def test_parts_of_every_api_shape() -> None:
    url = data_url(png(1024, 4096))
    chat = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    responses = {"type": "input_image", "image_url": url, "detail": "low"}
    anthropic = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": b64(png(1000, 1000))}}
    remote = {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}
    assert part_tokens(chat, "gpt-4o") == 2125
    assert part_tokens(responses, "gpt-4o") == 85
    assert part_tokens(anthropic, "claude-sonnet-4-5") == 1334
    assert part_tokens(remote, "claude-sonnet-4-5") == 1600
    assert part_tokens({"type": "image_url"}, "gpt-4o") == 85 + 16 * 170   # no URL at all: the worst case


def test_chat_counts_each_image_for_the_counting_model() -> None:
    text = {"type": "text", "text": "What is in these pictures?"}
    images = [{"type": "image_url", "image_url": {"url": data_url(png(1024, 4096)), "detail": "high"}},
              {"type": "image_url", "image_url": {"url": data_url(jpeg(2048, 4096), "image/jpeg")}}]
    base = 3 + count_text("user", "gpt-4o") + 3 + count_text(text["text"], "gpt-4o")
    assert count_chat([{"role": "user", "content": [text, *images]}], "gpt-4o") == base + 2125 + 1105
    claude = 3 + count_text("user", "claude-sonnet-4-5") + 3 + count_text(text["text"], "claude-sonnet-4-5")
    assert count_chat([{"role": "user", "content": [text, *images]}], "claude-sonnet-4-5") == claude + 820 + 1599


def test_families_and_the_image_check() -> None:
    assert image_family("gpt-4o") == image_family("openai/gpt-4o-2024-08-06") == image_family("gpt-4.1")
    assert len({image_family(m) for m in ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "claude-sonnet-4-5",
                                          "claude-opus-4-7", "llama3")}) == 6
    assert image_family("claude-3-5-sonnet") == image_family("anthropic/claude-sonnet-4-5")
    text = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    assert not has_images(text) and not has_images({"messages": "x"}) and not has_images(None)
    assert has_images({"messages": [*text["messages"], {"role": "user", "content": [{"type": "image_url"}]}]})


# ------------------------------------------------------------------ the case, in process
BILLED_PER_IMAGE = 2125          # what the upstream bills for the 1024x4096 high-detail image (the issue)
IN_NANO, OUT_NANO = 1000, 4000   # $1 and $4 per Mtok
POLICY = """\
models:
  vision:
    deployments:
      - provider: openai
        name: vision-mock
        model: gpt-4o
        api_base: {base}
        price: {{input_per_mtok: 1, output_per_mtok: 4}}
  claude-proxy:
    deployments:
      - provider: openai
        name: claude-behind-a-proxy
        model: claude-sonnet-4-5
        api_base: {base}
        capabilities: [chat, vision]
        price: {{input_per_mtok: 3, output_per_mtok: 15}}
routes:
  - name: gpt-then-claude
    match: {{models: [vision-fallback]}}
    candidates: [vision-mock, claude-behind-a-proxy]
    strategy: fallback
"""


class BillingUpstream:
    """An OpenAI-compatible upstream that bills each image as the issue's upstream did (``per_image``: by
    model), every text token as the gateway counts it, and all the output it was allowed (``max_tokens``);
    it answers 500 to the models in ``failing``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.per_image: dict[str, int] = {}
        self.failing: set[str] = set()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                upstream.bodies.append(body)
                if body["model"] in upstream.failing:
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                messages = body["messages"]
                images = sum(1 for m in messages for p in m["content"] if p.get("type") == "image_url")
                text_only = [{**m, "content": [p for p in m["content"] if p.get("type") != "image_url"]}
                             for m in messages]
                prompt = count_chat(text_only, body["model"]) + images * upstream.per_image.get(
                    body["model"], BILLED_PER_IMAGE)
                output = body.get("max_tokens") or body.get("max_completion_tokens")
                raw = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "length",
                                               "message": {"role": "assistant", "content": "word " * output}}],
                                  "usage": {"prompt_tokens": prompt, "completion_tokens": output,
                                            "total_tokens": prompt + output}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def upstream() -> Iterator[BillingUpstream]:
    billing = BillingUpstream()
    yield billing
    billing.server.shutdown()
    billing.server.server_close()
    billing.thread.join(5)


@pytest.fixture
async def gw(tmp_path: Path, upstream: BillingUpstream) -> AsyncIterator[Gateway]:
    async with in_process(tmp_path, POLICY.format(base=upstream.url)) as gateway:
        yield gateway


async def test_a_tall_high_detail_image_is_held_at_what_the_upstream_bills(gw: Gateway,
                                                                          upstream: BillingUpstream) -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Read every line of this receipt."},
        {"type": "image_url", "image_url": {"url": data_url(png(1024, 4096)), "detail": "high"}}]}]
    text_only = [{"role": "user", "content": [messages[0]["content"][0]]}]
    prompt = count_chat(text_only, "gpt-4o") + BILLED_PER_IMAGE
    assert count_chat(messages, "gpt-4o") == prompt          # the estimate is what the upstream bills
    # The key's budget pays for the prompt and 50 output tokens; the client asks for 100. The old estimate
    # (765 per image) held the whole worst case and let the answer settle 200,000 nano above the limit.
    limit = prompt * IN_NANO + 50 * OUT_NANO
    key = await gw.key("vision-team", budget_usd=f"{limit / 1e9:.9f}", budget_period="daily")
    status, raw = await gw.post(key, {"model": "vision", "max_tokens": 100, "messages": messages})
    assert status == 200, raw
    assert upstream.bodies[-1]["max_tokens"] == 50           # the output capped to what the hold pays for
    record = await gw.one_exit("vision-team")
    assert record.input_tokens == prompt and record.output_tokens == 50
    assert record.cost_nano == prompt * IN_NANO + 50 * OUT_NANO == limit   # settled at the limit, not above
    status, raw = await gw.post(key, {"model": "vision", "max_tokens": 100, "messages": messages})
    assert status == 429 and b"budget" in raw                # spent: the next one is refused ...
    assert len(upstream.bodies) == 1                         # ... before any upstream call


async def test_a_fallback_of_another_family_is_held_at_its_own_image_count(gw: Gateway,
                                                                           upstream: BillingUpstream) -> None:
    """GPT-4o first (it fails), Claude behind an OpenAI-compatible proxy second: a 1000x1000 image is 765
    tokens on the first and 1,334 on the second (Anthropic's table); the hold must cover the second."""
    upstream.failing.add("gpt-4o")
    upstream.per_image["claude-sonnet-4-5"] = 1334
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is on this slide?"},
        {"type": "image_url", "image_url": {"url": data_url(jpeg(1000, 1000), "image/jpeg")}}]}]
    text_only = [{"role": "user", "content": [messages[0]["content"][0]]}]
    prompt = count_chat(text_only, "claude-sonnet-4-5") + 1334
    assert count_chat(messages, "claude-sonnet-4-5") == prompt and count_chat(messages, "gpt-4o") < prompt - 500
    limit = prompt * 3000 + 50 * 15000          # the prompt on Claude and 50 of the 100 output tokens asked for
    key = await gw.key("fallback-team", budget_usd=f"{limit / 1e9:.9f}", budget_period="daily")
    status, raw = await gw.post(key, {"model": "vision-fallback", "max_tokens": 100, "messages": messages})
    assert status == 200, raw
    first, second = upstream.bodies
    assert (first["model"], second["model"]) == ("gpt-4o", "claude-sonnet-4-5")
    assert second["max_tokens"] == 50           # capped for the candidate whose prompt costs the most
    record = await gw.one_exit("fallback-team")
    assert (record.input_tokens, record.output_tokens) == (prompt, 50)
    assert record.cost_nano == prompt * 3000 + 50 * 15000 == limit
