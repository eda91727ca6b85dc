"""HTML pages: the chat shell. Everything dynamic is fetched by the page's ES modules.

Also how the pages' static files travel: ``static_url()`` gives versioned URLs (``?v=`` a hash
of the file) that browsers may keep for a year, and text assets go out gzip-compressed
(compressed once per file version, kept in memory). Errors outside the JSON API get a styled
page (``templates/error.html``) instead of Werkzeug's bare one.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import threading
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, redirect, render_template, request, url_for
from werkzeug.exceptions import BadHost, HTTPException
from werkzeug.security import safe_join

from .errors import NotFound
from .options import page_options
from .security import (
    check_continue_token,
    continue_token,
    owner_id,
    passcode_required,
    same_site_path,
    try_passcode,
    unknown_host_response,
)
from .services import get_services

log = logging.getLogger(__name__)

bp = Blueprint("pages", __name__)

# -- static files: versioned URLs, long caching, compression -----------------------------------

_lock = threading.Lock()
_versions: dict[str, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, hash)
_compressed: dict[tuple[str, int, int], bytes] = {}
COMPRESSIBLE = {"text/css", "text/javascript", "application/javascript", "application/json",
                "image/svg+xml", "text/plain", "text/markdown", "text/html"}
MIN_COMPRESS_BYTES = 1024
YEAR = 365 * 24 * 3600


def _static_path(filename: str) -> Path | None:
    joined = safe_join(current_app.static_folder or "", filename)
    path = Path(joined) if joined else None
    return path if path and path.is_file() else None


def file_version(filename: str) -> str | None:
    """A short hash of a static file's bytes, recomputed only when the file changes."""
    path = _static_path(filename)
    if path is None:
        return None
    stat = path.stat()
    with _lock:
        known = _versions.get(str(path))
    if known and known[:2] == (stat.st_mtime_ns, stat.st_size):
        return known[2]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    with _lock:
        _versions[str(path)] = (stat.st_mtime_ns, stat.st_size, digest)
    return digest


@bp.app_template_global()
def static_url(filename: str) -> str:
    """url_for('static') plus ?v=<hash of the file>: a new file is a new URL."""
    version = file_version(filename)
    if version is None:
        return url_for("static", filename=filename)
    return url_for("static", filename=filename, v=version)


_STATIC_IMPORT = re.compile(r"""^\s*(?:import|export)\b[^;'"]*?(?:from\s*)?["']([^"']+)["']""", re.MULTILINE)


@bp.app_template_global()
def module_graph(entry: str) -> list[str]:
    """Every module ``entry`` imports statically, however deep (not dynamic import()s), for
    <link rel="modulepreload">: the browser fetches them all at once instead of one level of
    imports per round trip. Unversioned, because that is the URL the imports resolve to."""
    root = Path(current_app.static_folder or "")
    seen: list[str] = []
    queue = [entry]
    while queue:
        name = queue.pop(0)
        path = _static_path(name)
        if path is None or name in seen:
            continue
        seen.append(name)
        for target in _STATIC_IMPORT.findall(path.read_text(encoding="utf-8")):
            if target.startswith("."):
                resolved = (path.parent / target).resolve()
                if resolved.is_relative_to(root.resolve()):
                    queue.append(resolved.relative_to(root.resolve()).as_posix())
    return seen[1:]


def _gzipped(path: Path, data: bytes) -> bytes:
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _compressed.get(key)
    if cached is None:
        cached = gzip.compress(data, compresslevel=9, mtime=0)
        with _lock:
            for old in [k for k in _compressed if k[0] == key[0]]:
                del _compressed[old]
            _compressed[key] = cached
    return cached


@bp.after_app_request
def static_delivery(response: Response) -> Response:
    if request.endpoint != "static" or response.status_code not in (200, 304):
        return response
    filename = (request.view_args or {}).get("filename", "")
    wanted = request.args.get("v")
    if wanted and wanted == file_version(filename):
        # This URL names these exact bytes: any cache may keep them for good.
        response.headers["Cache-Control"] = f"public, max-age={YEAR}, immutable"
    else:
        response.headers["Cache-Control"] = "no-cache"  # unversioned (module imports): revalidate
    response.vary.add("Accept-Encoding")
    if (response.status_code != 200 or response.mimetype not in COMPRESSIBLE
            or "gzip" not in request.headers.get("Accept-Encoding", "")
            or "Content-Encoding" in response.headers or "Content-Range" in response.headers):
        return response
    path = _static_path(filename)
    if path is None or path.stat().st_size < MIN_COMPRESS_BYTES:
        return response
    response.direct_passthrough = False
    body = _gzipped(path, response.get_data())
    response.set_data(body)
    response.headers["Content-Encoding"] = "gzip"
    etag, weak = response.get_etag()
    if etag:
        response.set_etag(f"{etag}-gzip", weak=weak)  # not the same bytes as the plain one
    return response


