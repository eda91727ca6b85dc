"""Conversation files: export as JSON (complete and re-importable) or Markdown, and import.

The JSON (version 3) holds every message of the tree as the API shows it (ids, parent ids,
provenance and the options each reply was made with), the conversation's settings and its
current branch, so an export imported and exported again gives the same conversation (only
ids are new). Version 3 adds each user message's files (``attachments``: name, type, size,
sha256 and the extracted text; attachments.py). Version 2 files (no files) and version 1
files (a flat list, no settings) still import, the latter as one branch. The
Markdown export is the branch on screen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .attachments import parse_files
from .errors import Invalid
from .models import ENGINES, FINAL_STATUSES, ROLES, utcnow
from .validation import check_number, check_text, check_time

FORMAT = "bchat.conversation"
VERSION = 3
READS = (1, 2, 3)
MAX_MESSAGES = 10_000
REPLY_CHARS_FACTOR = 4  # replies may be longer than what a user may type


@dataclass(frozen=True)
class ParsedImport:
    title: str
    created_at: datetime | None
    messages: list[dict[str, Any]]
    settings: dict[str, Any] | None = None
    current_message_id: str | None = None


def export_json(conversation: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": utcnow().isoformat(timespec="seconds") + "Z",
        "conversation": {
            "title": conversation["title"],
            "created_at": conversation["created_at"],
            "updated_at": conversation["updated_at"],
            "settings": conversation.get("settings") or {},
            "current_message_id": conversation.get("current_message_id"),
        },
        "messages": conversation["messages"],
    }


def current_branch(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages from the root to the current leaf of a conversation dict."""
    by_id = {m["id"]: m for m in conversation["messages"]}
    node = by_id.get(conversation.get("current_message_id"))
    if node is None:
        return list(conversation["messages"])
    path = []
    while node is not None and len(path) <= len(by_id):
        path.append(node)
        node = by_id.get(node.get("parent_id"))
    return path[::-1]


def _provenance_line(message: dict[str, Any]) -> str:
    parts = [p for p in (message.get("engine"), message.get("backend"), message.get("model")) if p]
    if message.get("tokens_per_second"):
        parts.append(f"{message['tokens_per_second']:.1f} tok/s")
    if message.get("status") not in (None, "complete"):
        parts.append(message["status"])
    return " · ".join(parts)


def export_markdown(conversation: dict[str, Any]) -> str:
    lines = [f"# {conversation['title']}", "", f"_Exported from bchat, {conversation['created_at']}_", ""]
    for message in current_branch(conversation):
        heading = {"user": "User", "assistant": "Assistant", "system": "System",
                   "tool": "Tool"}[message["role"]]
        lines.append(f"## {heading}")
        provenance = _provenance_line(message) if message["role"] == "assistant" else ""
        if provenance:
            lines.append(f"_{provenance}_")
        for attached in message.get("attachments") or []:  # the file's name, not its text
            lines.append(f"_📎 {attached['filename']}_")
        lines += ["", message["content"], ""]
    return "\n".join(lines).rstrip() + "\n"


def _fail(where: str, problem: str) -> Invalid:
    return Invalid("bad_import", f"{where}: {problem}")


def _optional(value: Any, kinds: tuple[type, ...], where: str, *, minimum: float | None = None):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _fail(where, f"must be {' or '.join(k.__name__ for k in kinds)} or null")
    try:
        if isinstance(value, str):
            check_text(value, where)
        else:  # finite, within ±2**53: SQLite and browsers hold it exactly
            check_number(value, where, minimum=minimum, integer=kinds == (int,))
    except Invalid as exc:
        raise _fail(where, exc.message) from exc
    if isinstance(value, str) and len(value) > 200:
        raise _fail(where, "is too long")
    return value


def _time(value: Any, where: str) -> datetime | None:
    try:
        return check_time(value, where)
    except Invalid as exc:
        raise _fail(where, "must be an ISO 8601 time") from exc


