"""The rows of runs: the SQL that writes, reads and closes a reply while a run owns it.

A reply's row is created "streaming" with the user's message (chats.py, one transaction); from
then on it belongs to the run service until it is final: the keeper writes its text and
renews its lease here, another process asks it to stop here, and it is settled here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from ..db import Database, notify_replies
from ..errors import NotFound
from ..models import FINAL_STATUSES, Conversation, Message, Provenance, utcnow


class RunRows:
    def __init__(self, db: Database) -> None:
        self.db = db

    def flush(self, contents: dict[str, str], vouch: list[str]) -> set[str]:
        """One short transaction for every live run of a process: write the text that grew
        (``contents``: message id -> text), renew the lease of the rest (``vouch``), and
        return the ids whose stop another process asked for."""
        now = utcnow()
        others = [v for v in vouch if v not in contents]
        ids = list(contents) + others
        if not ids:
            return set()
        with self.db.write() as session:
            for message_id, text in contents.items():
                session.execute(
                    update(Message)
                    .where(Message.public_id == message_id, Message.status == "streaming")
                    .values(content=text, updated_at=now)
                )
            if others:
                session.execute(
                    update(Message)
                    .where(Message.public_id.in_(others), Message.status == "streaming")
                    .values(updated_at=now)
                )
            notify_replies(session, list(contents))
            rows = session.execute(
                select(Message.public_id).where(Message.public_id.in_(ids), Message.stop_requested)
            )
            return {row[0] for row in rows}

    def finish(self, message_id: str, content: str, status: str,
               provenance: Provenance) -> dict[str, Any] | None:
        """The final state of a run's row; None when the row is gone (conversation deleted)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status}")
        with self.db.write() as session:
            message = session.scalar(select(Message).where(Message.public_id == message_id))
            if message is None:
                return None
            message.record(provenance)
            message.content = content
            message.status = status
            message.updated_at = utcnow()
            message.run_owner = None
            message.stop_requested = False
            session.flush()
            notify_replies(session, [message_id])
            return message.to_dict()

    def reply_state(self, owner_id: str, message_id: str) -> tuple[str, dict[str, Any]]:
        """(conversation id, the reply as stored now): for resuming a reply that another
        process writes, and for regenerating or continuing one. NotFound for someone else's."""
        with self.db.read() as session:
            message = session.scalar(
                select(Message).join(Conversation).where(
                    Message.public_id == message_id, Conversation.owner_id == owner_id,
                    Message.role == "assistant",
                )
            )
            if message is None:
                raise NotFound("reply")
            return message.conversation.public_id, message.to_dict()

    def request_stop(self, owner_id: str, message_id: str) -> bool:
        """Ask whichever process writes this reply to stop it; False if it is not streaming."""
        with self.db.write() as session:
            result = session.execute(
                update(Message)
                .where(
                    Message.public_id == message_id,
                    Message.status == "streaming",
                    Message.conversation_id.in_(
                        select(Conversation.id).where(Conversation.owner_id == owner_id)
                    ),
                )
                .values(stop_requested=True)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount)

    def streaming(self) -> list[tuple[str, str | None, str | None, Any]]:
        """(message id, run owner, engine, last renewed) of every row still streaming."""
        with self.db.read() as session:
            rows = session.execute(
                select(Message.public_id, Message.run_owner, Message.engine, Message.updated_at)
                .where(Message.status == "streaming")
            )
            return [tuple(row) for row in rows]

    def interrupt(self, message_ids: list[str], reason: str) -> int:
        """Rows whose writer died: keep what they hold, marked "interrupted"."""
        if not message_ids:
            return 0
        with self.db.write() as session:
            count = 0
            for message in session.scalars(
                select(Message).where(Message.public_id.in_(message_ids),
                                      Message.status == "streaming")
            ):
                message.status = "interrupted"
                message.finish_reason = "interrupted"
                message.meta = {**(message.meta or {}), "stop_reason": reason}
                message.run_owner = None
                message.updated_at = utcnow()
                count += 1
            notify_replies(session, message_ids)
            return count
