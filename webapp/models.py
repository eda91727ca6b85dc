"""The stored data: conversations, their messages, share snapshots and API keys.

Integer primary keys stay internal; URLs and the API use random ``public_id`` strings.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, LargeBinary, MetaData, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .validation import check_time

# A naming convention gives every constraint a stable name, which Alembic's batch mode
# (SQLite table rebuilds) needs to find and drop them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# "tool": a tool's result in a conversation with tools on (runs/service.py's loop); its
# call id and name are in its meta, as the assistant message that called it holds tool_calls.
ROLES = ("system", "user", "assistant", "tool")
# A reply is "streaming" while a run writes it (its row exists from the start and grows), then
# ends as one of FINAL_STATUSES: "interrupted" when the process (or the page) running it died.
FINAL_STATUSES = ("complete", "stopped", "failed", "interrupted")
STATUSES = ("streaming", *FINAL_STATUSES)
ENGINES = ("server", "browser")
SOURCES = ("chat", "api")
PROVENANCE_TEXT_MAX = 200  # backend, model, finish_reason


def new_public_id() -> str:
    # Never with a leading "-": `bchat keys revoke ID` would read such an id as an option.
    while (public_id := secrets.token_urlsafe(12)).startswith("-"):
        pass
    return public_id


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    """How every stored time is written out: UTC, milliseconds, a Z."""
    return value.isoformat(timespec="milliseconds") + "Z" if value is not None else None


@dataclass(frozen=True)
class Provenance:
    """Who wrote a reply, with what, how fast: the columns a reply's writer fills in."""

    engine: str
    model: str | None = None
    backend: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_second: float | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] | None = None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Conversation(Base):
    __tablename__ = "conversation"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    owner_id: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The messages form a tree (Message.parent_id); this is the leaf of the branch on screen.
    # A plain pointer, not a foreign key: conversation -> message -> conversation would be a
    # cycle of constraints; the chat service keeps it valid and falls back to the newest leaf.
    current_message_id: Mapped[int | None]
    # The conversation's own reply settings (system, temperature, top_p, max_tokens, model,
    # engine): a new conversation starts from the visitor's defaults, never from another's.
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Where it came from: "chat" (the page) or "api" (a /v1 call made with an API key).
    source: Mapped[str] = mapped_column(String(16), default="chat", server_default="chat")

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    # The list's keyset pages (paging.py) read (owner, updated_at, public_id) in index order.
    __table_args__ = (Index("ix_conversation_owner_updated_public_id", "owner_id", "updated_at",
                            "public_id"),)

    def to_dict(self, tree: Any = None) -> dict[str, Any]:
        """The conversation as the API shows it; with ``tree`` (a tree.Tree of its messages,
        passed in so this module needs no tree code) its messages and the branch on screen."""
        data: dict[str, Any] = {
            "id": self.public_id,
            "title": self.title,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "settings": self.settings or {},
            "source": self.source or "chat",
        }
        if tree is not None:
            parents = tree.public_ids()
            data["messages"] = [m.to_dict(parents) for m in tree.messages]
            current = tree.current(self)
            data["current_message_id"] = parents.get(current) if current is not None else None
        return data


