"""JSON API: models, conversations and their messages. Views stay thin: rules live in chats.py.

Errors are ``{"error": {"code": ..., "message": ...}}`` with a matching HTTP status (errors.py). Writes
require a JSON body (``Content-Type: application/json``), which a cross-site form cannot send.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from . import images
from .accounts import get_accounts
from .chats import MISSING
from .engines.base import images_reason
from .errors import AppError, Invalid
from .exchange import export_json, export_markdown, parse_import
from .files import browser_url
from .models import Provenance
from .openapi import document
from .paging import parse_limit
from .search import MAX_QUERY_CHARS, MAX_RESULTS, search
from .security import origin_allowed, owner_id
from .services import get_services
from .validation import SAFE_INTS, check_number, parse_json_text

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__)


def request_json(ints: tuple[int, int] = SAFE_INTS) -> Any:
    """The request's body, parsed by validation's strict rules (400 with a code; the JSON API
    and /v1, whose ``ints`` are int64).

    ``get_data`` raises 413 for a Content-Length over MAX_CONTENT_LENGTH, but a chunked body
    (no Content-Length) is silently cut at the limit, which then read as a 400 bad_json: a
    body that fills the limit is taken as one that went over it.
    """
    limit = current_app.config["MAX_UPLOAD_BYTES"]
    data = request.get_data(cache=True)
    if request.content_length is None and len(data) >= limit:
        raise RequestEntityTooLarge(f"the body is over {limit} bytes")
    return parse_json_text(data, max_bytes=limit, ints=ints)


def json_body() -> dict[str, Any]:
    """The request's JSON object (Content-Type: application/json)."""
    if not request.is_json:
        raise AppError("json_required", "send a JSON body (Content-Type: application/json)")
    body = request_json()
    if not isinstance(body, dict):
        raise Invalid("bad_json", "the body must be a JSON object")
    return body


@bp.get("/api/openapi.json")
def openapi():
    """The JSON API described for clients and for the schemathesis tests that keep it true."""
    return document(current_app.config)


@bp.get("/healthz")
def healthz():
    services = get_services()
    with services.db.read() as session:
        session.connection().exec_driver_sql("SELECT 1")
    # A dead or stuck inference thread fails every chat to its model: say so, naming it.
    problems = services.engines.health(current_app.config["WATCHDOG_SECONDS"])
    body = {"status": "unhealthy" if problems else "ok", "models": len(services.engines.models()),
            "runs": len(services.runs.live_runs())}
    runners = services.engines.runners()
    if runners:
        body["runners"] = runners
    if problems:
        body["problems"] = problems
        return body, 503
    return body


@bp.get("/api/tools")
def tools():
    """The tools a conversation may enable (its chat_tools setting): the built-ins and the
    tools of the admin's MCP servers (BCHAT_MCP_FILE), with each server's state."""
    registry = get_services().tools
    servers = registry.mcp.status() if registry is not None and registry.mcp is not None else []
    return jsonify({"tools": [t.listing() for t in registry.available()] if registry else [],
                    "servers": servers,
                    "max_steps": current_app.config.get("TOOL_STEPS", 5)})


@bp.get("/api/models")
def models():
    """Every model, where it can run, and its facts, so the UI can show them before a download."""
    services = get_services()
    listing = []
    for info in services.engines.models():
        local_file = services.catalogue.get(info.id)
        facts = services.catalogue.facts(info.id) or info.facts
        if info.facts.get("unavailable"):  # its runner kept crashing: say why, keep it listed
            facts = {**facts, "unavailable": info.facts["unavailable"]}
        # display_name is for people (BCHAT_MODELS_FILE or made from the file); programs keep the id.
        entry = {"id": info.id, "display_name": services.catalogue.display_name(info.id),
                 "served_by": info.engine, "engines": ["server"], "facts": facts}
        # Whether the server engine shows it images (the page's engine never does): the
        # attach button takes images only then, and says why not otherwise.
        refused = images_reason(facts, "server")
        entry["images"] = {"accepted": not refused, "reason": refused or None,
                           # the kinds it reads: an embedded model's decoder has no WebP
                           "types": None if refused else
                           list(facts.get("image_types") or images.TYPES)}
        # Each engine's format and why: the server runs the file as configured, pages run the
        # format measured fastest in WASM (catalogue.browser_file).
        browser_file = services.catalogue.browser(info.id) if local_file else None
        url = browser_url(local_file, browser_file) if local_file else None
        if local_file:
            entry["server"] = {"format": local_file.quantization,
                               "reason": "the model file as configured: native llama.cpp runs it"}
        if url:
            entry["engines"].append("browser")
            entry["browser"] = {"url": url, "size": browser_file.size, "format": browser_file.format,
                                "bits_per_weight": browser_file.bits_per_weight(local_file),
                                "reason": browser_file.reason}
        listing.append(entry)
    default = services.engines.default_model
    allowed = get_accounts().models_for(owner_id(create=False))  # None: every model
    if allowed is not None:  # an admin limited the models this visitor's role may use
        listing = [entry for entry in listing if entry["id"] in allowed]
        if default not in allowed:
            default = listing[0]["id"] if listing else None
    return {"models": listing, "default": default}


