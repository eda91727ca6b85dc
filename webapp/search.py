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

from sqlalchemy import and_, inspect, select, text
from sqlalchemy.orm import Session

from .db import Database
from .models import Conversation, Message

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 200
MAX_TERMS = 8
MAX_RESULTS = 30
# Candidate messages looked at before grouping them by conversation.
MAX_MESSAGE_HITS = 300
FTS_TABLE = "message_search"
_WORD = re.compile(r"\w[\w'-]*", re.UNICODE)


def terms(query: str) -> list[str]:
    """The words searched for: letters and digits, at most MAX_TERMS, lower-cased."""
    return [w.lower() for w in _WORD.findall(query)][:MAX_TERMS]


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


def _message_hits_fts(session: Session, owner_id: str, words: list[str]) -> list[int]:
    rows = session.execute(
        text(
            f"SELECT m.id FROM {FTS_TABLE} f JOIN message m ON m.id = f.rowid "
            "JOIN conversation c ON c.id = m.conversation_id "
            f"WHERE {FTS_TABLE} MATCH :q AND c.owner_id = :owner ORDER BY f.rank LIMIT :n"
        ),
        {"q": fts_query(words), "owner": owner_id, "n": MAX_MESSAGE_HITS},
    )
    return [row[0] for row in rows]


def _message_hits_like(session: Session, owner_id: str, words: list[str]) -> list[int]:
    rows = session.execute(
        select(Message.id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.owner_id == owner_id,
               and_(*(Message.content.ilike(_like(w), escape="\\") for w in words)))
        .order_by(Message.id.desc())
        .limit(MAX_MESSAGE_HITS)
    )
    return [row[0] for row in rows]


def search(db: Database, owner_id: str, query: str) -> list[dict[str, Any]]:
    """Conversations whose title or messages hold every word of ``query`` (as word prefixes on
    SQLite's index, as substrings otherwise), most recently active first."""
    words = terms(query)
    if not words:
        return []
    with db.read() as session:
        if _has_fts(session):
            message_ids = _message_hits_fts(session, owner_id, words)
        else:
            message_ids = _message_hits_like(session, owner_id, words)
        first_hit: dict[int, Message] = {}
        if message_ids:
            for message in session.scalars(select(Message).where(Message.id.in_(message_ids))
                                           .order_by(Message.id)):
                first_hit.setdefault(message.conversation_id, message)
        by_title = session.scalars(
            select(Conversation).where(
                Conversation.owner_id == owner_id,
                and_(*(Conversation.title.ilike(_like(w), escape="\\") for w in words)),
            )
        ).all()
        found = {c.id: c for c in by_title}
        missing = set(first_hit) - set(found)
        if missing:
            found.update({c.id: c for c in session.scalars(
                select(Conversation).where(Conversation.id.in_(missing)))})
        ordered = sorted(found.values(), key=lambda c: (c.updated_at, c.id), reverse=True)
        results = []
        for conversation in ordered[:MAX_RESULTS]:
            hit = first_hit.get(conversation.id)
            results.append({
                "conversation_id": conversation.public_id,
                "title": conversation.title,
                "updated_at": conversation.updated_at.isoformat(timespec="milliseconds") + "Z",
                "message_id": hit.public_id if hit else None,
                "snippet": snippet(hit.content, words) if hit else "",
            })
        return results
