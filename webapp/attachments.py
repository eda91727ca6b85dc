"""Files in the chat: upload, text extraction, passages, and the text a model is given.

A visitor uploads a file (``POST /api/attachments``) before sending the message it goes with;
its text is extracted here (text and code as UTF-8, HTML as its text, PDF through ``pypdf``)
and kept, cut into passages: a PDF page (longer pages in several), or up to PASSAGE_CHARS of
whole lines of any other file. The bytes are not kept: the model only ever sees the text.
An image (PNG, JPEG, WebP or GIF, known by its bytes: images.py) is kept whole instead, for
the models that take images (a vision upstream): served back to its owner only
(``GET /api/attachments/<id>/content``), and given to such a model as an ``image_url`` part
of its message; any other model is refused it when it is sent (``images_not_supported``),
and sees older images of the branch as a line naming them.
The message that is sent with the file takes it (``link``), and it is deleted with that
message's conversation.

**What the model sees.** Each user message's files come before its text, one block a file::

    <file name="report.pdf" pages="3">
    …the extracted text…
    </file>

    What does the report say about …?

When a branch's files hold more tokens than FILES_SHARE of the context (after the reply's
room), retrieval chooses: the passages of those files are ranked against the newest user
message by full-text search (SQLite FTS5 ``bm25``, PostgreSQL ``ts_rank``: the machinery of
search.py, no embedding model), and the best are given, as many as fit, each headed by where
it comes from (``[page 3]``, ``[lines 10-42]``) in a block marked ``part="passages"``. The
reply records which it was given (``meta.files``), and the page's ⓘ lists them. Both server
engines get this text from ``history_with_files``; the browser engine asks for the same text
(``GET /api/conversations/<id>/files``), built by the same function.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, undefer

from . import images
from .db import Database
from .errors import AppError, Invalid, NotFound
from .models import Attachment, AttachmentPassage, Conversation, Message, utcnow
from .search import terms

log = logging.getLogger(__name__)

PASSAGE_CHARS = 1200  # a passage: ~300 tokens, small enough that several fit a small context
CHARS_PER_TOKEN = 3  # the page's cautious estimate (ui/composer.js): no model tokenizer here
FILES_SHARE = 0.5  # files may fill this share of the context left after the reply's room
MAX_FILES_PER_MESSAGE = 10
MAX_FILENAME = 255
RETRIEVAL_TERMS = 32
UNSENT_KEPT = timedelta(days=1)  # an upload no message took is removed after this
FTS_TABLE = "passage_search"
PDF_MAGIC = b"%PDF-"
# Types a file may say it is that are text whatever their extension; anything that decodes as
# UTF-8 without NULs is taken as text too (code, logs, CSV with an odd extension).
HTML_TYPES = ("text/html", "application/xhtml+xml")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".heic", ".avif", ".svg",
                    ".tif", ".tiff", ".ico")
IMAGE_KINDS = "PNG, JPEG, WebP or GIF"


def estimate_tokens(text_: str) -> int:
    return math.ceil(len(text_) / CHARS_PER_TOKEN)


# -- extraction --------------------------------------------------------------------------------

@dataclass
class Extracted:
    mime: str
    text: str
    pages: int | None = None  # a PDF's pages, separated by form feeds in ``text``


class _HTMLText(html.parser.HTMLParser):
    """An HTML page as the text a reader sees: no scripts or styles, blocks on their own lines."""

    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
              "section", "article", "table", "ul", "ol", "blockquote", "hr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode(data: bytes) -> str | None:
    """UTF-8 (or UTF-16 with its byte-order mark) text without NULs, else None."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    try:
        decoded = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in decoded else decoded


def _pdf_text(data: bytes) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Invalid("bad_file", "this PDF is locked with a password: unlock it first")
        pages = [(page.extract_text() or "").replace("\f", "\n").replace("\x00", "").strip()
                 for page in reader.pages]
    except AppError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        raise Invalid("bad_file", f"this PDF could not be read: {str(exc)[:200]}") from exc
    if not any(pages):
        raise Invalid("no_text", "this PDF has no text to read (a scan? its pages are images)")
    return Extracted("application/pdf", "\f".join(pages), pages=len(pages))


