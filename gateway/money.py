"""Integer money: USD amounts to and from integer nano-USD (1e-9) and pico-USD (1e-12).

This module owns the exact conversions every other money-handling module uses:
every USD amount goes through ``Decimal(str(x))`` and is rounded half-up once;
no float touches money except :func:`nano_to_usd`, which formats integer nano-USD
for JSON output.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation

PICO_PER_USD = Decimal(10) ** 12
PICO_PER_USD_PER_MTOK = Decimal(10) ** 6   # 1 USD per million tokens = 1e6 pico per token
NANO_PER_USD = Decimal(10) ** 9
EXACT = Context(prec=80, rounding=ROUND_HALF_UP, traps=[InvalidOperation])   # no silent rounding


def round_half_up(value: Decimal, scale: Decimal = Decimal(1)) -> int:
    """``value × scale`` rounded half-up to an integer (exact up to 80 digits)."""
    try:
        return int(EXACT.multiply(value, scale).quantize(Decimal(1), context=EXACT))
    except InvalidOperation:
        raise ValueError(f"amount out of range: {value}") from None


def to_decimal(value: float | str | int | Decimal, what: str = "amount") -> Decimal:
    """A finite Decimal from a number or numeric string; ValueError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    return result


def usd_to_nano(usd: float | str | int) -> int:
    """USD (e.g. a budget in a policy file) to integer nano-USD, exactly, rounded half-up."""
    return round_half_up(to_decimal(usd, "USD amount"), NANO_PER_USD)


def nano_to_usd(nano: int) -> float:
    """Nano-USD as a float for JSON; its repr is the exact decimal (e.g. 123456 -> 0.000123456)."""
    return nano / 1e9


def pico_from_usd(value: float | str | int) -> int:
    """A per-token USD price (e.g. litellm's 1.5e-07) to integer pico-USD, exactly."""
    usd = to_decimal(value, "price")
    if usd < 0:
        raise ValueError(f"price must not be negative, got {value!r}")
    return round_half_up(usd, PICO_PER_USD)


def pico_to_nano(pico: int) -> int:
    """Pico-USD to nano-USD, rounded half-up (the one rounding of a request's cost)."""
    return (pico + 500) // 1000


def usd_text(nano: int) -> str:
    """Integer nano-USD as the shortest exact decimal: ``0.05``, ``3``, ``0.000000001``, ``-0.1``."""
    if nano < 0:
        return "-" + usd_text(-nano)
    if nano < 1_000_000_000:   # most prices of a request (on every reply's header and access line)
        return ("0.%09d" % nano).rstrip("0") if nano else "0"  # noqa: UP031 (a fifth faster than f"{nano:09d}")
    whole, frac = divmod(nano, 1_000_000_000)
    return ("%d.%09d" % (whole, frac)).rstrip("0") if frac else str(whole)  # noqa: UP031
