"""Image input tokens: what a provider bills for one image, from its size, its detail and the model.

This module owns reading an image's width and height from its header (PNG, JPEG, GIF, WebP),
from a ``data:`` URL's base64 without decoding the whole image (a few small windows of it,
a bounded walk of JPEG segments; a truncated or garbage header gives "unknown", never an
exception), and the providers' documented formulas:

- OpenAI tile models (GPT-4o, 4.1, 4.5, GPT-5, o1/o3, 4o-mini, ...): ``detail: low`` is the
  family's base tokens; ``high`` and ``auto`` fit the image within 2048x2048, scale its shortest
  side to 768 (the docs' steps read literally: a small image is scaled up, so this never bills
  less than the service), count 512-px tiles and add base + tiles x per-tile tokens, at most
  :data:`MAX_TILES` tiles;
- OpenAI patch models (GPT-4.1 mini/nano, GPT-5 mini/nano, o4-mini): 32-px patches, capped at
  1536, times the model's multiplier (``detail`` does not change it);
- Anthropic (any Claude model): scaled to fit the model's native resolution (long edge and
  token cap), then ``width * height / 750`` tokens, and at least one per 28-px patch.

An image whose size cannot be read (a remote URL, a file id, a broken header) counts as the
worst case for its model and detail: the estimate is what the budget holds, so it must cover
what the provider bills. A model of no known family gets the larger of the GPT-4o and Claude
estimates, whatever its detail.
"""

from __future__ import annotations

import binascii
import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

# OpenAI tile families: (name prefix, base tokens, tokens per 512-px tile); first match wins.
OPENAI_TILES: tuple[tuple[str, int, int], ...] = (
    ("gpt-4o-mini", 2833, 5667),
    ("computer-use", 65, 129),
    ("gpt-5", 70, 140),              # gpt-5, gpt-5-chat-latest (mini/nano are patch models, matched first)
    ("o1", 75, 150), ("o3", 75, 150),
    ("gpt-4o", 85, 170), ("chatgpt-4o", 85, 170), ("gpt-4.1", 85, 170), ("gpt-4.5", 85, 170),
    ("gpt-4-turbo", 85, 170), ("gpt-4-vision", 85, 170),
)
# OpenAI patch families: (name prefix, multiplier as a fraction), checked before the tile families.
OPENAI_PATCHES: tuple[tuple[str, Fraction], ...] = (
    ("gpt-4.1-mini", Fraction(162, 100)), ("gpt-4.1-nano", Fraction(246, 100)),
    ("gpt-5-mini", Fraction(162, 100)), ("gpt-5-nano", Fraction(246, 100)),
    ("o4-mini", Fraction(172, 100)),
)
DEFAULT_TILES = (85, 170)            # GPT-4o's numbers, for the conservative default
TILE_FIT = 2048                      # first fit within 2048 x 2048 ...
TILE_SHORT_SIDE = 768                # ... then the shortest side becomes 768 ...
TILE = 512                           # ... and 512-px tiles are counted
# At most this many tiles: the service bills at most 8 (a 768 x 2048 image); scaling a thin image's
# short side up to 768 can give more (a 1024x4096 image: 12), but a 1-px-wide one would give
# thousands and push an ordinary prompt past every context window. 16 covers 1:5.3.
MAX_TILES = 16
PATCH = 32
MAX_PATCHES = 1536
# Claude: (name fragment, longest edge, most tokens); models not listed get CLAUDE_DEFAULT.
CLAUDE_HIGH_RES: tuple[tuple[str, int, int], ...] = (("opus-4-7", 2576, 5000),)   # ~3.75 MP / 750
CLAUDE_DEFAULT = (1568, 1600)        # long edge 1568 px, ~1.15 MP: "more than ~1,600 tokens" is scaled down
CLAUDE_PIXELS_PER_TOKEN = 750
CLAUDE_PATCH = 28

MAX_SIDE = 1 << 16                   # a header claiming more is not believed (unknown size)
MAX_JPEG_SEGMENTS = 64               # JPEG markers walked before giving up
DATA_URL_META = 256                  # "data:image/...;base64," is looked for in this many characters
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})   # TEM, RSTn, SOI: markers without a length