def extract(data: bytes, filename: str, declared: str | None = None) -> Extracted:
    """The text of an uploaded file, or a 4xx saying why there is none."""
    declared = (declared or "").split(";")[0].strip().lower()
    name = filename.lower()
    if data.startswith(PDF_MAGIC) or name.endswith(".pdf"):
        return _pdf_text(data)
    if declared.startswith("image/") or name.endswith(IMAGE_EXTENSIONS):
        # (an image of the four types never gets here: upload() takes it by its bytes; SVG is
        # a document that can run script, never an image here)
        raise AppError("unsupported_file", f"this kind of image can't be sent to a model: "
                       f"attach {IMAGE_KINDS} images, or text, code, Markdown, CSV, JSON, HTML "
                       "or PDF files")
    decoded = _decode(data)
    if decoded is None:
        raise AppError("unsupported_file", "this file is neither text nor PDF: attach text, code, "
                       "Markdown, CSV, JSON, HTML or PDF")
    decoded = decoded.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    if declared in HTML_TYPES or name.endswith((".html", ".htm", ".xhtml")):
        parser = _HTMLText()
        parser.feed(decoded)
        parser.close()
        return Extracted("text/html", parser.text())
    mime = declared if declared.startswith("text/") or declared in (
        "application/json", "application/xml", "application/x-yaml", "application/toml") \
        else _mime_from_name(name)
    return Extracted(mime, decoded)


def _mime_from_name(name: str) -> str:
    for ends, mime in ((".md", "text/markdown"), (".markdown", "text/markdown"),
                       (".csv", "text/csv"), (".tsv", "text/tab-separated-values"),
                       (".json", "application/json"), (".xml", "application/xml")):
        if name.endswith(ends):
            return mime
    return "text/plain"


# -- passages ----------------------------------------------------------------------------------

@dataclass
class Passage:
    ordinal: int
    page: int | None
    line_start: int
    line_end: int
    text: str


def passages(text_: str, *, paged: bool) -> list[Passage]:
    """The text cut into passages of whole lines, at most PASSAGE_CHARS each (a longer line is
    cut). A PDF's pages (form feeds) never share a passage; its lines count within each page."""
    found: list[Passage] = []
    for page_no, page in enumerate(text_.split("\f") if paged else [text_], start=1):
        lines = page.split("\n")
        start, chunk, size = 1, [], 0
        for number, line in enumerate(lines, start=1):
            while len(line) > PASSAGE_CHARS:  # a very long line (minified code): cut
                if chunk:
                    found.append(_passage(found, paged, page_no, start, number - 1, chunk))
                    chunk, size = [], 0
                found.append(_passage(found, paged, page_no, number, number, [line[:PASSAGE_CHARS]]))
                line = line[PASSAGE_CHARS:]
                start = number
            if chunk and size + len(line) + 1 > PASSAGE_CHARS:
                found.append(_passage(found, paged, page_no, start, number - 1, chunk))
                chunk, size = [], 0
            if not chunk:
                start = number
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            found.append(_passage(found, paged, page_no, start, len(lines), chunk))
    return [p for p in found if p.text.strip()] or [Passage(0, 1 if paged else None, 1, 1, "")]


def _passage(found: list[Passage], paged: bool, page: int, start: int, end: int,
             lines: list[str]) -> Passage:
    return Passage(len(found), page if paged else None, start, end, "\n".join(lines))


def where(passage: Any) -> str:
    """Where a passage comes from, as a reader (and the model) is told: page, lines."""
    lines = (f"line {passage.line_start}" if passage.line_start == passage.line_end
             else f"lines {passage.line_start}-{passage.line_end}")
    return f"page {passage.page}" if passage.page is not None else lines


# -- the service -------------------------------------------------------------------------------

def clean_filename(raw: Any) -> str:
    name = raw if isinstance(raw, str) else ""
    name = re.split(r"[\\/]", name)[-1]  # a browser may send a path
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:MAX_FILENAME] or "file"