@bp.get("/api/models/quality")
def model_quality():
    """Each family of the served models (a model and its quantised variants) with what
    `bchat models eval` measured of each, and what each needs to run (docs in quant.py)."""
    from .quant import quality_report

    services = get_services()
    catalogue = services.catalogue
    where = Path(catalogue.model_path) if catalogue.model_path else None
    families = quality_report(catalogue, where.parent if where and where.is_file() else where)
    for family in families:
        for member in family["members"]:
            model = catalogue.get(member["model"])
            facts = catalogue.facts(member["model"]) or {}
            member["display_name"] = catalogue.display_name(member["model"])
            member["fits_server"] = facts.get("fits_server")
            member["kv_bytes_per_token"] = facts.get("kv_bytes_per_token")
            member["context_length"] = facts.get("context_length")
            # Decoding reads every active weight once per token: the bytes that bound its speed.
            member["bytes_per_token"] = int(model.active_parameters * member["bits_per_weight"] / 8)
            served = catalogue.browser(member["model"])
            member["browser"] = None if served is None else {
                "format": served.format, "size": served.size,
                "bits_per_weight": served.bits_per_weight(model)}
    return {"families": families}


@bp.get("/api/conversations")
def list_conversations():
    limit = parse_limit(request.args.get("limit"))
    conversations, following = get_services().chats.list_conversations(
        owner_id(), limit=limit, cursor=request.args.get("cursor"))
    # ``next``: the cursor of the following page (null on the last, and without ``limit``).
    return {"conversations": conversations, "next": following}


@bp.post("/api/conversations")
def create_conversation():
    body = json_body()
    return get_services().chats.create_conversation(owner_id(), body.get("title")), 201


