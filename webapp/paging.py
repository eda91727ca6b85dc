"""Keyset pages of conversations (the list and search): newest first, stable under inserts.

A page is ``limit`` rows after a cursor; the cursor is opaque to clients (the last row's
``updated_at`` and public id), so a page never repeats or skips a row because others
were added meanwhile (as OFFSET would). Ties on ``updated_at`` are broken by the public id,
not the internal one: integer ids stay internal. A conversation that becomes active between
two pages moves to the top: the next fresh first page shows it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import true, tuple_

from .errors import Invalid
from .models import Conversation

MAX_PAGE = 200  # conversations in one page at most; messages in one window of a conversation
# "<updated_at in microseconds since 1970>.<public id>": every string of this shape is a
# place in the order (what the OpenAPI document promises), so only other shapes are refused.
CURSOR_PATTERN = r"^[0-9]{1,17}\.[A-Za-z0-9_-]{1,32}$"
CURSOR = re.compile(CURSOR_PATTERN)
EPOCH = datetime(1970, 1, 1)


def parse_limit(raw: str | None) -> int | None:
    """``limit`` from a query string: None when absent (everything, as before paging)."""
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise Invalid("bad_limit", f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(raw)


def encode_cursor(conv: Conversation) -> str:
    return f"{(conv.updated_at - EPOCH) // timedelta(microseconds=1)}.{conv.public_id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    if not CURSOR.fullmatch(cursor):
        raise Invalid("bad_cursor", "cursor must be a page's next value, as given")
    micros, public_id = cursor.split(".")
    return EPOCH + timedelta(microseconds=int(micros)), public_id


def newest_first() -> tuple[Any, Any]:
    return Conversation.updated_at.desc(), Conversation.public_id.desc()


def after(cursor: str | None) -> Any:
    """The rows after ``cursor`` in newest_first() order (true for every row without one)."""
    if cursor is None:
        return true()
    updated, public_id = decode_cursor(cursor)
    # A row-value comparison: both databases start the index scan at the cursor, where an
    # OR of the two cases would read (and filter) every row of the pages before it.
    return tuple_(Conversation.updated_at, Conversation.public_id) < tuple_(updated, public_id)


def page(rows: list[Conversation], limit: int | None) -> tuple[list[Conversation], str | None]:
    """``rows`` were asked for with ``limit + 1``: the page, and the cursor of the next one."""
    if limit is None or len(rows) <= limit:
        return rows, None
    return rows[:limit], encode_cursor(rows[limit - 1])