def sniff_image(data: bytes) -> images.ImageFacts | None:
    """The image an upload is, by its bytes (None: not one of images.TYPES); 4xx when it
    starts like one but cannot be one."""
    try:
        return images.sniff(data)
    except images.NotAnImage as exc:
        raise Invalid("bad_file", f"this image could not be read: {exc}") from exc


def _image_row(owner_id: str, name: str, data: bytes, image: images.ImageFacts) -> Attachment:
    return Attachment(owner_id=owner_id, filename=name, mime=image.mime, size=len(data),
                      sha256=hashlib.sha256(data).hexdigest(), text="", chars=0,
                      tokens=images.estimate_tokens(image.width, image.height), pages=None,
                      data=data, width=image.width, height=image.height)


class AttachmentService:
    def __init__(self, db: Database, *, max_bytes: int, quota_bytes: int) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes

    def refuse_size(self, size: int | None) -> None:
        if size is not None and size > self.max_bytes:
            raise AppError("file_too_large", f"the file is {size} bytes; the most this server "
                           f"takes is {self.max_bytes} (BCHAT_MAX_ATTACHMENT_BYTES)",
                           limit=self.max_bytes)

    def upload(self, owner_id: str, filename: Any, data: bytes, declared: str | None) -> dict:
        """Extract, cut and store an upload (not yet sent with a message)."""
        self.refuse_size(len(data))
        if not data:
            raise Invalid("empty_file", "the file is empty")
        name = clean_filename(filename)
        image = sniff_image(data)
        if image is not None:
            return self._store(owner_id, data, _image_row(owner_id, name, data, image), [])
        extracted = extract(data, name, declared)
        if not extracted.text.strip():
            raise Invalid("no_text", "this file has no text in it")
        cut = passages(extracted.text, paged=extracted.pages is not None)
        row = Attachment(owner_id=owner_id, filename=name, mime=extracted.mime,
                         size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         text=extracted.text, chars=len(extracted.text),
                         tokens=estimate_tokens(extracted.text), pages=extracted.pages)
        return self._store(owner_id, data, row, cut)

    def _store(self, owner_id: str, data: bytes, row: Attachment, cut: list[Passage]) -> dict:
        """A new upload's row and passages, within the visitor's quota (images count too)."""
        self._sweep_unsent(owner_id)
        with self.db.write() as session:
            if session.get_bind().dialect.name == "postgresql":
                # At READ COMMITTED two uploads at once each read the sum before the other's
                # row was there, and both passed: one visitor's uploads queue here until
                # commit. (SQLite's BEGIN IMMEDIATE has already made every writer wait.)
                session.execute(select(func.pg_advisory_xact_lock(
                    func.hashtext(f"bchat-quota:{owner_id}"))))
            used = session.scalar(select(func.coalesce(func.sum(Attachment.size), 0))
                                  .where(Attachment.owner_id == owner_id)) or 0
            if used + len(data) > self.quota_bytes:
                raise AppError("storage_quota_exceeded",
                               f"your files take {used} bytes of the {self.quota_bytes} you may "
                               "keep (BCHAT_ATTACHMENT_QUOTA_BYTES): delete conversations with "
                               "files to make room", used=used, limit=self.quota_bytes)
            session.add(row)
            session.flush()
            if cut:
                _store_passages(session, row.id, cut)
            return row.to_dict()

    def image(self, owner_id: str, public_id: str) -> tuple[str, bytes, str]:
        """An image's type, bytes and file name, for its owner only (NotFound otherwise, and
        for a file that is not an image: only images keep their bytes)."""
        with self.db.read() as session:
            row = session.scalar(select(Attachment).options(undefer(Attachment.data)).where(
                Attachment.public_id == public_id, Attachment.owner_id == owner_id))
            if row is None or row.data is None or row.mime not in images.TYPES:
                raise NotFound("image")
            return row.mime, row.data, row.filename

    def _sweep_unsent(self, owner_id: str) -> None:
        cutoff = utcnow() - UNSENT_KEPT
        with self.db.write() as session:
            session.execute(delete(Attachment).where(
                Attachment.owner_id == owner_id, Attachment.message_id.is_(None),
                Attachment.created_at < cutoff))

    def get(self, owner_id: str, public_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            return _owned(session, owner_id, public_id).to_dict()

    def remove(self, owner_id: str, public_id: str) -> None:
        """Take back an upload before it is sent (a sent one goes with its conversation)."""
        with self.db.write() as session:
            row = _owned(session, owner_id, public_id)
            if row.message_id is not None:
                raise AppError("already_sent", "this file was sent with a message: it is "
                               "deleted with its conversation")
            session.delete(row)

    def passage(self, owner_id: str, public_id: str, *, page: int | None = None,
                lines: tuple[int, int] | None = None) -> dict[str, Any]:
        with self.db.read() as session:
            return read_passage(session, owner_id, public_id, page=page, lines=lines)


def _owned(session: Session, owner_id: str, public_id: Any) -> Attachment:
    row = session.scalar(select(Attachment).where(
        Attachment.public_id == public_id if isinstance(public_id, str) else False,
        Attachment.owner_id == owner_id))
    if row is None:
        raise NotFound("file")
    return row


def _store_passages(session: Session, attachment_id: int, cut: Sequence[Passage]) -> None:
    session.execute(AttachmentPassage.__table__.insert(), [
        {"attachment_id": attachment_id, "ordinal": p.ordinal, "page": p.page,
         "line_start": p.line_start, "line_end": p.line_end, "text": p.text,
         "tokens": estimate_tokens(p.text)} for p in cut])


def read_passage(session: Session, owner_id: str, attachment_id: str, page: int | None = None,
                 lines: tuple[int, int] | None = None) -> dict[str, Any]:
    """A page (PDF) or a range of lines of a visitor's attached file, or the whole text: for
    the ``read_attachment`` tool and ``GET /api/attachments/<id>/text``. Lines are 1-based
    and inclusive (of a PDF's page, when both are given)."""
    row = session.scalar(select(Attachment).options(undefer(Attachment.text)).where(
        Attachment.public_id == attachment_id, Attachment.owner_id == owner_id))
    if row is None:
        raise NotFound("file")
    if row.is_image:
        raise Invalid("no_text", f"{row.filename} is an image: it has no text to read")
    body = row.text
    if page is not None:
        if row.pages is None:
            raise Invalid("bad_page", "only a PDF has pages: ask for lines")
        if not 1 <= page <= row.pages:
            raise Invalid("bad_page", f"this PDF has pages 1 to {row.pages}")
        body = body.split("\f")[page - 1]
    if lines is not None:
        first, last = lines
        if first < 1 or last < first:
            raise Invalid("bad_lines", "lines are a range from 1, first ≤ last")
        body = "\n".join(body.split("\n")[first - 1:last])
    return {"id": row.public_id, "filename": row.filename, "page": page,
            "lines": list(lines) if lines else None, "text": body, "pages": row.pages}


def files_of(session: Session, owner_id: str, conversation_id: str) -> list[dict[str, Any]]:
    """The files sent in a visitor's conversation, oldest first (what a ``read_attachment``
    tool can offer the model: ids, names, pages)."""
    rows = session.scalars(select(Attachment).join(
        Conversation, Conversation.id == Attachment.conversation_id).where(
        Conversation.public_id == conversation_id, Conversation.owner_id == owner_id,
        Attachment.owner_id == owner_id).order_by(Attachment.id)).all()
    return [row.to_dict() for row in rows]


# -- linking to a message ----------------------------------------------------------------------

def check_ids(raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise Invalid("bad_attachments", "attachments is a list of file ids")
    if len(raw) > MAX_FILES_PER_MESSAGE:
        raise Invalid("bad_attachments", f"at most {MAX_FILES_PER_MESSAGE} files a message")
    return list(dict.fromkeys(raw))


def link(session: Session, owner_id: str, ids: list[str], conversation_id: int,
         message_id: int) -> None:
    """Give the files ``ids`` to a new user message, in its transaction: an upload not sent
    yet moves to it; a file already sent in this conversation (an edited message keeps its
    files) is copied to it. Each must be the visitor's, and a file sent in another
    conversation is refused (nothing is stored then)."""
    if not ids:
        return
    rows = session.scalars(select(Attachment).options(
        undefer(Attachment.text), undefer(Attachment.data)).where(
        Attachment.public_id.in_(ids), Attachment.owner_id == owner_id)).all()
    if len(rows) != len(ids):
        raise NotFound("file")
    if any(row.message_id is not None and row.conversation_id != conversation_id for row in rows):
        raise AppError("already_sent", "that file was sent in another conversation: attach it "
                       "again")
    unsent = [row.id for row in rows if row.message_id is None]
    for row in sorted((r for r in rows if r.message_id is not None), key=lambda r: r.id):
        copy_files(session, owner_id, conversation_id, message_id, [portable(row)])
    if unsent:
        session.execute(update(Attachment).where(Attachment.id.in_(unsent))
                        .values(message_id=message_id, conversation_id=conversation_id))
    session.expire_all()  # the message's attachments are read afresh


# -- what a model is given ---------------------------------------------------------------------

def budget(context: int, max_tokens: int) -> int:
    """The tokens a branch's files may take of a model's context of ``context`` tokens."""
    reply = min(max_tokens, context // 4)
    return max(0, int((context - reply) * FILES_SHARE))


@dataclass
class _File:
    row: Attachment
    message_id: int
    chosen: list[Any] = field(default_factory=list)


def _block(row: Attachment, body: str, *, partial: bool) -> str:
    name = row.filename.replace('"', "'")
    facts = f' pages="{row.pages}"' if row.pages else ""
    if partial:
        facts += ' part="passages"'
    return f'<file name="{name}"{facts}>\n{body.strip()}\n</file>'


def _branch_files(session: Session, path: Sequence[Message]) -> list[Attachment]:
    """The files of the user messages of ``path``, in the order they were sent."""
    ids = {m.id for m in path if m.role == "user"}
    if not ids:
        return []
    # By the conversation's index, then the branch's: a path of thousands of messages is
    # not a query with thousands of parameters, and a conversation without files costs one
    # indexed look-up.
    return [row for row in session.scalars(
        select(Attachment).where(Attachment.conversation_id == path[-1].conversation_id,
                                 Attachment.message_id.is_not(None))
        .order_by(Attachment.message_id, Attachment.id)).all() if row.message_id in ids]


def image_note(row: Attachment, why: str) -> str:
    """The line a model is given for an image it is not shown."""
    name = row.filename.replace('"', "'")
    return f'<image name="{name}" width="{row.width}" height="{row.height}" shown="no">{why}</image>'


NOT_SHOWN = "this model does not take images"
OLDER = f"not shown again: only the newest {images.MAX_IMAGES_SENT} images are sent"


def file_blocks(session: Session, path: Sequence[Message], limit: int, *,
                vision: bool = False) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Each message of ``path`` that has files: the text its files add before it (message id →
    blocks), and what was given, for the reply's ``meta.files``: a file whole, or the passages
    chosen for the newest user message when the branch's files are over ``limit`` tokens.
    Images are not text: each is a line naming it (image_note), left out when ``vision``
    (the model is shown them: with_files)."""
    every = _branch_files(session, path)
    rows = [row for row in every if not row.is_image]
    notes: dict[int, list[str]] = {}
    if not vision:
        for row in every:
            if row.is_image:
                notes.setdefault(row.message_id, []).append(image_note(row, NOT_SHOWN))
    if not rows:
        return {mid: "\n".join(lines) for mid, lines in notes.items()}, []
    files = [_File(row, row.message_id) for row in rows]
    whole = sum(f.row.tokens for f in files) <= limit
    blocks: dict[int, list[str]] = {}
    given: list[dict[str, Any]] = []
    if whole:
        texts = dict(session.execute(select(Attachment.id, Attachment.text)
                                     .where(Attachment.id.in_([f.row.id for f in files]))).all())
        for f in files:
            blocks.setdefault(f.message_id, []).append(_block(f.row, texts[f.row.id], partial=False))
            given.append({"file": f.row.filename, "id": f.row.public_id, "whole": True})
    else:
        question = next((m.content for m in reversed(path) if m.role == "user"), "")
        by_id = {f.row.id: f for f in files}
        for passage in choose(session, list(by_id), question, limit):
            by_id[passage.attachment_id].chosen.append(passage)
        for f in files:
            if not f.chosen:
                continue
            f.chosen.sort(key=lambda p: p.ordinal)
            body = "\n\n".join(f"[{where(p)}]\n{p.text.strip()}" for p in f.chosen)
            blocks.setdefault(f.message_id, []).append(_block(f.row, body, partial=True))
            for p in f.chosen:
                given.append({"file": f.row.filename, "id": f.row.public_id, "page": p.page,
                              "lines": [p.line_start, p.line_end]})
    for mid, lines in notes.items():
        blocks.setdefault(mid, []).append("\n".join(lines))
    return {mid: "\n\n".join(parts) for mid, parts in blocks.items()}, given


def choose(session: Session, attachment_ids: list[int], question: str, limit: int
           ) -> list[AttachmentPassage]:
    """The passages of these files most relevant to ``question``, best first, as many as fit
    ``limit`` tokens; when the ranked ones leave room (or none match), the rest follow in the
    files' order (their beginnings say what they are)."""
    ranked = _ranked(session, attachment_ids, terms(question, RETRIEVAL_TERMS))
    everything = session.scalars(
        select(AttachmentPassage).where(AttachmentPassage.attachment_id.in_(attachment_ids))
        .order_by(AttachmentPassage.attachment_id, AttachmentPassage.ordinal)).all()
    by_id = {p.id: p for p in everything}
    order = [by_id[i] for i in ranked if i in by_id]
    seen = set(ranked)
    order += [p for p in everything if p.id not in seen]
    chosen, used = [], 0
    for passage in order:
        if used + passage.tokens > limit:
            continue  # a smaller one further down may still fit
        chosen.append(passage)
        used += passage.tokens
    return chosen


def _ranked(session: Session, attachment_ids: list[int], words: list[str]) -> list[int]:
    """Passage ids, best match first (FTS5 bm25 on SQLite, ts_rank on PostgreSQL)."""
    if not words or not attachment_ids:
        return []
    params = {f"a{i}": a for i, a in enumerate(attachment_ids)}
    within = ", ".join(":" + name for name in params)
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        # Any of the words (OR): bm25 weighs rare words above common ones, so a question's
        # telling words decide, and "the" or "what" add little.
        query = " OR ".join('"' + w.replace('"', '""') + '"*' for w in words)
        rows = session.execute(text(
            f"SELECT p.id FROM {FTS_TABLE} f JOIN attachment_passage p ON p.id = f.rowid "
            f"WHERE {FTS_TABLE} MATCH :q AND p.attachment_id IN ({within}) "
            f"ORDER BY bm25({FTS_TABLE}) LIMIT 500"), {"q": query, **params})
        return [row[0] for row in rows]
    if dialect == "postgresql":
        # English stemming and stop words (ts_rank has no IDF: "the" must not count).
        safe = [re.sub(r"\W", "", w) for w in words]
        query = " | ".join(f"{w}:*" for w in safe if w)
        if not query:
            return []
        rows = session.execute(text(
            "SELECT id FROM (SELECT p.id, ts_rank(to_tsvector('english', p.text), q) AS rank "
            "FROM attachment_passage p, to_tsquery('english', :q) q "
            f"WHERE p.attachment_id IN ({within}) AND to_tsvector('english', p.text) @@ q) r "
            "ORDER BY rank DESC, id LIMIT 500"), {"q": query, **params})
        return [row[0] for row in rows]
    return []


class _WithFiles:
    """A message as a model sees it with its files before its text (tree.model_history reads
    role, status, content and meta: a tool step's calls and results ride in meta); with
    images, its content is OpenAI's parts: the text, then an ``image_url`` part for each."""

    def __init__(self, message: Message, blocks: str | None,
                 pictures: Sequence[dict[str, Any]] = ()) -> None:
        self.role, self.status, self.meta = message.role, message.status, message.meta
        content = f"{blocks}\n\n{message.content}" if blocks else message.content
        self.content: Any = ([{"type": "text", "text": content}, *pictures] if pictures
                             else content)


def refuse_images(session: Session, message_id: int, why: str) -> None:
    """``images_not_supported`` when the message holds an image (nothing is stored then)."""
    name = session.scalar(select(Attachment.filename).where(
        Attachment.message_id == message_id, Attachment.width.is_not(None)).limit(1))
    if name is not None:
        raise AppError("images_not_supported", f"{name} is an image, and {why} (no vision): "
                       "choose a model that takes images, or send the message without it")


def with_files(session: Session, path: Sequence[Message], context: int | None,
               max_tokens: int, *, vision: bool = False, model: str = "this model",
               image_types: tuple[str, ...] | None = None,
               ) -> tuple[list[Any], list[dict[str, Any]]]:
    """``path`` with each message's files before its text (for tree.model_history), and what
    the model was given; without a ``context`` (nothing to fit) the path as it is.

    A model that takes images (``vision``) is shown the newest MAX_IMAGES_SENT of the
    branch's; any other is refused a newest user message with an image
    (``images_not_supported``) and told of older ones in a line each. ``image_types``: the
    only kinds the model reads (None: all), the others refused and told of the same way."""
    if context is None:
        return list(path), []
    newest = next((m for m in reversed(path) if m.role == "user"), None)
    if newest is not None and not vision:
        refuse_images(session, newest.id, f"{model} does not take images")
    if newest is not None and vision and image_types:
        _refuse_kinds(session, newest.id, image_types, model)
    blocks, given = file_blocks(session, path, budget(context, max_tokens), vision=vision)
    pictures = _pictures(session, path, image_types, model) if vision else {}
    if not blocks and not pictures:
        return list(path), []
    return [_WithFiles(m, blocks.get(m.id), pictures.get(m.id, ())) for m in path], given


def _refuse_kinds(session: Session, message_id: int, types: tuple[str, ...], model: str) -> None:
    """``images_not_supported`` when the message holds an image of a kind the model does not
    read (nothing is stored then)."""
    row = session.scalar(select(Attachment).where(
        Attachment.message_id == message_id, Attachment.width.is_not(None),
        Attachment.mime.not_in(types)).limit(1))
    if row is not None:
        raise AppError("images_not_supported", f"{row.filename} is a "
                       f"{images.kinds((row.mime,))} image, and {model} takes "
                       f"{images.kinds(types)} images: convert it, or choose another model")


def _pictures(session: Session, path: Sequence[Message], types: tuple[str, ...] | None = None,
              model: str = "this model") -> dict[int, list[dict[str, Any]]]:
    """Message id → the image parts it is shown with: the newest MAX_IMAGES_SENT images of the
    branch (of ``types``, when given) as ``image_url`` parts, each other one as a text part
    naming it."""
    every = [row for row in _branch_files(session, path) if row.is_image]
    if not every:
        return {}
    shown = [row for row in every if types is None or row.mime in types]
    sent = {row.id for row in shown[-images.MAX_IMAGES_SENT:]}
    data = dict(session.execute(select(Attachment.id, Attachment.data)
                                .where(Attachment.id.in_(sent))).all())
    found: dict[int, list[dict[str, Any]]] = {}
    for row in every:
        if row.id in sent:
            part = images.part(row.mime, data[row.id])
        elif types is not None and row.mime not in types:
            why = f"{model} takes {images.kinds(types)} images"
            part = {"type": "text", "text": image_note(row, why)}
        else:
            part = {"type": "text", "text": image_note(row, OLDER)}
        found.setdefault(row.message_id, []).append(part)
    return found


# -- export, import, shares --------------------------------------------------------------------

def texts_for(session: Session, message_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Message public id → its files with their text, an image with its bytes in base64
    (``data``) (export v3, share snapshots)."""
    ids = list(message_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(Message.public_id, Attachment).join(Attachment, Attachment.message_id == Message.id)
        .options(undefer(Attachment.text), undefer(Attachment.data))
        .where(Message.public_id.in_(ids)).order_by(Attachment.id)).all()
    found: dict[str, list[dict[str, Any]]] = {}
    for message_id, row in rows:
        found.setdefault(message_id, []).append(portable(row))
    return found


def portable(row: Attachment) -> dict[str, Any]:
    """A file as export v3 and share snapshots carry it (its text and data loaded)."""
    entry = {**row.to_dict(), "text": row.text}
    if row.data is not None:
        entry["data"] = base64.b64encode(row.data).decode("ascii")
    return entry


def copy_files(session: Session, owner_id: str, conversation_id: int, message_id: int,
               files: Sequence[dict[str, Any]]) -> None:
    """Files of an import or a continued share, as new rows of the new message (their text
    cut into passages again; an image's bytes checked again); a validated list (parse_files)."""
    for data in files:
        if data.get("data"):
            raw = base64.b64decode(data["data"], validate=True)
            image = sniff_image(raw)
            if image is None:
                raise Invalid("bad_import", f"{data['filename']}: not a {IMAGE_KINDS} image")
            row = _image_row(owner_id, clean_filename(data["filename"]), raw, image)
            row.conversation_id, row.message_id = conversation_id, message_id
            session.add(row)
            continue
        body = data["text"]
        row = Attachment(owner_id=owner_id, conversation_id=conversation_id,
                         message_id=message_id, filename=clean_filename(data["filename"]),
                         mime=data["mime"], size=data["size"], sha256=data["sha256"],
                         text=body, chars=len(body), tokens=estimate_tokens(body),
                         pages=data.get("pages"))
        session.add(row)
        session.flush()
        _store_passages(session, row.id, passages(body, paged=row.pages is not None))


def _parse_image(item: dict[str, Any], at: str, max_chars: int) -> dict[str, Any]:
    """An imported image: its base64 bytes, which must be one of images.TYPES (its type, size,
    sha256 and pixels are read from the bytes, never taken from the file)."""
    encoded = item.get("data")
    if not isinstance(encoded, str) or len(encoded) > max_chars:
        raise Invalid("bad_import", f"{at}.data: must be the image in base64, at most "
                      f"{max_chars} characters")
    try:
        raw = base64.b64decode(encoded, validate=True)
        image = images.sniff(raw)
    except (ValueError, images.NotAnImage) as exc:
        raise Invalid("bad_import", f"{at}.data: not a readable image ({exc})") from exc
    if image is None:
        raise Invalid("bad_import", f"{at}.data: must be a {IMAGE_KINDS} image")
    name = item.get("filename")
    return {"filename": name if isinstance(name, str) else "image", "mime": image.mime,
            "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "pages": None,
            "text": "", "data": encoded}


def parse_files(raw: Any, where_: str, max_chars: int) -> list[dict[str, Any]]:
    """An imported message's ``attachments`` (export v3), checked; Invalid names the field."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_FILES_PER_MESSAGE:
        raise Invalid("bad_import", f"{where_}: must be a list of at most "
                      f"{MAX_FILES_PER_MESSAGE} files")
    clean = []
    for i, item in enumerate(raw):
        at = f"{where_}[{i}]"
        if not isinstance(item, dict):
            raise Invalid("bad_import", f"{at}: must be an object")
        if item.get("data") is not None:
            clean.append(_parse_image(item, at, max_chars))
            continue
        body = item.get("text")
        if not isinstance(body, str) or not body.strip() or len(body) > max_chars:
            raise Invalid("bad_import", f"{at}.text: must be the file's text, at most "
                          f"{max_chars} characters")
        name, mime, sha = item.get("filename"), item.get("mime"), item.get("sha256")
        size, pages = item.get("size"), item.get("pages")
        if not isinstance(name, str) or not isinstance(mime, str) or len(mime) > 100:
            raise Invalid("bad_import", f"{at}: filename and mime must be strings")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise Invalid("bad_import", f"{at}.sha256: must be 64 hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**53:
            raise Invalid("bad_import", f"{at}.size: must be a byte count")
        if pages is not None and (isinstance(pages, bool) or not isinstance(pages, int)
                                  or not 1 <= pages <= 100_000):
            raise Invalid("bad_import", f"{at}.pages: must be a page count or null")
        if "\x00" in body:
            raise Invalid("bad_import", f"{at}.text: must not hold NUL characters")
        clean.append({"filename": name, "mime": mime, "sha256": sha, "size": size,
                      "pages": pages, "text": body})
    return clean