@bp.get("/api/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    """The whole tree (every message), or with ``limit`` and/or ``before`` a window of the
    current branch: its last ``limit`` messages, or the ``limit`` above the message ``before``,
    each with its siblings; ``earlier`` is the next ``before`` (null at the root)."""
    services = get_services()
    window = {"limit": parse_limit(request.args.get("limit")), "before": request.args.get("before")}
    conversation = services.chats.get_conversation(owner_id(), conversation_id, **window)
    streaming = [m["id"] for m in conversation["messages"] if m["status"] == "streaming"]
    if streaming and services.runs.keeper.reap_stale(streaming):  # their writer died: now interrupted
        conversation = services.chats.get_conversation(owner_id(), conversation_id, **window)
    return conversation


@bp.patch("/api/conversations/<conversation_id>")
def update_conversation(conversation_id: str):
    """Rename (``title``), switch branch (``current_message_id``: any message; the branch
    continues to its newest leaf), or change the conversation's ``settings``."""
    body = json_body()
    fields = {k: body[k] for k in ("title", "current_message_id", "settings") if k in body}
    if not fields:
        raise Invalid("nothing_to_change", "send title, current_message_id or settings")
    # ?limit=N: a switch answers with the new branch's last N messages (as GET does)
    return get_services().chats.update(owner_id(), conversation_id, **fields,
                                       window=parse_limit(request.args.get("limit")))


@bp.get("/api/defaults")
def get_defaults():
    """The visitor's defaults: the settings a new conversation starts from."""
    return {"settings": get_services().chats.get_defaults(owner_id())}


@bp.put("/api/defaults")
def put_defaults():
    body = json_body()
    return {"settings": get_services().chats.set_defaults(owner_id(), body.get("settings"))}


@bp.delete("/api/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    get_services().chats.delete(owner_id(), conversation_id)
    return "", 204


_PROVENANCE_FIELDS = {f.name for f in dataclasses.fields(Provenance)}


def _provenance(raw: Any) -> Provenance:
    if not isinstance(raw, dict) or set(raw) - _PROVENANCE_FIELDS:
        raise Invalid("bad_provenance", f"provenance takes: {', '.join(sorted(_PROVENANCE_FIELDS))}")
    for name, kind in (("prompt_tokens", "integer"), ("completion_tokens", "integer"),
                       ("tokens_per_second", "number")):
        if raw.get(name) is not None:
            try:
                check_number(raw[name], name, integer=kind == "integer")
            except Invalid as exc:
                raise Invalid("bad_provenance", f"{name} must be a non-negative {kind}") from exc
    for name in ("backend", "model", "finish_reason"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise Invalid("bad_provenance", f"{name} must be a short string")
    meta = raw.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise Invalid("bad_provenance", "meta must be an object")
    return Provenance(**{"engine": "browser", **raw})


@bp.post("/api/conversations/<conversation_id>/messages")
def add_message(conversation_id: str):
    """Store a message written in the page (the browser engine): the user's, or a reply."""
    body = json_body()
    chats = get_services().chats
    owner = owner_id()
    role = chats.check_role(body.get("role"))
    parent_id = body.get("parent_id", MISSING)  # absent: after the current leaf; null: a root
    if role == "user":
        _conv, message = chats.add_user_message(owner, conversation_id, body.get("content"),
                                                parent_id=parent_id,
                                                attachments=body.get("attachments"))
        return message, 201
    if role != "assistant":
        raise Invalid("bad_role", "only user and assistant messages can be posted")
    content = chats.check_content(body.get("content"), allow_empty=True)
    provenance = _provenance(body.get("provenance", {}))
    if provenance.engine != "browser":
        raise Invalid("bad_engine", "replies posted through the API come from the browser engine")
    message = chats.add_reply(
        owner, conversation_id, content, body.get("status", "complete"), provenance,
        parent_id=parent_id,
    )
    return message, 201


@bp.patch("/api/conversations/<conversation_id>/messages/<message_id>")
def update_message(conversation_id: str, message_id: str):
    """A reply the page is writing (browser engine): its text as it grows, at least every
    2 s, then its final status and provenance once. Also sent on pagehide with
    ``fetch(…, {keepalive: true})`` and status "interrupted", so a closed tab keeps its text.
    ``{"continue": true}`` with status "streaming" reopens a cut-off reply to write more of it."""
    body = json_body()
    chats = get_services().chats
    content = chats.check_content(body.get("content"), allow_empty=True)
    provenance = _provenance(body["provenance"]) if body.get("provenance") is not None else None
    return chats.update_browser_reply(
        owner_id(), conversation_id, message_id, content, body.get("status", "streaming"),
        provenance, reopen=body.get("continue") is True,
    )


# -- the browser engine's tool loop (tools/steps.py) -------------------------------------------


@bp.get("/api/conversations/<conversation_id>/tool-setup")
def tool_setup(conversation_id: str):
    """For the browser engine: what its next reply (under ``parent``, a message id; none: the
    first of a turn) is told (``instructions``, for the system prompt) and held to (the
    GBNF ``grammar`` for wllama), as the server's loop holds its own replies."""
    return get_services().page_tools.setup(owner_id(), conversation_id,
                                           request.args.get("parent") or None)


@bp.post("/api/conversations/<conversation_id>/messages/<message_id>/tool-step")
def tool_step(conversation_id: str, message_id: str):
    """For the browser engine: the reply it is writing called tools (``content``: its whole
    text): they run here and the step is stored as a server step is (the reply complete with
    ``meta.tool_calls``, a ``tool`` message per result, the next reply "streaming" under them).
    Answers the ``step`` frame with the calls' frames and what the next reply is held to."""
    body = json_body()
    services = get_services()
    content = services.chats.check_content(body.get("content"))
    provenance = _provenance(body.get("provenance") or {})
    if provenance.engine != "browser":
        raise Invalid("bad_engine", "replies posted through the API come from the browser engine")
    services.runs.limits.take_tool_step(owner_id(), request.remote_addr)
    return services.page_tools.step(owner_id(), conversation_id, message_id, content, provenance)


# -- files in the chat (attachments.py) -------------------------------------------------------

MULTIPART_OVERHEAD = 64 * 1024  # the form's boundaries and headers around the file


def _same_site_form() -> None:
    """A multipart body is one a cross-site form can send (unlike the JSON the other writes
    need), so a browser's request must come from our own pages: its Origin, and its
    Sec-Fetch-Site where sent. Programs (no Origin) are unaffected."""
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    if (origin is not None and not origin_allowed(origin)) or site not in (None, "same-origin",
                                                                          "none"):
        raise AppError("cross_site", "files are uploaded from bchat's own pages")


@bp.post("/api/attachments")
def upload_attachment():
    """A file for the next message (multipart/form-data, field ``file``): its text is extracted
    and kept; send its id in the message's ``attachments``."""
    _same_site_form()
    uploads = get_services().attachments
    if request.content_length is not None:
        uploads.refuse_size(request.content_length - MULTIPART_OVERHEAD)
    request.max_content_length = uploads.max_bytes + MULTIPART_OVERHEAD
    if not request.mimetype.startswith("multipart/form-data"):
        raise AppError("multipart_required", "send the file as multipart/form-data (field "
                       "\"file\")")
    upload = request.files.get("file")
    if upload is not None:
        data, name, mime = upload.read(uploads.max_bytes + 1), upload.filename, upload.mimetype
    elif "file" in request.form:  # a plain field (curl -F file=text): its text
        data, name, mime = request.form["file"].encode(), "text.txt", "text/plain"
    else:
        raise Invalid("no_file", "send the file in the form field \"file\"")
    return uploads.upload(owner_id(), name, data, mime), 201


@bp.get("/api/attachments/<attachment_id>")
def get_attachment(attachment_id: str):
    return get_services().attachments.get(owner_id(), attachment_id)


def _int_arg(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise Invalid(f"bad_{name}", f"{name} must be a whole number")
    return int(raw)


@bp.get("/api/attachments/<attachment_id>/text")
def attachment_text(attachment_id: str):
    """A file's extracted text: whole, one ``page`` (PDF), or ``lines=FIRST-LAST``."""
    lines = None
    if request.args.get("lines") is not None:
        first, _, last = request.args["lines"].partition("-")
        if not (first.isdigit() and last.isdigit() and len(first) < 10 and len(last) < 10):
            raise Invalid("bad_lines", "lines is FIRST-LAST, e.g. 10-40")
        lines = (int(first), int(last))
    return get_services().attachments.passage(owner_id(), attachment_id, page=_int_arg("page"),
                                              lines=lines)


@bp.get("/api/attachments/<attachment_id>/content")
def attachment_content(attachment_id: str):
    """An image's bytes, to its owner only, as the type its bytes are (PNG, JPEG, WebP or GIF:
    attachments.sniff_image), never sniffed by the browser, never a document that could run
    script (a sandbox CSP, were it opened as a page), never cached by another."""
    mime, data, name = get_services().attachments.image(owner_id(), attachment_id)
    # send_file: its Content-Disposition quotes any name (RFC 6266) and answers Range.
    response = send_file(io.BytesIO(data), mimetype=mime, download_name=name, etag=False,
                         conditional=True, max_age=3600)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.delete("/api/attachments/<attachment_id>")
def delete_attachment(attachment_id: str):
    """Take back a file not sent yet (the × on its chip)."""
    get_services().attachments.remove(owner_id(), attachment_id)
    return "", 204


@bp.get("/api/conversations/<conversation_id>/files")
def prompt_files(conversation_id: str):
    """For the browser engine: the text a model is given of the files on the branch ending at
    ``leaf`` (a message id), fitted to a ``context`` of that many tokens with ``max_tokens``
    for the reply, exactly as the server engines are given it."""
    context, max_tokens = _int_arg("context"), _int_arg("max_tokens")
    if not context or context < 64:
        raise Invalid("bad_context", "context is the model's context in tokens (at least 64)")
    if not request.args.get("leaf"):
        raise Invalid("bad_leaf", "leaf is the id of the branch's last message")
    return get_services().chats.prompt_files(owner_id(), conversation_id, request.args["leaf"],
                                             context=context, max_tokens=max_tokens or 0)


# -- sharing -------------------------------------------------------------------------------


def _with_url(share: dict) -> dict:
    token = share.pop("token")  # None when the sealed copy no longer opens (secret key changed)
    share["url"] = url_for("pages.shared", token=token, _external=True) if token else None
    return share


@bp.post("/api/conversations/<conversation_id>/share")
def share_conversation(conversation_id: str):
    """Create the link, or refresh its snapshot (same link unless {"new_link": true})."""
    body = json_body()
    new_link = body.get("new_link", False)
    if not isinstance(new_link, bool):
        raise Invalid("bad_new_link", "new_link must be true or false")
    share = get_services().shares.share(owner_id(), conversation_id, new_link=new_link)
    return _with_url(share)


@bp.delete("/api/conversations/<conversation_id>/share")
def revoke_share(conversation_id: str):
    get_services().shares.revoke(owner_id(), conversation_id)
    return "", 204


@bp.get("/api/shares")
def list_shares():
    return {"shares": [_with_url(s) for s in get_services().shares.list_for(owner_id())]}


@bp.delete("/api/shares/<share_id>")
def revoke_share_by_id(share_id: str):
    """Revoke from the list of links, also for a share whose conversation was deleted."""
    get_services().shares.revoke_by_id(owner_id(), share_id)
    return "", 204


# -- export / import -----------------------------------------------------------------------


@bp.get("/api/conversations/<conversation_id>/export")
def export_conversation(conversation_id: str):
    chats = get_services().chats
    conversation = chats.with_file_texts(chats.get_conversation(owner_id(), conversation_id))
    kind = request.args.get("format", "json")
    stem = "".join(c if c.isalnum() or c in "-_ " else "_" for c in conversation["title"])[:60]
    if kind == "json":
        response = jsonify(export_json(conversation))
        filename = f"{stem or 'conversation'}.json"
    elif kind in ("md", "markdown"):
        response = Response(export_markdown(conversation), mimetype="text/markdown")
        filename = f"{stem or 'conversation'}.md"
    else:
        raise Invalid("bad_format", "format is json or markdown")
    response.headers["Content-Disposition"] = f'attachment; filename="{filename.strip()}"'
    return response


@bp.post("/api/conversations/import")
def import_conversation():
    """A JSON export back into a new conversation; a bad file creates nothing."""
    body = json_body()
    parsed = parse_import(body, current_app.config["MAX_MESSAGE_CHARS"])
    chats = get_services().chats
    settings = chats.clean_settings(parsed.settings) if parsed.settings else None
    conversation = chats.import_messages(
        owner_id(), parsed.title, parsed.messages, created_at=parsed.created_at,
        settings=settings, current_message_id=parsed.current_message_id,
    )
    return conversation, 201


# -- benchmarks ----------------------------------------------------------------------------


@bp.get("/api/benchmarks")
def list_benchmarks():
    """Everyone's runs of the fixed prompt set (newest first), and the prompt set itself."""
    from .benchmarks import DEFAULT_TOKENS, PROMPTS, SEED

    services = get_services()
    return {"benchmarks": services.benchmarks.list(owner_id()),
            "prompts": PROMPTS, "tokens": DEFAULT_TOKENS, "seed": SEED}


@bp.post("/api/benchmarks")
def add_benchmark():
    """A page's run of the prompt set on its own device (the browser engine)."""
    return get_services().benchmarks.add_browser(owner_id(), json_body(), request.remote_addr), 201


@bp.post("/api/benchmarks/server")
def run_server_benchmark():
    """Run the prompt set on a server model now (the same as `bchat bench`)."""
    from .benchmarks import DEFAULT_TOKENS

    body = json_body()
    services = get_services()
    owner = owner_id()
    with services.runs.limits.take_replies(owner, request.remote_addr):  # held while they run
        record = services.benchmarks.run_server(body.get("model"), owner=owner,
                                                tokens=body.get("tokens", DEFAULT_TOKENS),
                                                run=body.get("run"))
    return record, 201


@bp.delete("/api/benchmarks/server")
def cancel_server_benchmark():
    """Stop the caller's server benchmark (its POST answers 409 ``cancelled``): ``?run=`` the
    one posted with that run name, even before it began; without, the one running now."""
    get_services().benchmarks.cancel(owner_id(), request.args.get("run"))
    return "", 204


@bp.get("/api/search")
def search_conversations():
    """Your conversations whose title or messages hold every word of ``q``."""
    query = request.args.get("q", "")
    if len(query) > MAX_QUERY_CHARS:
        raise Invalid("query_too_long", f"search for at most {MAX_QUERY_CHARS} characters")
    results, following = search(get_services().db, owner_id(), query,
                                limit=parse_limit(request.args.get("limit")) or MAX_RESULTS,
                                cursor=request.args.get("cursor"))
    return {"results": results, "next": following}


# -- API keys (for /v1) ------------------------------------------------------------------------


def _public_key(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if k != "owner"}


@bp.post("/api/keys")
def create_key():
    """A key for /v1 acting as this visitor; the token is in this answer only."""
    key, token = get_services().keys.create(owner_id(), json_body().get("name"))
    return {"key": _public_key(key), "token": token}, 201


@bp.get("/api/keys")
def list_keys():
    return {"keys": [_public_key(k) for k in get_services().keys.list_for(owner_id())]}


@bp.delete("/api/keys/<key_id>")
def revoke_key(key_id: str):
    get_services().keys.revoke(owner_id(), key_id)
    return "", 204
