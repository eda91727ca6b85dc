"""Untrusted JSON in, one set of rules: the API, conversation imports and websocket frames.

Python's ``json`` module accepts things no other JSON reader does, and some of them break the
app later, far from where they came in: ``NaN``/``Infinity`` (stored, then echoed as invalid
JSON), ``1e400`` (a float infinity), integers of any size (SQLite overflows past 2**63), lone
UTF-16 surrogates (``"\\ud800"``: SQLite cannot encode them), and nesting deep enough to exhaust
the recursion limit. ``parse_json_text`` refuses all of these up front with ``Invalid(code, …)``,
so a caller answers 400 (or an ``error`` frame) instead of failing with a 500 halfway through.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from flask.json.provider import DefaultJSONProvider

from .errors import Invalid

MAX_DEPTH = 32  # an export is 4 deep; provenance meta a few more
MAX_SAFE_INTEGER = 2**53  # what a browser's Number holds exactly; SQLite's INTEGER holds 2**63
SAFE_INTS = (-(MAX_SAFE_INTEGER - 1), MAX_SAFE_INTEGER - 1)
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's int64 fields (seed), for /v1 bodies

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, where: str = "text") -> str:
    """``value`` unchanged, or Invalid("bad_text") if it holds a lone surrogate or a NUL.

    A lone surrogate is valid in Python and in JSON's ``\\uXXXX`` escapes, but not UTF-8: the
    database, the websocket and every file export would fail on it later. PostgreSQL's text
    and JSON columns cannot hold a NUL character at all (a 500 on write).
    """
    if _SURROGATE.search(value):
        raise Invalid("bad_text", f"{where} holds an unpaired UTF-16 surrogate")
    if "\x00" in value:
        raise Invalid("bad_text", f"{where} holds a NUL character")
    return value


def _int_parser(ints: tuple[int, int]):
    low, high = ints
    message = f"integers must lie from {low} to {high}"
    max_digits = len(str(low)) + 1  # refuse before int() works on a huge string

    def parse(digits: str) -> int:
        if len(digits) > max_digits or not low <= (value := int(digits)) <= high:
            raise Invalid("bad_number", message)
        return value

    return parse


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise Invalid("bad_number", f"{text[:20]} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise Invalid("bad_number", f"{name} is not a JSON number")


def _check_tree(value: Any, max_depth: int) -> None:
    """No deeper than ``max_depth``; every string and key valid Unicode (no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, "a string")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise Invalid("too_deep", f"the JSON is nested more than {max_depth} deep")
            if isinstance(item, dict):
                for key in item:
                    check_text(key, "a key")
                children = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children if isinstance(child, str | dict | list))


def parse_json_text(raw: str | bytes, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH,
                    ints: tuple[int, int] = SAFE_INTS) -> Any:
    """Parse untrusted JSON strictly; raises ``Invalid`` with a code, never anything else.

    Codes: ``bad_json`` (not JSON, not UTF-8), ``too_large`` (over ``max_bytes``),
    ``too_deep`` (nested deeper than ``max_depth``), ``bad_number`` (NaN, Infinity, a float
    overflow, an integer outside ``ints``: ±2**53 but for /v1's int64), ``bad_text`` (a lone
    surrogate or a NUL in a string or key).
    """
    if isinstance(raw, bytes | bytearray):
        if max_bytes is not None and len(raw) > max_bytes:
            raise Invalid("too_large", f"the JSON is over {max_bytes} bytes")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid("bad_json", "the JSON is not UTF-8") from exc
    elif isinstance(raw, str):
        text = raw
        if max_bytes is not None and len(text) > max_bytes:  # chars ≤ bytes: a cheap first test
            raise Invalid("too_large", f"the JSON is over {max_bytes} bytes")
    else:
        raise Invalid("bad_json", "expected JSON text")
    try:
        value = json.loads(
            text, parse_int=_int_parser(ints), parse_float=_parse_float, parse_constant=_parse_constant
        )
    except Invalid:
        raise
    except RecursionError as exc:  # json's C scanner stops at the recursion limit (~1000 deep)
        raise Invalid("too_deep", f"the JSON is nested more than {max_depth} deep") from exc
    except ValueError as exc:
        raise Invalid("bad_json", f"not valid JSON: {str(exc)[:120]}") from exc
    _check_tree(value, max_depth)
    return value


def check_number(value: Any, where: str, *, minimum: float | None = 0, integer: bool = False) -> Any:
    """A finite JSON number (no bool) within range; Invalid("bad_number") otherwise."""
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise Invalid("bad_number", f"{where} must be {'an integer' if integer else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid("bad_number", f"{where} must be finite")
    if abs(value) >= MAX_SAFE_INTEGER:
        raise Invalid("bad_number", f"{where} is out of range")
    if minimum is not None and value < minimum:
        raise Invalid("bad_number", f"{where} must be at least {minimum}")
    return value


def check_time(value: Any, where: str) -> datetime | None:
    """An ISO 8601 time as the API writes it (naive UTC), None for null, else Invalid.

    ``datetime.fromisoformat`` is not enough: shifting ``0001-01-01T00:00+01:00`` or
    ``9999-12-31T23:59-01:00`` to UTC overflows with an OverflowError, not a ValueError.
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise Invalid("bad_time", f"{where} must be an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value.removesuffix("Z"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError) as exc:
        raise Invalid("bad_time", f"{where} must be an ISO 8601 time") from exc
    return parsed


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON with the same rules both ways: never writes NaN/Infinity (a stored one
    would be a bug, and answering invalid JSON would hide it), never reads what
    ``parse_json_text`` refuses."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json_text(s)