def parse_import(data: Any, max_chars: int) -> ParsedImport:
    """Validate an export file (version 1, 2 or 3) or raise Invalid."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail("file", f'not a bchat conversation export (expected "format": "{FORMAT}")')
    version = data.get("version")
    if isinstance(version, bool) or version not in READS:
        raise _fail("version", f"this bchat reads version {' and '.join(map(str, READS))} files")
    conversation = data.get("conversation")
    if not isinstance(conversation, dict):
        raise _fail("conversation", "must be an object")
    title = conversation.get("title")
    if not isinstance(title, str) or not title.strip():
        raise _fail("conversation.title", "must be a non-empty string")
    check_text(title, "conversation.title")
    created_at = _time(conversation.get("created_at"), "conversation.created_at")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise _fail("messages", "must be a list")
    if len(messages) > MAX_MESSAGES:
        raise _fail("messages", f"at most {MAX_MESSAGES} messages")
    clean: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(where, "must be an object")
        tree_fields: dict[str, Any] = {}
        if version >= 2:
            message_id, parent_id = message.get("id"), message.get("parent_id")
            if not isinstance(message_id, str) or not 0 < len(message_id) <= 64:
                raise _fail(f"{where}.id", "must be a string (the message's id in this file)")
            if message_id in seen_ids:
                raise _fail(f"{where}.id", "is used twice")
            if parent_id is not None and (not isinstance(parent_id, str) or parent_id not in seen_ids):
                raise _fail(f"{where}.parent_id", "must be null or the id of an earlier message")
            seen_ids.add(message_id)
            tree_fields = {"id": message_id, "parent_id": parent_id}
        role = message.get("role")
        if role not in ROLES:
            raise _fail(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        content = message.get("content")
        limit = max_chars * (REPLY_CHARS_FACTOR if role == "assistant" else 1)
        if not isinstance(content, str) or len(content) > limit:
            raise _fail(f"{where}.content", f"must be a string of at most {limit} characters")
        check_text(content, f"{where}.content")
        status = message.get("status", "complete")
        if status == "streaming":  # exported mid-reply: the copy will never grow
            status = "interrupted"
        if status not in FINAL_STATUSES:
            raise _fail(f"{where}.status", f"must be one of {', '.join(FINAL_STATUSES)}")
        engine = message.get("engine")
        if engine is not None and engine not in ENGINES:
            raise _fail(f"{where}.engine", f"must be one of {', '.join(ENGINES)} or null")
        usage = message.get("usage") or {}
        if not isinstance(usage, dict):
            raise _fail(f"{where}.usage", "must be an object")
        meta = message.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise _fail(f"{where}.meta", "must be an object")
        created = message.get("created_at")
        _time(created, f"{where}.created_at")  # copy_columns reads it again, by the same rule
        clean.append({
            **tree_fields,
            "role": role,
            "content": content,
            "status": status,
            "created_at": created,
            "engine": engine,
            "backend": _optional(message.get("backend"), (str,), f"{where}.backend"),
            "model": _optional(message.get("model"), (str,), f"{where}.model"),
            "usage": {
                key: _optional(usage.get(key), (int,), f"{where}.usage.{key}", minimum=0)
                for key in ("prompt_tokens", "completion_tokens")
            },
            "tokens_per_second": _optional(
                message.get("tokens_per_second"), (int, float), f"{where}.tokens_per_second", minimum=0
            ),
            "finish_reason": _optional(message.get("finish_reason"), (str,), f"{where}.finish_reason"),
            "meta": meta,
            **({"attachments": parse_files(message.get("attachments"), f"{where}.attachments",
                                           max_chars * REPLY_CHARS_FACTOR * 64)}
               if version >= 3 and message.get("attachments") else {}),
        })
    settings = conversation.get("settings") if version >= 2 else None
    if settings is not None and not isinstance(settings, dict):
        raise _fail("conversation.settings", "must be an object")
    current = conversation.get("current_message_id") if version >= 2 else None
    if current is not None and (not isinstance(current, str) or current not in seen_ids):
        raise _fail("conversation.current_message_id", "must be the id of a message in the file")
    return ParsedImport(title, created_at, clean, settings or None, current)