# -- error pages --------------------------------------------------------------------------------

TITLES = {
    400: "That request was not understood",
    401: "A passcode is needed",
    403: "Not allowed",
    404: "Nothing here",
    405: "Not allowed here",
    413: "That was too large",
    429: "Too many tries",
    500: "Something went wrong",
}


def _wants_json() -> bool:
    if request.path.startswith(("/api/", "/v1/", "/ws")):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and not request.accept_mimetypes["text/html"]


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException):
    """A styled page for people; the JSON API's own error shape for programs."""
    code = exc.code or 500
    if isinstance(exc, BadHost):  # no URLs can be built for this request: no styled page
        return unknown_host_response()
    if _wants_json():
        name = exc.name.lower().replace(" ", "_")
        return {"error": {"code": name, "message": exc.description or exc.name}}, code
    message = exc.description if code not in (404, 405) else None
    return render_template("error.html", code=code, title=TITLES.get(code, exc.name),
                           message=message, revoked_share=False), code


@bp.get("/")
@bp.get("/c/<conversation_id>")
def chat(conversation_id: str | None = None):
    owner_id()  # the first visit creates the anonymous owner cookie the socket needs
    return render_template(
        "chat.html",
        conversation_id=conversation_id or "",
        default_model=get_services().engines.default_model or "",
        max_message_chars=current_app.config["MAX_MESSAGE_CHARS"],
        default_max_tokens=current_app.config["MAX_TOKENS"],
        max_tokens_limit=current_app.config["MAX_TOKENS_LIMIT"],
        n_ctx=current_app.config["N_CTX"],
        options=page_options(current_app.config),
    )


def _share_gone():
    """A share link that was revoked, or never existed: the two are told apart by no one."""
    response = current_app.make_response((render_template(
        "error.html", code=404, title="This shared link no longer works",
        message=None, revoked_share=True), 404))
    response.headers["X-Robots-Tag"] = "noindex, nofollow"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _preview(messages: list[dict], limit: int = 200) -> str:
    """A link-preview description: the first lines of the snapshot, nothing beyond it."""
    text = " ".join(" ".join(m["content"].split()) for m in messages[:2])
    return text[:limit] + ("…" if len(text) > limit else "")


@bp.get("/s/<token>")
def shared(token: str):
    """The read-only snapshot: server-rendered, readable without JavaScript, no socket."""
    try:
        snapshot = get_services().shares.lookup(token)
    except NotFound:
        return _share_gone()
    response = current_app.make_response(
        render_template(
            "shared.html",
            token=token,
            title=snapshot["title"],
            messages=snapshot["messages"],
            shared_at=snapshot["updated_at"],
            description=_preview(snapshot["messages"]),
            csrf=continue_token(),  # bound to the cookie, not to an identity: see security.py
            ask_passcode=passcode_required(),
        )
    )
    response.headers["X-Robots-Tag"] = "noindex, nofollow"
    response.headers["Referrer-Policy"] = "no-referrer"  # the URL is the secret
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/s/<token>/continue")
def continue_shared(token: str):
    """Copy the snapshot into a conversation of the visitor's own; the original is untouched."""
    check_continue_token(request.form.get("csrf"))
    if passcode_required() and not try_passcode(request.form.get("passcode")):
        abort(403, description="wrong passcode: open the shared link again")
    owner = owner_id()
    try:
        conversation = get_services().shares.continue_as(token, owner)
    except NotFound:
        return _share_gone()
    return redirect(url_for("pages.chat", conversation_id=conversation["id"]), code=303)


@bp.route("/passcode", methods=["GET", "POST"])
def passcode():
    """The one form a visitor sees before the passcode; then an identity, then the chat."""
    # Where to go after the passcode: only a path on this site, never another site.
    target = same_site_path(request.values.get("next"), url_for("pages.chat"))
    if not current_app.config.get("PASSCODE") or not passcode_required():
        return redirect(target, code=303)
    wrong = False
    if request.method == "POST":
        if try_passcode(request.form.get("passcode")):
            owner_id()
            return redirect(target, code=303)
        wrong = True
    return render_template("passcode.html", target=target, wrong=wrong), (403 if wrong else 200)
