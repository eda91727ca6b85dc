"""The chat service: the only code that creates, appends to, renames or deletes conversations.

Every function opens its own short transaction and returns plain dicts, so callers (API
views, the websocket relay) never hold a session while a model is generating.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, exists, literal, select, update
from sqlalchemy.orm import aliased, joinedload, lazyload
from sqlalchemy.orm.attributes import set_committed_value

from . import attachments as files
from . import paging
from .db import Database, notify_replies
from .errors import AppError, Invalid, NotFound
from .models import (
    ENGINES,
    ROLES,
    STATUSES,
    Conversation,
    Message,
    Provenance,
    Share,
    VisitorSettings,
    new_public_id,
    utcnow,
)
from .options import clean_settings
from .tree import Tree, current_branch, model_history  # noqa: F401 (tests import current_branch here)

log = logging.getLogger(__name__)

TITLE_MAX = 200
DEFAULT_TITLE = "New chat"
# An import's transactions are sized by time, not rows: each aims to hold the write lock for
# IMPORT_HOLD_S, so a busy machine (where 500 rows took 441 ms) gets smaller ones.
IMPORT_HOLD_S = 0.05
IMPORT_CHUNK = 200  # the first transaction's rows, before its time is known
IMPORT_CHUNK_RANGE = (25, 2000)
IMPORTING_OWNER = "~importing~"  # the owner of an import until it is whole (no cookie has "~")
IMPORT_ABANDONED_AFTER = timedelta(hours=1)


MISSING: Any = object()  # "not given", as opposed to an explicit null (e.g. parent_id)


# Replies that can be continued: cut off by the token limit, a stop, or an interruption.
CONTINUABLE = ("complete", "stopped", "interrupted")


# The hot requests' statements, built once with bind parameters (a statement is immutable, and
# SQLAlchemy remembers a built one's cache key): building them per request cost up to 0.6 ms
# of CPU each (bench/request_cost.py), about a tenth of a request.

def _owned_with_query(message_on):
    """A conversation (public_id, owner_id), locked, and the message of it that ``message_on``
    picks, if any."""
    return (select(Conversation, Message)
            .outerjoin(Message, message_on & (Message.conversation_id == Conversation.id))
            .options(lazyload(Message.attachments))
            .where(Conversation.public_id == bindparam("public_id"),
                   Conversation.owner_id == bindparam("owner_id"))
            .with_for_update(key_share=True, of=Conversation))


def _reply_query():
    """A reply (message_id) with its conversation (public_id, owner_id), files and parent's
    public id."""
    parent = aliased(Message)
    return (select(Message, Conversation, parent.public_id).join(Message.conversation)
            .outerjoin(parent, parent.id == Message.parent_id)
            .options(joinedload(Message.attachments))
            .where(Message.public_id == bindparam("message_id"),
                   Conversation.public_id == bindparam("public_id"),
                   Conversation.owner_id == bindparam("owner_id")))


def _up_query():
    """From the message ``start`` of conversation ``conversation_id`` up its branch, ``limit``
    + 1 rows at most (UNION ALL with depth ≤ limit: a cycle cannot loop)."""
    up = (select(Message.id, Message.parent_id, Message.public_id, literal(1).label("depth"))
          .where(Message.id == bindparam("start"),
                 Message.conversation_id == bindparam("conversation_id"))
          .cte("up", recursive=True))
    up = up.union_all(select(Message.id, Message.parent_id, Message.public_id,
                             (up.c.depth + 1).label("depth"))
                      .join(up, Message.id == up.c.parent_id)
                      .where(up.c.depth <= bindparam("limit")))
    return select(up.c.id, up.c.parent_id, up.c.public_id)


OWNED_WITH_CURRENT = _owned_with_query(Message.id == Conversation.current_message_id)
OWNED_WITH_PARENT = _owned_with_query(Message.public_id == bindparam("parent_id"))
REPLY = _reply_query()
UP = _up_query()


def check_message_id(value: Any) -> str:
    """A message id from a client: a string, or Invalid before it reaches a query (where an
    object or a list failed as a 500)."""
    if not isinstance(value, str):
        raise Invalid("bad_frame", "message_id must be a string")
    return value


def title_from(content: str) -> str:
    line = " ".join(content.split())
    return (line[:60] + "…") if len(line) > 60 else (line or DEFAULT_TITLE)


class ChatService:
    def __init__(self, db: Database, *, max_message_chars: int, max_tokens_limit: int = 4096) -> None:
        self.db = db
        self.max_message_chars = max_message_chars
        self.max_tokens_limit = max_tokens_limit

    # -- lookups ---------------------------------------------------------------------------
    def owned(self, session, owner_id: str, public_id: str, *, lock: bool = False) -> Conversation:
        """The visitor's conversation ``public_id``; ``lock``: its row held until the write
        commits, taken by this same SELECT (FOR NO KEY UPDATE, the lock an UPDATE takes, so
        it needs no statement of its own). A writer that inserts messages takes it before its
        INSERT: inserted first, the message's key-share lock on this row, a share's SELECT …
        FOR UPDATE and then the conversation's UPDATE deadlocked on PostgreSQL
        (tests/test_postgres.py's four processes of writers). SQLite's compiler drops it:
        BEGIN IMMEDIATE has already serialised every writer."""
        query = select(Conversation).where(Conversation.public_id == public_id,
                                           Conversation.owner_id == owner_id)
        conv = session.scalar(query.with_for_update(key_share=True) if lock else query)
        if conv is None:
            raise NotFound()
        return conv

    def _owned_with_parent(self, session, owner_id: str, public_id: str,
                           parent_id: Any) -> tuple[Conversation, Message | None]:
        """owned(lock=True) and _parent(parent_id) in the same SELECT where they can be (an
        append's or a page's reply's first statement): the conversation, locked, and the
        message a new one goes under."""
        if parent_id is None or (parent_id is not MISSING and not isinstance(parent_id, str)):
            conv = self.owned(session, owner_id, public_id, lock=True)
            return conv, self._parent(session, conv, parent_id)
        query, params = ((OWNED_WITH_CURRENT, {}) if parent_id is MISSING
                         else (OWNED_WITH_PARENT, {"parent_id": parent_id}))
        row = session.execute(query, {"public_id": public_id, "owner_id": owner_id,
                                      **params}).first()
        if row is None:
            raise NotFound()
        conv, parent = row
        if parent is None and parent_id is MISSING:  # no current message stored (or not its own)
            parent = self._current_leaf(session, conv)
        elif parent is None:
            raise NotFound("message")
        return conv, parent

    def owned_message(self, session, owner_id: str, message_id: Any) -> Message:
        message = session.scalar(
            select(Message).join(Conversation).where(
                Message.public_id == check_message_id(message_id), Conversation.owner_id == owner_id
            )
        )
        if message is None:
            raise NotFound("message")
        return message

    def list_conversations(self, owner_id: str, *, limit: int | None = None,
                           cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first: (a page of ``limit`` after ``cursor``, the next page's cursor or None);
        without ``limit``, every conversation (paging.py)."""
        # ``shared`` in the same query: the sidebar's list is the most frequent read of a class,
        # and a second session for it was a second round of the pool and the database.
        shared = exists().where(Share.conversation_id == Conversation.id, Share.owner_id == owner_id)
        query = (select(Conversation, shared.label("shared"))
                 .where(Conversation.owner_id == owner_id, paging.after(cursor))
                 .order_by(*paging.newest_first()))
        if limit is not None:
            query = query.limit(limit + 1)
        with self.db.read() as session:
            rows = session.execute(query).all()
            flags = {conv.id: flag for conv, flag in rows}
            page, following = paging.page([conv for conv, _flag in rows], limit)
            return [{**c.to_dict(), "shared": bool(flags[c.id])} for c in page], following

    def get_conversation(self, owner_id: str, public_id: str, *, limit: int | None = None,
                         before: str | None = None) -> dict[str, Any]:
        """The conversation with every message (export's tree), or with ``limit``/``before``
        a window of its current branch (window below)."""
        with self.db.read() as session:
            conv = self.owned(session, owner_id, public_id)
            if limit is None and before is None:
                return conv.to_dict(Tree(conv.messages))
            return self._window(session, conv, limit or paging.MAX_PAGE, before)

    def _window(self, session, conv: Conversation, limit: int, before: str | None) -> dict[str, Any]:
        """Up to ``limit`` messages of the current branch ending at its leaf, or ending just
        above the message ``before`` (the page above one already shown), with the siblings of
        each (the ‹ 2/3 › switcher counts them; their own branches are not sent). ``earlier``
        is the ``before`` of the page above, null once the window reaches the root.

        Only the rows sent are read: a recursive query up the branch for its ids (_up), then
        the branch's messages with their siblings by the parent_id index, in one query; a
        long conversation costs the same to open as a short one."""
        if before is not None:
            anchor = session.execute(select(Message.parent_id).where(
                Message.public_id == check_message_id(before),
                Message.conversation_id == conv.id)).first()
            if anchor is None:
                raise NotFound("message")
            start = anchor.parent_id
            up = self._up(session, conv.id, start, limit)
        else:
            # the current message as stored, checked by the walk itself (its first row must
            # be this conversation's); else the newest leaf (_current_leaf's slower way)
            start = conv.current_message_id
            up = self._up(session, conv.id, start, limit)
            if not up:
                leaf = self._current_leaf(session, conv)
                start = leaf.id if leaf is not None else None
                up = self._up(session, conv.id, start, limit)
        # the branch's ids, root first, and above its top the one message the walk read past
        # (limit + 1 rows): the top's parent, whose public id the top's parent_id is
        path: list[int] = []
        node = start
        while node is not None and node in up and len(path) < limit:
            path.append(node)
            node = up[node][0]
            if node in path:  # a cycle (the depth bound ended its walk): stop where it closes
                break
        path.reverse()
        messages: list[Message] = []
        if path:
            # The window's messages with their siblings, in one query: every message of the
            # branch is a child of a parent of the branch (or, at the root, a root).
            parents = [p for p in {up[m][0] for m in path} if p is not None]
            shown = Message.parent_id.in_(bindparam("parents", expanding=True))
            if up[path[0]][0] is None:  # the roots: the first message's versions
                shown = shown | ((Message.conversation_id == conv.id) & Message.parent_id.is_(None))
            messages = session.scalars(select(Message).where(shown).order_by(Message.id),
                                       {"parents": parents}).all()
        # parent ids as public ids: those in the window, and the top's parent above it
        public = {m.id: m.public_id for m in messages}
        top_parent = up[path[0]][0] if path else None
        if top_parent is not None and top_parent in up:
            public[top_parent] = up[top_parent][1]
        missing = {m.parent_id for m in messages if m.parent_id is not None} - public.keys()
        if missing:
            public.update(session.execute(select(Message.id, Message.public_id)
                                          .where(Message.id.in_(missing))).all())
        data = conv.to_dict()
        data["messages"] = [m.to_dict(public) for m in messages]
        if before is not None:
            leaf = self._current_leaf(session, conv)
            data["current_message_id"] = leaf.public_id if leaf is not None else None
        else:
            data["current_message_id"] = public.get(path[-1]) if path else None
        data["earlier"] = public.get(path[0]) if top_parent is not None else None
        return data

    @staticmethod
    def _up(session, conversation_id: int, start: int | None,
            limit: int) -> dict[int, tuple[int | None, str]]:
        """From ``start`` (one of this conversation's messages) up its branch, ``limit`` + 1
        messages at most: id → (parent id, public id), in one recursive query bounded by a
        depth counter (UNION ALL with depth ≤ limit: a cycle cannot loop). Empty when
        ``start`` is not this conversation's."""
        if start is None:
            return {}
        rows = session.execute(UP, {"start": start, "conversation_id": conversation_id,
                                    "limit": limit})
        return {row.id: (row.parent_id, row.public_id) for row in rows}

    def conversation_settings(self, owner_id: str, public_id: str | None) -> dict[str, Any]:
        """What a reply in this conversation starts from (a new one: the visitor's defaults)."""
        if public_id is None:
            return self.get_defaults(owner_id)
        with self.db.read() as session:
            return dict(self.owned(session, owner_id, public_id).settings or {})

    def history(self, owner_id: str, public_id: str) -> list[dict[str, str]]:
        """What a model would see for a new reply on the current branch."""
        with self.db.read() as session:
            conv = self.owned(session, owner_id, public_id)
            leaf = self._current_leaf(session, conv)
            return model_history(self._path(session, leaf.id) if leaf else [])

    def prompt_files(self, owner_id: str, conversation_id: str, leaf_id: Any, *,
                     context: int, max_tokens: int) -> dict[str, Any]:
        """For the browser engine: the file blocks a model is given with the branch ending at
        ``leaf_id`` (message id → text before it), as a server engine is given them, and
        what they hold (a reply's ``meta.files``)."""
        with self.db.read() as session:
            conv = self.owned(session, owner_id, conversation_id)
            leaf = session.scalar(select(Message).where(
                Message.public_id == check_message_id(leaf_id), Message.conversation_id == conv.id))
            if leaf is None:
                raise NotFound("message")
            path = self._path(session, leaf.id)
            blocks, given = files.file_blocks(session, path, files.budget(context, max_tokens))
            return {"blocks": {m.public_id: blocks[m.id] for m in path if m.id in blocks},
                    "files": given}

    def with_file_texts(self, conversation: dict[str, Any]) -> dict[str, Any]:
        """A conversation dict whose messages' files carry their text (export v3)."""
        wanted = [m["id"] for m in conversation["messages"] if m.get("attachments")]
        if not wanted:
            return conversation
        with self.db.read() as session:
            texts = files.texts_for(session, wanted)
        messages = [{**m, "attachments": texts[m["id"]]} if m["id"] in texts else m
                    for m in conversation["messages"]]
        return {**conversation, "messages": messages}

    # -- the few rows a change needs -------------------------------------------------------
    # Appending, starting a reply and continuing one read only the rows they need (the parent,
    # the branch a model sees), never the whole conversation (Conversation.messages): their
    # cost stays the same on the thousandth message as on the first.
    @staticmethod
    def _path(session, message_id: int | None) -> list[Message]:
        """From the root to ``message_id``, inclusive: the branch, walked up by parent_id in
        one recursive query (UNION, not UNION ALL: a cycle could not loop forever)."""
        if message_id is None:
            return []
        up = (select(Message.id, Message.parent_id).where(Message.id == message_id)
              .cte("up", recursive=True))
        up = up.union(select(Message.id, Message.parent_id).join(up, Message.id == up.c.parent_id))
        return Tree(session.scalars(select(Message).join(up, Message.id == up.c.id)
                                    .order_by(Message.id)).all()).path(message_id)

    @staticmethod
    def _leaf_from(session, message_id: int) -> int:
        """The newest leaf below ``message_id`` (tree.Tree.leaf_from, one indexed step a level)."""
        node = message_id
        while (child := session.scalar(select(Message.id).where(Message.parent_id == node)
                                       .order_by(Message.id.desc()).limit(1))) is not None:
            node = child
        return node

    def _current_leaf(self, session, conv: Conversation) -> Message | None:
        """The branch on screen's last message (tree.Tree.current without the whole tree)."""
        if conv.current_message_id is not None:
            current = session.scalar(select(Message).options(lazyload(Message.attachments)).where(
                Message.id == conv.current_message_id, Message.conversation_id == conv.id))
            if current is not None:
                return current
        last = session.scalar(select(Message.id).where(Message.conversation_id == conv.id)
                              .order_by(Message.id.desc()).limit(1))
        return session.get(Message, self._leaf_from(session, last)) if last is not None else None

    @staticmethod
    def _has_messages(session, conv: Conversation) -> bool:
        return session.scalar(select(Message.id).where(Message.conversation_id == conv.id)
                              .limit(1)) is not None

    # -- settings --------------------------------------------------------------------------
    def clean_settings(self, raw: Any) -> dict[str, Any]:
        """Validated conversation settings; a null value removes a setting."""
        return clean_settings(raw, {"MAX_TOKENS_LIMIT": self.max_tokens_limit,
                                    "MAX_MESSAGE_CHARS": self.max_message_chars})

    @staticmethod
    def _merge(base: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base or {})
        for key, value in changes.items():
            if value is None or (key == "system" and value == ""):
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    def get_defaults(self, owner_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            row = session.get(VisitorSettings, owner_id)
            return dict(row.settings) if row else {}

    def set_defaults(self, owner_id: str, raw: Any) -> dict[str, Any]:
        changes = self.clean_settings(raw)
        with self.db.write() as session:
            row = session.get(VisitorSettings, owner_id)
            if row is None:
                row = VisitorSettings(owner_id=owner_id, settings={})
                session.add(row)
            row.settings = self._merge(row.settings, changes)
            row.updated_at = utcnow()
            return dict(row.settings)

    # -- changes ---------------------------------------------------------------------------
    def create_conversation(self, owner_id: str, title: str | None = None) -> dict[str, Any]:
        defaults = self.get_defaults(owner_id)
        with self.db.write() as session:
            conv = Conversation(owner_id=owner_id, title=self._clean_title(title or DEFAULT_TITLE),
                                settings=defaults or None)
            session.add(conv)
            session.flush()
            return conv.to_dict()

    def update(self, owner_id: str, public_id: str, *, title: Any = MISSING,
               current_message_id: Any = MISSING, settings: Any = MISSING,
               window: int | None = None) -> dict[str, Any]:
        """Rename, switch branch (to the newest leaf below the given message), change settings;
        a switch answers with the new branch: its last ``window`` messages, or the whole tree."""
        changes = self.clean_settings(settings) if settings is not MISSING else None
        with self.db.write() as session:
            conv = self.owned(session, owner_id, public_id)
            if title is not MISSING:
                conv.title = self._clean_title(title)
                conv.updated_at = utcnow()
            if current_message_id is not MISSING:
                if not isinstance(current_message_id, str):
                    raise Invalid("bad_message_id", "current_message_id must be a message id")
                target = session.scalar(select(Message.id).where(
                    Message.public_id == current_message_id, Message.conversation_id == conv.id))
                if target is None:
                    raise NotFound("message")
                conv.current_message_id = self._leaf_from(session, target)
            if changes is not None:
                conv.settings = self._merge(conv.settings, changes) or None
            session.flush()
            if current_message_id is MISSING:
                return conv.to_dict()
            # the new branch: a window of it when asked (the page), else the whole tree
            if window is not None:
                return self._window(session, conv, window, None)
            return conv.to_dict(Tree(conv.messages))

    def delete(self, owner_id: str, public_id: str) -> None:
        with self.db.write() as session:
            session.delete(self.owned(session, owner_id, public_id))

    def _parent(self, session, conv: Conversation, parent_id: Any) -> Message | None:
        """Where a new message goes: MISSING = after the current leaf, None = a new root."""
        if parent_id is MISSING:
            return self._current_leaf(session, conv)
        if parent_id is None:
            return None
        if not isinstance(parent_id, str):
            raise Invalid("bad_parent", "parent_id must be a message id or null")
        parent = session.scalar(select(Message).options(lazyload(Message.attachments)).where(
            Message.public_id == parent_id, Message.conversation_id == conv.id))
        if parent is None:
            raise NotFound("message")
        return parent

    @staticmethod
    def _refuse_busy(session, conv: Conversation) -> None:
        streaming = session.scalar(select(Message.id).where(
            Message.conversation_id == conv.id, Message.status == "streaming").limit(1))
        if streaming is not None:
            raise AppError("busy", "a reply is still being written in this conversation; "
                           "stop it or wait for it first")

    def add_user_message(
        self, owner_id: str, conversation_id: str | None, content: str, *,
        parent_id: Any = MISSING, settings: dict[str, Any] | None = None,
        attachments: Any = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Store what the user typed, before any model runs (the browser engine's path: the
        page writes the reply). Creates the conversation if needed. Returns (conversation,
        message)."""
        conv, message, _, _ = self.begin_turn(owner_id, conversation_id, content, [],
                                              run_owner="browser", parent_id=parent_id,
                                              settings=settings, attachments=attachments)
        return conv, message

    def begin_turn(
        self, owner_id: str, conversation_id: str | None, content: str,
        provenances: list[Provenance], *, run_owner: str, parent_id: Any = MISSING,
        settings: dict[str, Any] | None = None, attachments: Any = None,
        context: int | None = None, max_tokens: int = 0, vision: bool = False,
        model: str = "this model", image_types: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[dict[str, str]]]:
        """One transaction before any model runs: the user's message (under ``parent_id``, by
        default after the current leaf; a new conversation when ``conversation_id`` is None)
        and an assistant row per (engine, model), status "streaming", siblings side by side
        when compared; the first is the current branch until the user picks another. Returns
        (conversation, user message, replies, the history the model sees: the path to the
        user message).

        One reply (or comparison) is written at a time per conversation: a second would race
        the first for the current branch. Refused before anything is stored. Without
        ``provenances`` (the browser engine: the page writes the reply) it stores the message.

        ``attachments``: uploads sent with the message (attachments.link); ``context``: the
        model's context in tokens, which the branch's files are fitted to (with_files), what
        was given recorded in each reply's ``meta.files``; ``vision``: whether the ``model``
        takes images (an image sent to one that does not is refused, as it is to the page's
        own engine)."""
        self.check_content(content)
        attachment_ids = files.check_ids(attachments)
        with self.db.write() as session:
            if conversation_id is None:
                merged = self._merge(self.get_defaults(owner_id), settings or {})
                conv = Conversation(owner_id=owner_id, title=title_from(content),
                                    settings=merged or None)
                session.add(conv)
                session.flush()
                parent = None
            else:
                conv, parent = self._owned_with_parent(session, owner_id, conversation_id, parent_id)
                if provenances:  # a page writing its own reply checks for itself
                    self._refuse_busy(session, conv)
                if conv.title == DEFAULT_TITLE and not self._has_messages(session, conv):
                    conv.title = title_from(content)
            user = Message(conversation_id=conv.id, role="user", content=content,
                           status="complete", parent_id=parent.id if parent else None)
            session.add(user)
            session.flush()
            if attachment_ids:
                files.link(session, owner_id, attachment_ids, conv.id, user.id)
                if not provenances:
                    files.refuse_images(session, user.id, "the page's engine does not take images")
            else:  # none: known without a SELECT for them
                set_committed_value(user, "attachments", [])
            # The branch up to the user's message: read only when a model will see it (the
            # page's own engine keeps its history itself).
            path = (self._path(session, parent.id) if parent and provenances else
                    [parent] if parent else []) + [user]
            seen, given = files.with_files(session, path, context if provenances else None,
                                           max_tokens, vision=vision, model=model,
                                           image_types=image_types)
            replies = [self._reply_row(session, conv, user, provenance, run_owner)
                       for provenance in provenances]
            for reply in replies:
                if given:
                    reply.meta = {**(reply.meta or {}), "files": given}
            session.flush()
            # One UPDATE of the (already locked) conversation row, at commit.
            conv.current_message_id = replies[0].id if replies else user.id
            conv.updated_at = utcnow()
            parents = {m.id: m.public_id for m in path}
            return (conv.to_dict(), user.to_dict(parents), [r.to_dict(parents) for r in replies],
                    model_history(seen) if provenances else [])

    def begin_regenerate(
        self, owner_id: str, message_id: Any, provenance: Provenance, *, run_owner: str,
        context: int | None = None, max_tokens: int = 0, vision: bool = False,
        model: str = "this model", image_types: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[dict[str, str]]]:
        """A new reply beside ``message_id`` (a sibling under the same user message); the
        model sees the path to that user message, never the sibling."""
        with self.db.write() as session:
            original = self.owned_message(session, owner_id, message_id)
            if original.role != "assistant" or original.parent_id is None:
                raise Invalid("not_a_reply", "only a reply can be regenerated")
            conv = original.conversation
            self._refuse_busy(session, conv)
            path = self._path(session, original.parent_id)
            asked = path[-1]
            seen, given = files.with_files(session, path, context, max_tokens, vision=vision,
                                           model=model, image_types=image_types)
            reply = self._reply_row(session, conv, asked, provenance, run_owner)
            if given:
                reply.meta = {**(reply.meta or {}), "files": given}
            session.flush()
            conv.current_message_id = reply.id
            parents = {**{m.id: m.public_id for m in path}, reply.id: reply.public_id}
            return (conv.to_dict(), asked.to_dict(parents), reply.to_dict(parents),
                    model_history(seen))

    def begin_continue(
        self, owner_id: str, message_id: Any, *, run_owner: str, context: int | None = None,
        max_tokens: int = 0, vision: bool = False, model: str = "this model",
        image_types: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, str]]]:
        """Reopen a reply cut off (by the token limit, a stop or an interruption) to write
        more into the same message. The history ends with the reply itself, as the prefix
        the model continues. Returns (conversation, reply as it was, history)."""
        with self.db.write() as session:
            reply = self.owned_message(session, owner_id, message_id)
            conv = reply.conversation
            if reply.role != "assistant" or reply.status not in CONTINUABLE:
                raise Invalid("not_continuable", "only a reply that was cut off (by the token "
                              "limit, a stop or an interruption) can be continued")
            if reply.status == "complete" and reply.finish_reason != "length":
                raise Invalid("not_continuable", "this reply is finished; regenerate it instead")
            self._refuse_busy(session, conv)
            if session.scalar(select(Message.id).where(Message.parent_id == reply.id)
                              .limit(1)) is not None:
                raise Invalid("not_continuable", "only the last reply of a branch can be continued")
            path = self._path(session, reply.parent_id)
            before = reply.to_dict({m.id: m.public_id for m in path})
            seen, _given = files.with_files(session, path, context, max_tokens, vision=vision,
                                            model=model, image_types=image_types)
            history = model_history(seen)
            history.append({"role": "assistant", "content": reply.content})
            reply.status = "streaming"
            reply.run_owner = run_owner
            reply.updated_at = utcnow()
            conv.current_message_id = reply.id
            conv.updated_at = utcnow()
            return conv.to_dict(), before, history

    def store_tool_step(
        self, message_id: str, content: str, provenance: Provenance | None,
        tool_calls: list[dict[str, Any]], results: list[dict[str, Any]], next_reply: Provenance,
        *, run_owner: str, only_streaming: bool = False, context: int | None = None,
        max_tokens: int = 0, vision: bool = False, model: str = "this model",
        image_types: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]] | None:
        """One step of the tool loop (runs/service.py, and the page's: tools/steps.py), in one
        transaction: the reply that called tools becomes complete with its ``tool_calls``
        (``provenance`` None: a reply resumed by ``continue`` keeps the one it had), a ``tool``
        message per result, one under the other, and the next reply, "streaming", under the
        last: the branch on screen. Returns (reply, tool messages, next reply, the history the
        model sees next); None when the conversation was deleted meanwhile. ``only_streaming``:
        a reply settled meanwhile (a page's second post of the same step) is refused.
        ``context`` … ``model``: as begin_turn's, so the model still sees the branch's files
        after a step (the page's engine is given them by GET …/files instead)."""
        with self.db.write() as session:
            reply = session.scalar(select(Message).where(Message.public_id == message_id))
            if reply is None:
                return None
            if only_streaming and reply.status != "streaming":
                raise AppError("already_final", f"this reply is already {reply.status}")
            conv = reply.conversation
            if provenance is not None:
                reply.record(provenance)
            reply.meta = {**(reply.meta or {}), "tool_calls": tool_calls}
            reply.finish_reason = "tool_calls"
            reply.content = content
            reply.status = "complete"
            reply.run_owner = None
            reply.stop_requested = False
            reply.updated_at = utcnow()
            conv.updated_at = utcnow()  # before the first flush: the row is locked first (begin_turn)
            parent, tools = reply, []
            for result in results:
                row = Message(conversation_id=conv.id, role="tool", content=result["content"],
                              status="complete", parent_id=parent.id, meta=result["meta"])
                session.add(row)
                session.flush()
                tools.append(row)
                parent = row
            following = self._reply_row(session, conv, parent, next_reply, run_owner)
            session.flush()
            conv.current_message_id = following.id
            path = self._path(session, parent.id)
            seen, given = files.with_files(session, path, context, max_tokens, vision=vision,
                                           model=model, image_types=image_types)
            if given:
                following.meta = {**(following.meta or {}), "files": given}
            parents = {m.id: m.public_id for m in path}
            parents[following.id] = following.public_id
            notify_replies(session, [message_id])
            return (reply.to_dict(parents), [t.to_dict(parents) for t in tools],
                    following.to_dict(parents), model_history(seen))

    def page_tool_turn(self, owner_id: str, conversation_id: str, message_id: Any = None, *,
                       reply: bool = False) -> tuple[dict[str, Any], int]:
        """For the browser engine's tool loop (tools/steps.py): the conversation's settings and
        the tool steps its turn has taken on the branch down to ``message_id`` (those since the
        user message; none without one). ``reply``: ``message_id`` is a reply the page is
        writing (a browser reply, "streaming"), the only kind whose calls the page may post."""
        with self.db.read() as session:
            conv = self.owned(session, owner_id, conversation_id)
            settings = dict(conv.settings or {})
            if message_id is None:
                return settings, 0
            message = session.scalar(select(Message).where(
                Message.public_id == check_message_id(message_id), Message.conversation_id == conv.id))
            if message is None or (reply and message.role != "assistant"):
                raise NotFound("reply" if reply else "message")
            if reply and message.engine != "browser":
                raise Invalid("bad_engine", "only a reply written in the page posts its tool "
                              "calls; the server runs its own")
            if reply and message.status != "streaming":
                raise AppError("already_final", f"this reply is already {message.status}")
            steps = 0
            for m in reversed(self._path(session, message.id)):
                if m.role == "user":
                    break
                steps += m.role == "assistant" and m.finish_reason == "tool_calls"
            return settings, steps

    @staticmethod
    def _reply_row(session, conv: Conversation, parent: Message | None, provenance: Provenance,
                   run_owner: str) -> Message:
        """A run's assistant row, "streaming" from the start (a /v1 call's has no parent).
        ``conv`` has its id already (added by conversation_id: appending to conv.messages
        would load every message first). Touching ``conv`` here makes its UPDATE come before
        the reply's INSERT in the flush: the conversation row is locked first (begin_turn)."""
        now = utcnow()
        reply = Message(conversation_id=conv.id, role="assistant", content="",
                        status="streaming", updated_at=now,
                        parent_id=parent.id if parent else None, run_owner=run_owner)
        reply.record(provenance)
        set_committed_value(reply, "attachments", [])  # a reply has no files of its own
        session.add(reply)
        conv.updated_at = now
        return reply

    def update_browser_reply(
        self, owner_id: str, conversation_id: str, message_id: str, content: str,
        status: str, provenance: Provenance | None, *, reopen: bool = False,
    ) -> dict[str, Any]:
        """A reply the page is writing: it grows while "streaming", then settles; ``reopen``
        (a continue in the page) makes a settled one grow again."""
        if status not in STATUSES:  # a page may set any ("interrupted": on pagehide)
            raise Invalid("bad_status", f"status must be one of {', '.join(STATUSES)}")
        with self.db.write() as session:
            # The reply, its conversation and its files in one SELECT (a page sends one every
            # 2 s while it writes); its conversation's UPDATE still comes first in the flush.
            found = session.execute(REPLY, {
                "message_id": check_message_id(message_id), "public_id": conversation_id,
                "owner_id": owner_id}).unique().first()
            if found is None:
                self.owned(session, owner_id, conversation_id)  # no such conversation: its 404
            message, conv, parent_public_id = found if found is not None else (None, None, None)
            if message is None or message.role != "assistant":
                raise NotFound("reply")
            if message.engine != "browser":
                raise Invalid("bad_engine", "only replies written in the page can be updated")
            if message.status != "streaming":
                # Continuing a cut-off reply in the page reopens it: the same row grows from
                # the text it holds (what the server's "continue" does with its own replies).
                # Asked for explicitly: a page's late flush ("streaming", the same text) must
                # not reopen the reply it has just settled.
                reopens = (reopen and status == "streaming" and message.status in CONTINUABLE
                           and content.startswith(message.content or ""))
                if not reopens:
                    raise AppError("already_final", f"this reply is already {message.status}")
                message.run_owner = "browser"
            if provenance is not None:
                if provenance.engine != "browser":
                    raise Invalid("bad_engine", "replies posted through the API come from the "
                                  "browser engine")
                message.record(provenance)
            message.content = content
            message.status = status
            message.updated_at = utcnow()
            if status != "streaming":
                message.run_owner = None
            conv.updated_at = utcnow()
            session.flush()
            notify_replies(session, [message.public_id])  # a page's reply: its watchers elsewhere
            return message.to_dict({message.parent_id: parent_public_id})

    def add_reply(
        self,
        owner_id: str,
        conversation_id: str,
        content: str,
        status: str,
        provenance: Provenance,
        *,
        public_id: str | None = None,
        parent_id: Any = MISSING,
    ) -> dict[str, Any]:
        """Store an assistant reply written in the page: complete, the partial text of a
        stopped/failed one, or the start of one that will grow ("streaming")."""
        if status not in STATUSES:  # a page may set any ("interrupted": on pagehide)
            raise Invalid("bad_status", f"status must be one of {', '.join(STATUSES)}")
        if provenance.engine not in ENGINES:
            raise Invalid("bad_engine", f"engine must be one of {', '.join(ENGINES)}")
        with self.db.write() as session:
            conv, parent = self._owned_with_parent(session, owner_id, conversation_id, parent_id)
            message = Message(
                conversation_id=conv.id, public_id=public_id or new_public_id(),
                parent_id=parent.id if parent else None, role="assistant", content=content,
                status=status, updated_at=utcnow(),
                run_owner="browser" if status == "streaming" else None,
            )
            message.record(provenance)
            set_committed_value(message, "attachments", [])  # a reply has no files of its own
            session.add(message)
            session.flush()
            conv.current_message_id = message.id  # one UPDATE of the locked row, at commit
            conv.updated_at = utcnow()
            return message.to_dict({parent.id: parent.public_id} if parent else {})

    def import_messages(
        self,
        owner_id: str,
        title: str,
        messages: list[dict[str, Any]],
        *,
        created_at: datetime | None = None,
        settings: dict[str, Any] | None = None,
        current_message_id: str | None = None,
    ) -> dict[str, Any]:
        """A new conversation holding copies of ``messages`` (validated message dicts, as
        Message.to_dict() writes them): continuing a share, or importing an export. Messages with
        ``parent_id`` keep their tree (ids are new); without, they form one branch in order.

        Up to 10,000 messages: they are written in transactions sized to hold the write lock
        about IMPORT_HOLD_S each (the rows of the next one scale with the last one's time), so
        no transaction holds it for long, and other visitors' writes go on between them. The
        conversation belongs to nobody (a hidden owner) until the last transaction hands it
        over, so nobody sees it half-written; a failed import deletes it.
        """
        tree_shaped = any("parent_id" in data for data in messages)
        # The tree in memory first: each message's parent as an index into ``messages``. A
        # parent must come earlier (parse_import checks it; a snapshot is in id order).
        index_of: dict[str, int] = {}
        parents: list[int | None] = []
        for i, data in enumerate(messages):
            if tree_shaped:
                parents.append(index_of.get(data["parent_id"]) if data.get("parent_id") else None)
            else:
                parents.append(i - 1 if i else None)
            if data.get("id"):
                index_of[data["id"]] = i
        current = index_of.get(current_message_id) if current_message_id else None
        if current is None and messages:
            current = len(messages) - 1
        rows = [Message.copy_columns(data) for data in messages]

        hidden = f"{IMPORTING_OWNER}{new_public_id()}"
        self._sweep_abandoned_imports()
        with self.db.write() as session:
            conv = Conversation(owner_id=hidden, title=self._clean_title(title or DEFAULT_TITLE),
                                settings=settings or None, updated_at=utcnow())
            if created_at:
                conv.created_at = created_at
            session.add(conv)
            session.flush()
            conv_id = conv.id
        serialised = self.db.engine.dialect.name == "sqlite"
        try:
            ids: list[int] = []
            start, size = 0, IMPORT_CHUNK
            while start < len(rows):
                began = time.monotonic()
                self._insert_chunk(conv_id, rows, parents, ids, start, size)
                took = time.monotonic() - began
                start += size
                low, high = IMPORT_CHUNK_RANGE
                size = max(low, min(high, int(size * IMPORT_HOLD_S / max(took, 0.001))))
                if serialised:
                    # SQLite hands its write lock to whoever polls first, not to whoever
                    # waited longest: stepping aside as long as the chunk held it lets the
                    # other writers in (PostgreSQL's writers do not queue on one lock).
                    time.sleep(max(0.001, took))
            with self.db.write() as session:
                # Files (export v3, shares) with their messages, before the hand-over.
                for i, data in enumerate(messages):
                    if data.get("attachments"):
                        files.copy_files(session, owner_id, conv_id, ids[i], data["attachments"])
                session.execute(
                    update(Conversation).where(Conversation.id == conv_id).values(
                        owner_id=owner_id, updated_at=utcnow(),
                        current_message_id=ids[current] if current is not None else None))
        except BaseException:
            self._drop_hidden(conv_id)
            raise
        with self.db.read() as session:
            conv = session.get(Conversation, conv_id)
            return conv.to_dict(Tree(conv.messages))

    def _insert_chunk(self, conv_id: int, rows: list[dict[str, Any]], parents: list[int | None],
                      ids: list[int], start: int, size: int) -> None:
        """Rows ``start`` … ``start + size`` of an import in one transaction; ``ids`` grows by
        their ids.

        Plain executemany (the driver's fast path: no RETURNING); the new ids are then read
        back in id order, which is insertion order: ids only grow within one connection's
        inserts (SQLite's rowid, PostgreSQL's sequence), and nobody else can write to a
        conversation that has no owner yet."""
        table = Message.__table__
        chunk = rows[start:start + size]
        after = ids[-1] if ids else 0
        with self.db.write() as session:
            values = []
            for offset, row in enumerate(chunk):
                parent = parents[start + offset]
                # A parent in an earlier chunk has its id already; one in this chunk is set
                # just below, once the rows have theirs.
                values.append({**row, "conversation_id": conv_id, "stop_requested": False,
                               "updated_at": None, "run_owner": None,
                               "parent_id": ids[parent] if parent is not None and parent < start
                               else None})
            session.execute(table.insert(), values)
            new_ids = session.scalars(
                select(table.c.id).where(table.c.conversation_id == conv_id, table.c.id > after)
                .order_by(table.c.id)).all()
            if len(new_ids) != len(chunk):
                raise RuntimeError(f"import: wrote {len(chunk)} rows, read back {len(new_ids)}")
            ids.extend(new_ids)
            inside = [{"row_id": ids[start + offset], "new_parent": ids[parent]}
                      for offset in range(len(chunk))
                      if (parent := parents[start + offset]) is not None and parent >= start]
            if inside:
                session.execute(table.update().where(table.c.id == bindparam("row_id"))
                                .values(parent_id=bindparam("new_parent")), inside)

    def _drop_hidden(self, conv_id: int) -> None:
        try:
            with self.db.write() as session:
                session.execute(delete(Conversation).where(Conversation.id == conv_id))
        except Exception:  # the sweep of abandoned imports removes it later
            log.exception("could not remove a failed import's rows")

    def _sweep_abandoned_imports(self) -> None:
        """Imports a crash left hidden (an hour old: no import takes that long) are removed."""
        cutoff = utcnow() - IMPORT_ABANDONED_AFTER
        with self.db.read() as session:
            stale = session.scalars(select(Conversation.id).where(
                Conversation.owner_id.startswith(IMPORTING_OWNER, autoescape=True),
                Conversation.updated_at < cutoff)).all()
        for conv_id in stale:
            self._drop_hidden(conv_id)

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
                if original.get("role") != turn["role"]:  # developer, tool: kept as text
                    extra["role"] = original.get("role")
                conv.messages.append(Message(
                    role=turn["role"], content=turn["content"], status="complete",
                    meta={"openai": extra} if extra else None,
                ))
            session.add(conv)
            session.flush()  # the reply row is added by the conversation's id
            message = self._reply_row(session, conv, None, provenance, run_owner)
            session.flush()
            return conv.to_dict(), message.to_dict()