class Message(Base):
    __tablename__ = "message"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversation.id", ondelete="CASCADE"), index=True
    )
    # The message this one answers or follows; None for a conversation's first message.
    # Siblings (same parent) are alternatives: an edited prompt, a regenerated reply.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="complete", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Provenance of assistant replies: who wrote it, with what, how fast. The free-text fields
    # are as wide as the API and imports accept (200 characters): PostgreSQL enforces VARCHAR
    # lengths, so a narrower column turned a valid request into a server error there.
    engine: Mapped[str | None] = mapped_column(String(16))
    backend: Mapped[str | None] = mapped_column(String(PROVENANCE_TEXT_MAX))
    model: Mapped[str | None] = mapped_column(String(PROVENANCE_TEXT_MAX))
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    tokens_per_second: Mapped[float | None]
    finish_reason: Mapped[str | None] = mapped_column(String(PROVENANCE_TEXT_MAX))
    # Anything else worth keeping about how the reply was made (trimmed turns, error text).
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # While streaming: when the row last grew or was vouched for, and which process writes it
    # ("host|pid|nonce"), so another process can tell a live run from a dead one.
    updated_at: Mapped[datetime | None]
    run_owner: Mapped[str | None] = mapped_column(String(120))
    # Set by a process that cannot reach the run itself (another gunicorn worker); the
    # owning process sees it on its next flush and stops the run.
    stop_requested: Mapped[bool] = mapped_column(default=False, server_default=false())

    # "Is a reply streaming in this conversation?" without reading its messages (0011).
    __table_args__ = (Index("ix_message_conversation_status", "conversation_id", "status"),)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")
    parent: Mapped[Message | None] = relationship(remote_side=[id], viewonly=True)
    # The files sent with a user message (attachments.py), read with the messages in one
    # query per batch; their text is deferred (loaded only where a prompt or export needs it).
    attachments: Mapped[list[Attachment]] = relationship(
        order_by="Attachment.id", lazy="selectin", viewonly=True)

    def record(self, provenance: Provenance) -> None:
        for column, value in vars(provenance).items():  # its fields are these columns
            setattr(self, column, value)
        self.meta = provenance.meta or None

    @staticmethod
    def copy_columns(data: Mapping[str, Any]) -> dict[str, Any]:
        """A new row's columns from a validated message dict, as to_dict() writes it (import,
        continuing a share); its place in the tree (parent) is set by the caller."""
        usage = data.get("usage") or {}
        return {
            "public_id": new_public_id(),
            "role": data["role"],
            "content": data["content"],
            # A copy never grows: a reply caught mid-stream stays as it was.
            "status": "interrupted" if data.get("status") == "streaming"
            else data.get("status", "complete"),
            "created_at": check_time(data.get("created_at"), "created_at") or utcnow(),
            "engine": data.get("engine"),
            "backend": data.get("backend"),
            "model": data.get("model"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "tokens_per_second": data.get("tokens_per_second"),
            "finish_reason": data.get("finish_reason"),
            "meta": data.get("meta") or None,
        }

    def to_dict(self, parents: Mapping[int, str] | None = None) -> dict[str, Any]:
        """The one mapping of a message to its dict (API, socket, export, shares, provenance).
        ``parents`` maps internal ids to public ids when a whole tree is being written."""
        parent_id = None
        if self.parent_id is not None:
            if parents is not None and self.parent_id in parents:
                parent_id = parents[self.parent_id]
            elif self.parent is not None:
                parent_id = self.parent.public_id
        return {
            "id": self.public_id,
            "parent_id": parent_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "created_at": iso(self.created_at),
            "engine": self.engine,
            "backend": self.backend,
            "model": self.model,
            "usage": {"prompt_tokens": self.prompt_tokens,
                      "completion_tokens": self.completion_tokens},
            "tokens_per_second": self.tokens_per_second,
            "finish_reason": self.finish_reason,
            "meta": self.meta or {},
            **({"attachments": [a.to_dict() for a in self.attachments]} if self.attachments
               else {}),
        }


class Share(Base):
    """A read-only snapshot of a conversation, reachable by whoever holds its link.

    Only a hash of the link's token is stored for lookups; ``token_sealed`` lets the owner see
    the link again (the token encrypted and authenticated with keys derived from the app's
    secret key, so a copy of the database alone reveals no working link; ``seal_version`` says
    how, see shares.py: rows from before migration 0003 are version 1). The snapshot is a copy: deleting the
    conversation leaves the share readable until the owner revokes it.
    """

    __tablename__ = "share"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    owner_id: Mapped[str] = mapped_column(String(64), index=True)
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversation.id", ondelete="SET NULL"), unique=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_sealed: Mapped[str] = mapped_column(String(160))
    seal_version: Mapped[int] = mapped_column(default=2, server_default="1")
    title: Mapped[str] = mapped_column(String(200))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class VisitorSettings(Base):
    """A visitor's defaults for new conversations (the "Defaults" panel)."""

    __tablename__ = "visitor_settings"

    owner_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Benchmark(Base):
    """One engine's run of the fixed prompt set (webapp/benchmarks.py) on one model, with
    coarse facts about the device (cores, memory class, GPU name, browser family)."""

    __tablename__ = "benchmark"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    owner_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    engine: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    model_facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    device: Mapped[dict[str, Any]] = mapped_column(JSON)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class ApiKey(Base):
    """A key for ``/v1``: calls made with it act as ``owner_id``. Only a sha256 of the token
    is stored (the token is 256 random bits: no salt or slow hash is needed); ``prefix`` is
    its first characters, so the owner can tell keys apart in a list."""

    __tablename__ = "api_key"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    owner_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.public_id, "name": self.name, "prefix": self.prefix,
                "owner": self.owner_id, "created_at": iso(self.created_at),
                "last_used_at": iso(self.last_used_at), "revoked": self.revoked_at is not None,
                "revoked_at": iso(self.revoked_at)}


