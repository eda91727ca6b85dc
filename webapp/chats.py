"""The chat service: the only code that creates, appends to, renames or deletes conversations.

Every function opens its own short transaction and returns plain dicts, so callers (API
views, the websocket relay) never hold a session while a model is generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from .db import Database
from .errors import AppError, Invalid, NotFound
from .models import ENGINES, FINAL_STATUSES, ROLES, Conversation, Message, new_public_id, utcnow

__all__ = ["ChatService", "Invalid", "NotFound", "Provenance"]

TITLE_MAX = 200
DEFAULT_TITLE = "New chat"


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
        "source": conv.source or "chat",
    }
    if with_messages:
        data["messages"] = [message_dict(m) for m in conv.messages]
    return data


# What a page may set on a reply it writes (the browser engine); "interrupted" is for pagehide.
STATUSES_FROM_PAGE = ("streaming", "complete", "stopped", "failed", "interrupted")


def model_history(messages: list[Message]) -> list[dict[str, str]]:
    """The turns a model sees: role and content, oldest first.

    Failed replies with no text are left out; partial (stopped/failed/interrupted) replies stay
    in, as the user saw them. Many chat templates (Mistral, Gemma) refuse anything but strict
    alternation, so when a message follows one of its own role (a user message after a reply
    that failed empty), the later one stands for both: the earlier one never got an answer,
    and keeping it would fail again in the same way (too long, or a template that raises).
    """
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.status == "streaming" or not (m.content or m.status == "complete"):
            continue
        turn = {"role": m.role, "content": m.content}
        if turns and turns[-1]["role"] == m.role and m.role != "system":
            turns[-1] = turn
        else:
            turns.append(turn)
    return turns


def _apply_provenance(message: Message, provenance: Provenance) -> None:
    message.engine = provenance.engine
    message.backend = provenance.backend
    message.model = provenance.model
    message.prompt_tokens = provenance.prompt_tokens
    message.completion_tokens = provenance.completion_tokens
    message.tokens_per_second = provenance.tokens_per_second
    message.finish_reason = provenance.finish_reason
    message.meta = provenance.meta or None


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
            raise NotFound()
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
        with self.db.read() as session:
            return model_history(self.owned(session, owner_id, public_id).messages)

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

    def begin_reply(
        self, owner_id: str, conversation_id: str | None, provenance: Provenance, *,
        run_owner: str, user_content: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any], list[dict[str, str]]]:
        """One transaction before any model runs: the user's message (when given; a new
        conversation when ``conversation_id`` is None) and the run's assistant row, status
        "streaming". Returns (conversation, user message, reply, the history the model sees).

        One reply is written at a time per conversation: a second would see half of the first
        in its history. Refused before anything is stored."""
        if user_content is not None:
            self.check_content(user_content)
        with self.db.write() as session:
            if conversation_id is None:
                if user_content is None:
                    raise Invalid("empty_content", "the message is empty")
                conv = Conversation(owner_id=owner_id, title=title_from(user_content))
                session.add(conv)
            else:
                conv = self.owned(session, owner_id, conversation_id)
                if any(m.status == "streaming" for m in conv.messages):
                    raise AppError("busy", "a reply is still being written in this conversation; "
                                   "stop it or wait for it first", status=409)
                if user_content is not None and conv.title == DEFAULT_TITLE and not conv.messages:
                    conv.title = title_from(user_content)
            now = utcnow()
            user_message = None
            if user_content is not None:
                user_message = Message(role="user", content=user_content, status="complete")
                conv.messages.append(user_message)
            history = model_history(conv.messages)
            message = Message(
                role="assistant", content="", status="streaming",
                engine=provenance.engine, backend=provenance.backend, model=provenance.model,
                meta=provenance.meta or None, updated_at=now, run_owner=run_owner,
            )
            conv.messages.append(message)
            conv.updated_at = now
            session.flush()
            return (conversation_dict(conv), message_dict(user_message) if user_message else None,
                    message_dict(message), history)

    def finish_reply(
        self, message_id: str, content: str, status: str, provenance: Provenance
    ) -> dict[str, Any] | None:
        """The final state of a run's row; None when the row is gone (conversation deleted)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status}")
        with self.db.write() as session:
            message = session.scalar(select(Message).where(Message.public_id == message_id))
            if message is None:
                return None
            _apply_provenance(message, provenance)
            message.content = content
            message.status = status
            message.updated_at = utcnow()
            message.run_owner = None
            message.stop_requested = False
            session.flush()
            return message_dict(message)

    def flush_runs(
        self, contents: dict[str, str], vouch: list[str]
    ) -> set[str]:
        """One short transaction for every live run of a process: write the text that grew
        (``contents``: message id -> text), renew the lease of the rest (``vouch``), and
        return the ids whose stop another process asked for."""
        now = utcnow()
        ids = list(contents) + [v for v in vouch if v not in contents]
        if not ids:
            return set()
        with self.db.write() as session:
            for message_id, text in contents.items():
                session.execute(
                    update(Message)
                    .where(Message.public_id == message_id, Message.status == "streaming")
                    .values(content=text, updated_at=now)
                )
            others = [v for v in vouch if v not in contents]
            if others:
                session.execute(
                    update(Message)
                    .where(Message.public_id.in_(others), Message.status == "streaming")
                    .values(updated_at=now)
                )
            rows = session.execute(
                select(Message.public_id).where(Message.public_id.in_(ids), Message.stop_requested)
            )
            return {row[0] for row in rows}

    def reply_state(self, owner_id: str, message_id: str) -> dict[str, Any]:
        """A reply as stored now (for resuming a run that another process writes)."""
        with self.db.read() as session:
            message = session.scalar(
                select(Message).join(Conversation).where(
                    Message.public_id == message_id, Conversation.owner_id == owner_id,
                    Message.role == "assistant",
                )
            )
            if message is None:
                raise NotFound("reply")
            data = message_dict(message)
            data["conversation_id"] = message.conversation.public_id
            data["run_owner"] = message.run_owner
            data["lease_at"] = message.updated_at
            return data

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

    def streaming_replies(self) -> list[tuple[str, str | None, str | None, Any]]:
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
            return count

    def update_browser_reply(
        self, owner_id: str, conversation_id: str, message_id: str, content: str,
        status: str, provenance: Provenance | None,
    ) -> dict[str, Any]:
        """A reply the page is writing: it grows while "streaming", then settles once."""
        if status not in STATUSES_FROM_PAGE:
            raise Invalid("bad_status", f"status must be one of {', '.join(STATUSES_FROM_PAGE)}")
        with self.db.write() as session:
            conv = self.owned(session, owner_id, conversation_id)
            message = session.scalar(
                select(Message).where(Message.public_id == message_id,
                                      Message.conversation_id == conv.id)
            )
            if message is None or message.role != "assistant":
                raise NotFound("reply")
            if message.engine != "browser":
                raise Invalid("bad_engine", "only replies written in the page can be updated")
            if message.status != "streaming":
                raise AppError("already_final", f"this reply is already {message.status}",
                               status=409)
            if provenance is not None:
                if provenance.engine != "browser":
                    raise Invalid("bad_engine", "replies posted through the API come from the "
                                  "browser engine")
                _apply_provenance(message, provenance)
            message.content = content
            message.status = status
            message.updated_at = utcnow()
            if status != "streaming":
                message.run_owner = None
            conv.updated_at = utcnow()
            session.flush()
            return message_dict(message)

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
        """Store an assistant reply written in the page: complete, the partial text of a
        stopped/failed one, or the start of one that will grow ("streaming")."""
        if status not in STATUSES_FROM_PAGE:
            raise Invalid("bad_status", f"status must be one of {', '.join(STATUSES_FROM_PAGE)}")
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
                updated_at=utcnow(),
                run_owner="browser" if status == "streaming" else None,
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
                        # A copy never grows: a reply caught mid-stream stays as it was.
                        status=("interrupted" if data.get("status") == "streaming"
                                else data.get("status", "complete")),
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

    # -- calls made through /v1 ------------------------------------------------------------
    def begin_api_reply(
        self, owner_id: str, messages: list[dict[str, Any]], provenance: Provenance, *,
        run_owner: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A stored /v1 call: a new conversation (``source`` "api") holding the request's
        messages and the run's assistant row, status "streaming". Returns (conversation,
        reply). Tool turns are kept as the text the model saw, with their OpenAI fields in
        ``meta.openai``, so the page shows them and they export like any other message."""
        from .engines.structured import render_messages

        first_user = next((m for m in messages if m.get("role") == "user"), None)
        title = title_from(render_messages([first_user])[0]["content"]) if first_user else "API call"
        with self.db.write() as session:
            conv = Conversation(owner_id=owner_id, title=self._clean_title(title), source="api")
            for original in messages:
                turn = render_messages([original])[0]
                extra = {k: original[k] for k in ("tool_calls", "tool_call_id", "name")
                         if k in original}
                if original.get("role") not in ROLES:
                    extra["role"] = original.get("role")
                conv.messages.append(Message(
                    role=turn["role"], content=turn["content"], status="complete",
                    meta={"openai": extra} if extra else None,
                ))
            now = utcnow()
            message = Message(
                role="assistant", content="", status="streaming",
                engine=provenance.engine, backend=provenance.backend, model=provenance.model,
                meta=provenance.meta or None, updated_at=now, run_owner=run_owner,
            )
            conv.messages.append(message)
            conv.updated_at = now
            session.add(conv)
            session.flush()
            return conversation_dict(conv), message_dict(message)