class _Base64:
    """Bytes of a base64 string read at any offset by decoding only the 4-character groups that hold them."""

    __slots__ = ("text", "start", "size")

    def __init__(self, text: str, start: int) -> None:
        self.text, self.start = text, start
        self.size = (len(text) - start) // 4 * 3   # an upper bound (padding); reads past the data are short

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n <= 0 or offset >= self.size:
            return b""
        first = self.start + offset // 3 * 4
        last = self.start + (offset + n + 2) // 3 * 4
        chunk = self.text[first:last]
        try:
            raw = binascii.a2b_base64(chunk.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return b""
        skip = offset % 3
        return raw[skip:skip + n]


def _be(data: bytes, at: int, n: int) -> int:
    return int.from_bytes(data[at:at + n], "big")


def _le(data: bytes, at: int, n: int) -> int:
    return int.from_bytes(data[at:at + n], "little")


def _jpeg_size(src: _Base64) -> tuple[int, int] | None:
    at = 2   # after SOI
    for _ in range(MAX_JPEG_SEGMENTS):
        head = src.read(at, 9)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:        # fill byte
            at += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            at += 2
            continue
        if marker in _JPEG_SOF:
            if len(head) < 9:
                return None
            return _be(head, 7, 2), _be(head, 5, 2)   # (width, height)
        if marker in (0xD9, 0xDA) or len(head) < 4:  # end of image, or the scan began: no frame header
            return None
        length = _be(head, 2, 2)
        if length < 2:
            return None
        at += 2 + length
    return None


def _size(src: _Base64) -> tuple[int, int] | None:
    head = src.read(0, 30)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        size = (_be(head, 16, 4), _be(head, 20, 4))
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size = (_le(head, 6, 2), _le(head, 8, 2))
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = head[12:16]
        if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a" and len(head) >= 30:
            size = (_le(head, 26, 2) & 0x3FFF, _le(head, 28, 2) & 0x3FFF)
        elif kind == b"VP8L" and head[20:21] == b"\x2f" and len(head) >= 25:
            bits = _le(head, 21, 4)
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"VP8X" and len(head) >= 30:
            size = (_le(head, 24, 3) + 1, _le(head, 27, 3) + 1)
        else:
            return None
    elif head[:3] == b"\xff\xd8\xff":
        found = _jpeg_size(src)
        if found is None:
            return None
        size = found
    else:
        return None
    width, height = size
    return size if 0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE else None


def base64_size(data: Any) -> tuple[int, int] | None:
    """(width, height) of a base64-encoded PNG, JPEG, GIF or WebP, or None when it cannot be read."""
    if not isinstance(data, str):
        return None
    return _size(_Base64(data, 0))


def data_url_size(url: Any) -> tuple[int, int] | None:
    """(width, height) of the image in a ``data:...;base64,`` URL, or None (not one, or unreadable)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    comma = url.find(",", 5, DATA_URL_META)
    if comma < 0 or not url[5:comma].endswith(";base64"):
        return None
    return _size(_Base64(url, comma + 1))


def _strip(model: str) -> str:
    return str(model).strip().lower().rsplit("/", 1)[-1].removeprefix("ft:")


def _tiles(width: int, height: int) -> int:
    w, h = Fraction(width), Fraction(height)
    longest = max(w, h)
    if longest > TILE_FIT:
        w, h = w * TILE_FIT / longest, h * TILE_FIT / longest
    scale = TILE_SHORT_SIDE / min(w, h)
    w, h = w * scale, h * scale
    return min(MAX_TILES, math.ceil(w / TILE) * math.ceil(h / TILE))


def openai_tile_tokens(size: tuple[int, int] | None, detail: Any, base: int, per_tile: int) -> int:
    if detail == "low":
        return base
    tiles = MAX_TILES if size is None else _tiles(*size)
    return base + tiles * per_tile


def openai_patch_tokens(size: tuple[int, int] | None, multiplier: Fraction) -> int:
    patches = MAX_PATCHES if size is None else min(
        MAX_PATCHES, math.ceil(size[0] / PATCH) * math.ceil(size[1] / PATCH))
    return math.ceil(patches * multiplier)


def claude_tokens(size: tuple[int, int] | None, longest_edge: int, most: int) -> int:
    if size is None:
        return most
    w, h = size
    if max(w, h) > longest_edge:
        scale = Fraction(longest_edge, max(w, h))
        w, h = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
    pixels_cap = most * CLAUDE_PIXELS_PER_TOKEN
    if w * h > pixels_cap:        # the token cap binds: scale down to it (the result is capped below anyway)
        shrink = math.sqrt(pixels_cap / (w * h))
        w, h = max(1, math.floor(w * shrink)), max(1, math.floor(h * shrink))
    tokens = max(math.ceil(w * h / CLAUDE_PIXELS_PER_TOKEN), math.ceil(w / CLAUDE_PATCH) * math.ceil(h / CLAUDE_PATCH))
    return min(most, tokens)


def _claude_limits(name: str) -> tuple[int, int]:
    for fragment, edge, most in CLAUDE_HIGH_RES:
        if fragment in name:
            return edge, most
    return CLAUDE_DEFAULT


@lru_cache(maxsize=1024)
def image_family(model: str) -> str:
    """The name of the formula ``model``'s images are billed by (models of one family bill alike)."""
    name = _strip(model)
    if "claude" in name:
        return f"claude:{_claude_limits(name)}"
    for prefix, _ in OPENAI_PATCHES:
        if name.startswith(prefix):
            return prefix
    for prefix, base, per_tile in OPENAI_TILES:
        if name.startswith(prefix):
            return f"tiles:{base}:{per_tile}"
    return "default"


def image_tokens(size: tuple[int, int] | None, detail: Any, model: str) -> int:
    """Tokens ``model`` bills for one image of ``size`` (None: unknown, the worst case) at ``detail``."""
    name = _strip(model)
    if "claude" in name:
        return claude_tokens(size, *_claude_limits(name))
    for prefix, multiplier in OPENAI_PATCHES:
        if name.startswith(prefix):
            return openai_patch_tokens(size, multiplier)
    for prefix, base, per_tile in OPENAI_TILES:
        if name.startswith(prefix):
            return openai_tile_tokens(size, detail, base, per_tile)
    return max(openai_tile_tokens(size, "high", *DEFAULT_TILES), claude_tokens(size, *CLAUDE_DEFAULT))


def part_tokens(part: dict[str, Any], model: str) -> int:
    """Tokens of one image part: chat's ``image_url`` (``{"url", "detail"}``), Responses' ``input_image``
    (``image_url`` a string, ``detail`` beside it) or an Anthropic ``image`` block (a base64 ``source``)."""
    image = part.get("image_url")
    if isinstance(image, dict):
        url, detail = image.get("url"), image.get("detail")
    else:
        url, detail = image, part.get("detail")
    source = part.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        size = base64_size(source.get("data"))
    else:
        size = data_url_size(url)
    return image_tokens(size, detail, model)