# -- accounts (BCHAT_ACCOUNTS, webapp/accounts.py) -----------------------------------------------

ACCOUNT_ROLES = ("admin", "user")


class Account(Base):
    """A signed-in person. Everything they own is stored under ``owner_id``, the same kind of
    id an anonymous cookie holds, so the rest of the app needs no second notion of "whose";
    signing in only changes which owner id a browser acts as. ("account", not "user": USER is
    a reserved word in PostgreSQL.)"""

    __tablename__ = "account"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    username: Mapped[str] = mapped_column(String(64), unique=True)  # stored lower-cased
    password_hash: Mapped[str | None] = mapped_column(String(200))  # argon2id; None: OIDC only
    # "issuer|sub" of the OpenID Connect identity that signs in to it (oidc.py), if any.
    oidc_subject: Mapped[str | None] = mapped_column(String(400), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    disabled: Mapped[bool] = mapped_column(default=False, server_default=false())
    owner_id: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_sign_in_at: Mapped[datetime | None]
    # Quotas of this account; None: the site's default (Quota row "default").
    tokens_per_day: Mapped[int | None]
    replies_in_flight: Mapped[int | None]


class AccountSession(Base):
    """One browser signed in to an account. The cookie holds a random token; only its sha256
    is stored, so the list can show and revoke sessions and a database copy signs no one in."""

    __tablename__ = "account_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    user_agent: Mapped[str | None] = mapped_column(String(200))
    address: Mapped[str | None] = mapped_column(String(64))
    how: Mapped[str] = mapped_column(String(16), default="password", server_default="password")
    revoked_at: Mapped[datetime | None]


class DeviceLink(Base):
    """A one-time "use on another device" link: it signs that device in to ``account_id``, or
    (accounts off) gives it the anonymous ``owner_id``. Only the token's sha256 is stored."""

    __tablename__ = "device_link"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"),
                                                   index=True)
    owner_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class SiteSetting(Base):
    """Settings an admin changes on the admin page (the default quota): one JSON per name."""

    __tablename__ = "site_setting"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """What admins did and who signed in (or failed to): the admin page's audit log."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(64))  # a username; None: the shell
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str | None] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class UsageCarry(Base):
    """The replies of deleted conversations, counted per owner, day, engine and model, so that
    deleting a chat neither hides usage from the admin nor resets a quota (accounts.py)."""

    __tablename__ = "usage_carry"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64), index=True)
    day: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD, UTC
    engine: Mapped[str | None] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(PROVENANCE_TEXT_MAX))
    replies: Mapped[int]
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
class Attachment(Base):
    """A file sent with a user message: its facts and the text extracted from it (a text or
    PDF file's bytes are not kept: the model only ever sees the text), or an image's bytes
    (``data``, with its ``width`` and ``height``: images.py). Uploaded before the message
    is sent, it belongs to its visitor alone (``message_id`` null) until a message takes it;
    then it is deleted with that message's conversation (ON DELETE CASCADE)."""

    __tablename__ = "attachment"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    owner_id: Mapped[str] = mapped_column(String(64), index=True)
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversation.id", ondelete="CASCADE"), index=True)
    message_id: Mapped[int | None] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    mime: Mapped[str] = mapped_column(String(100))
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text, deferred=True)
    chars: Mapped[int]
    tokens: Mapped[int]
    pages: Mapped[int | None]  # PDFs: their page count
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # An image's bytes and size in pixels (migration 0014_images); null for text and PDF.
    data: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    width: Mapped[int | None]
    height: Mapped[int | None]

    @property
    def is_image(self) -> bool:
        return self.width is not None

    def to_dict(self) -> dict[str, Any]:
        found = {"id": self.public_id, "filename": self.filename, "mime": self.mime,
                 "size": self.size, "sha256": self.sha256, "tokens": self.tokens,
                 "chars": self.chars, "pages": self.pages}
        if self.is_image:
            found.update(width=self.width, height=self.height)
        return found


class AttachmentPassage(Base):
    """A passage of an attachment's text (a page of a PDF, or up to ~1,200 characters of
    whole lines), the unit retrieval ranks and a reply cites. On SQLite an FTS5 index
    (``passage_search``, migration 0012) is kept in step with it by triggers."""

    __tablename__ = "attachment_passage"

    id: Mapped[int] = mapped_column(primary_key=True)
    attachment_id: Mapped[int] = mapped_column(
        ForeignKey("attachment.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int]
    page: Mapped[int | None]
    line_start: Mapped[int]
    line_end: Mapped[int]
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int]
