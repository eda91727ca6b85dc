"""Conversation search over titles and message text, for one owner.

On SQLite, message text is found through an FTS5 index (``message_search``, created and kept
in step with ``message`` by triggers in migration 0007): word and prefix matches in time that
does not grow with the size of the history. Elsewhere (PostgreSQL), or on an SQLite database
without the index, the same question is asked with ``ILIKE``, which needs no extension and is
fast enough for one person's conversations. Titles are always matched with ``ILIKE``: they
are short and few.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from sqlalchemy import Integer, and_, func, inspect, or_, select, text
from sqlalchemy.orm import Session

from . import paging
from .db import Database
from .models import Conversation, Message, iso

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 200
MAX_TERMS = 8
MAX_RESULTS = 30
FTS_TABLE = "message_search"
_WORD = re.compile(r"\w[\w'-]*", re.UNICODE)


def terms(query: str, limit: int = MAX_TERMS) -> list[str]:
    """The words searched for: letters and digits, at most ``limit``, lower-cased."""
    return [w.lower() for w in _WORD.findall(query)][:limit]


def fts_query(words: list[str]) -> str:
    """An FTS5 MATCH expression: every word, each as a quoted prefix (no operators from users)."""
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words)


def _like(word: str) -> str:
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def snippet(content: str, words: list[str], before: int = 40, after: int = 100) -> str:
    """The words around the first match, on one line, with ellipses where text was cut."""
    flat = " ".join(content.split())
    lowered = flat.lower()
    found = [i for i in (lowered.find(w) for w in words) if i >= 0]
    at = min(found) if found else 0
    start = max(0, at - before)
    end = min(len(flat), at + after)
    return ("…" if start else "") + flat[start:end] + ("…" if end < len(flat) else "")


def _has_fts(session: Session) -> bool:
    bind = session.get_bind()
    if bind.dialect.name != "sqlite":
        return False
    return FTS_TABLE in inspect(bind).get_table_names()


def _matching_conversations_fts(owner_id: str, words: list[str]) -> Any:
    return text(
        f"SELECT m.conversation_id FROM {FTS_TABLE} f JOIN message m ON m.id = f.rowid "
        f"JOIN conversation c ON c.id = m.conversation_id "
        f"WHERE {FTS_TABLE} MATCH :q AND c.owner_id = :owner"
    ).bindparams(q=fts_query(words), owner=owner_id).columns(conversation_id=Integer)


def _matching_conversations_like(words: list[str]) -> Any:
    return select(Message.conversation_id).where(
        and_(*(Message.content.ilike(_like(w), escape="\\") for w in words)))


def _first_hits_fts(session: Session, conv_ids: list[int], words: list[str]) -> list[int]:
    params = {f"c{i}": conv_id for i, conv_id in enumerate(conv_ids)}
    rows = session.execute(
        text(
            f"SELECT min(m.id) FROM {FTS_TABLE} f JOIN message m ON m.id = f.rowid "
            f"WHERE {FTS_TABLE} MATCH :q AND m.conversation_id IN "
            f"({', '.join(':' + name for name in params)}) GROUP BY m.conversation_id"
        ),
        {"q": fts_query(words), **params},
    )
    return [row[0] for row in rows]


def _first_hits_like(session: Session, conv_ids: list[int], words: list[str]) -> list[int]:
    rows = session.execute(
        select(func.min(Message.id))
        .where(Message.conversation_id.in_(conv_ids),
               and_(*(Message.content.ilike(_like(w), escape="\\") for w in words)))
        .group_by(Message.conversation_id)
    )
    return [row[0] for row in rows]


def search(db: Database, owner_id: str, query: str, *, limit: int = MAX_RESULTS,
           cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Conversations whose title or messages hold every word of ``query`` (as word prefixes on
    SQLite's index, as substrings otherwise), most recently active first, in keyset pages as
    the conversation list (paging.py): (a page of ``limit`` after ``cursor``, the next
    cursor or None). Each names its first matching message, with the words around the match."""
    words = terms(query)
    if not words:
        return [], None
    with db.read() as session:
        fts = _has_fts(session)
        in_messages = (_matching_conversations_fts(owner_id, words).subquery() if fts
                       else _matching_conversations_like(words).subquery())
        rows = session.scalars(
            select(Conversation)
            .where(Conversation.owner_id == owner_id, paging.after(cursor),
                   or_(and_(*(Conversation.title.ilike(_like(w), escape="\\") for w in words)),
                       Conversation.id.in_(select(in_messages.c.conversation_id))))
            .order_by(*paging.newest_first())
            .limit(limit + 1)
        ).all()
        found, following = paging.page(rows, limit)
        first_hit: dict[int, Message] = {}
        if found:
            conv_ids = [c.id for c in found]
            hit_ids = (_first_hits_fts if fts else _first_hits_like)(session, conv_ids, words)
            if hit_ids:
                first_hit = {m.conversation_id: m for m in session.scalars(
                    select(Message).where(Message.id.in_(hit_ids)))}
        results = []
        for conversation in found:
            hit = first_hit.get(conversation.id)
            results.append({
                "conversation_id": conversation.public_id,
                "title": conversation.title,
                "updated_at": iso(conversation.updated_at),
                "message_id": hit.public_id if hit else None,
                "snippet": snippet(hit.content, words) if hit else "",
            })
        return results, following
