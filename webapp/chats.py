"""The chat service: the only code that creates, appends to, renames or deletes conversations.

Every function opens its own short transaction and returns plain dicts, so callers (API
views, the websocket relay) never hold a session while a model is generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from .db import Database
from .models import ENGINES, ROLES, STATUSES, Conversation, Message, new_public_id, utcnow

TITLE_MAX = 200
DEFAULT_TITLE = "New chat"


class NotFound(LookupError):
    """The conversation does not exist or belongs to someone else (callers answer 404)."""


class Invalid(ValueError):
    """Input that breaks a rule; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Provenance:
    engine: str
    model: str | None = None
    backend: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_second: float | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] | None = None


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds") + "Z"


def parse_time(value: object) -> datetime | None:
    """Reads what _iso() writes (UTC, with or without the Z); None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.removesuffix("Z"))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.replace(tzinfo=None)


def message_dict(message: Message) -> dict[str, Any]:
    return {
        "id": message.public_id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "created_at": _iso(message.created_at),
        "engine": message.engine,
        "backend": message.backend,
        "model": message.model,
        "usage": {
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens,
        },
        "tokens_per_second": message.tokens_per_second,
        "finish_reason": message.finish_reason,
        "meta": message.meta or {},
    }


def conversation_dict(conv: Conversation, *, with_messages: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": conv.public_id,
        "title": conv.title,
        "created_at": _iso(conv.created_at),
        "updated_at": _iso(conv.updated_at),
    }
    if with_messages:
        data["messages"] = [message_dict(m) for m in conv.messages]
    return data


def title_from(content: str) -> str:
    line = " ".join(content.split())
    return (line[:60] + "…") if len(line) > 60 else (line or DEFAULT_TITLE)


class ChatService:
    def __init__(self, db: Database, *, max_message_chars: int) -> None:
        self.db = db
        self.max_message_chars = max_message_chars

    # -- lookups ---------------------------------------------------------------------------
    def owned(self, session, owner_id: str, public_id: str) -> Conversation:
        conv = session.scalar(
            select(Conversation).where(
                Conversation.public_id == public_id, Conversation.owner_id == owner_id
            )
        )
        if conv is None:
            raise NotFound(public_id)
        return conv

    def list_conversations(self, owner_id: str) -> list[dict[str, Any]]:
        with self.db.read() as session:
            rows = session.scalars(
                select(Conversation)
                .where(Conversation.owner_id == owner_id)
                .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
            )
            return [conversation_dict(c) for c in rows]

    def get_conversation(self, owner_id: str, public_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            return conversation_dict(self.owned(session, owner_id, public_id), with_messages=True)

    def history(self, owner_id: str, public_id: str) -> list[dict[str, str]]:
        """The messages a model sees: role and content, oldest first.

        Failed replies with no text are left out; partial (stopped/failed) replies stay in, as
        the user saw them.
        """
        with self.db.read() as session:
            conv = self.owned(session, owner_id, public_id)
            return [
                {"role": m.role, "content": m.content}
                for m in conv.messages
                if m.content or m.status == "complete"
            ]

    # -- changes ---------------------------------------------------------------------------
    def create_conversation(self, owner_id: str, title: str | None = None) -> dict[str, Any]:
        with self.db.write() as session:
            conv = Conversation(owner_id=owner_id, title=self._clean_title(title or DEFAULT_TITLE))
            session.add(conv)
            session.flush()
            return conversation_dict(conv)

    def rename(self, owner_id: str, public_id: str, title: str) -> dict[str, Any]:
        with self.db.write() as session:
            conv = self.owned(session, owner_id, public_id)
            conv.title = self._clean_title(title)
            conv.updated_at = utcnow()
            session.flush()
            return conversation_dict(conv)

    def delete(self, owner_id: str, public_id: str) -> None:
        with self.db.write() as session:
            session.delete(self.owned(session, owner_id, public_id))

    def add_user_message(
        self, owner_id: str, conversation_id: str | None, content: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Store what the user typed, before any model runs. Creates the conversation if needed.

        Returns (conversation, message).
        """
        self.check_content(content)
        with self.db.write() as session:
            if conversation_id is None:
                conv = Conversation(owner_id=owner_id, title=title_from(content))
                session.add(conv)
            else:
                conv = self.owned(session, owner_id, conversation_id)
                if conv.title == DEFAULT_TITLE and not conv.messages:
                    conv.title = title_from(content)
            message = Message(role="user", content=content, status="complete")
            conv.messages.append(message)
            conv.updated_at = utcnow()
            session.flush()
            return conversation_dict(conv), message_dict(message)

    def add_reply(
        self,
        owner_id: str,
        conversation_id: str,
        content: str,
        status: str,
        provenance: Provenance,
        *,
        public_id: str | None = None,
    ) -> dict[str, Any]:
        """Store an assistant reply: complete, or the partial text of a stopped/failed one."""
        if status not in STATUSES:
            raise Invalid("bad_status", f"status must be one of {', '.join(STATUSES)}")
        if provenance.engine not in ENGINES:
            raise Invalid("bad_engine", f"engine must be one of {', '.join(ENGINES)}")
        with self.db.write() as session:
            conv = self.owned(session, owner_id, conversation_id)
            message = Message(
                public_id=public_id or new_public_id(),
                role="assistant",
                content=content,
                status=status,
                engine=provenance.engine,
                backend=provenance.backend,
                model=provenance.model,
                prompt_tokens=provenance.prompt_tokens,
                completion_tokens=provenance.completion_tokens,
                tokens_per_second=provenance.tokens_per_second,
                finish_reason=provenance.finish_reason,
                meta=provenance.meta or None,
            )
            conv.messages.append(message)
            conv.updated_at = utcnow()
            session.flush()
            return message_dict(message)

    def import_messages(
        self,
        owner_id: str,
        title: str,
        messages: list[dict[str, Any]],
        *,
        created_at: datetime | None = None,
    ) -> dict[str, Any]:
        """A new conversation holding copies of ``messages`` (already validated message dicts,
        as message_dict() writes them): continuing a share, or importing an export."""
        with self.db.write() as session:
            conv = Conversation(owner_id=owner_id, title=self._clean_title(title or DEFAULT_TITLE))
            if created_at:
                conv.created_at = created_at
            for data in messages:
                usage = data.get("usage") or {}
                conv.messages.append(
                    Message(
                        role=data["role"],
                        content=data["content"],
                        status=data.get("status", "complete"),
                        created_at=parse_time(data.get("created_at")) or utcnow(),
                        engine=data.get("engine"),
                        backend=data.get("backend"),
                        model=data.get("model"),
                        prompt_tokens=usage.get("prompt_tokens"),
                        completion_tokens=usage.get("completion_tokens"),
                        tokens_per_second=data.get("tokens_per_second"),
                        finish_reason=data.get("finish_reason"),
                        meta=data.get("meta") or None,
                    )
                )
            session.add(conv)
            session.flush()
            return conversation_dict(conv, with_messages=True)

    # -- rules -----------------------------------------------------------------------------
    def check_content(self, content: object, *, allow_empty: bool = False) -> str:
        if not isinstance(content, str):
            raise Invalid("bad_content", "content must be a string")
        if not allow_empty and not content.strip():
            raise Invalid("empty_content", "the message is empty")
        if len(content) > self.max_message_chars:
            raise Invalid(
                "content_too_long",
                f"the message is {len(content)} characters; the limit is {self.max_message_chars}",
            )
        return content

    @staticmethod
    def check_role(role: object) -> str:
        if role not in ROLES:
            raise Invalid("bad_role", f"role must be one of {', '.join(ROLES)}")
        return role  # type: ignore[return-value]

    @staticmethod
    def _clean_title(title: object) -> str:
        if not isinstance(title, str) or not title.strip():
            raise Invalid("bad_title", "title must be a non-empty string")
        return " ".join(title.split())[:TITLE_MAX]
