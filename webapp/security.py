"""Who is asking, from where, and what the browser may do with our pages.

- Owner identity: each browser gets a random anonymous id in Flask's signed session cookie
  (HttpOnly, SameSite=Lax). Conversations are visible only to that id.
- Origin check: the websocket handshake is refused unless Origin is our own origin or listed
  in BCHAT_ALLOWED_ORIGINS (simple-websocket checks nothing, and cookies ride along on
  cross-site websocket handshakes).
- Headers: a strict CSP, and COOP/COEP so the page is cross-origin isolated (the browser
  engine needs that for multi-threaded WebAssembly).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, Response, abort, current_app, request, session

log = logging.getLogger(__name__)

OWNER_KEY = "owner"

CSP = "; ".join(
    [
        "default-src 'self'",
        # wasm-unsafe-eval lets the page compile llama.cpp's WebAssembly, nothing more.
        "script-src 'self' 'wasm-unsafe-eval'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


def owner_id(*, create: bool = True) -> str | None:
    """The anonymous id of the browser making this request (created on first sight)."""
    owner = session.get(OWNER_KEY)
    if owner is None and create:
        owner = secrets.token_urlsafe(18)
        session[OWNER_KEY] = owner
        session.permanent = True
    return owner


def short(identifier: str | None) -> str:
    """An id trimmed for logs: enough to correlate lines, not enough to use."""
    return f"{identifier[:6]}…" if identifier else "-"


# Path segments that are secrets (share tokens) or private ids (conversations, shares).
_PRIVATE_SEGMENT = re.compile(r"(/(?:s|c|api/conversations|api/shares)/)([A-Za-z0-9_-]{6})[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """A request line or path with ids and share tokens cut to 6 characters."""
    return _PRIVATE_SEGMENT.sub(r"\1\2…", text)


def continue_token(owner: str) -> str:
    """Ties the "continue this conversation" form to the visitor's own cookie (CSRF).

    An Origin check cannot do this job on the shared page: its no-referrer policy makes
    browsers send "Origin: null" with the form.
    """
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, b"continue|" + owner.encode(), hashlib.sha256).hexdigest()


def check_continue_token(value: str | None) -> str:
    owner = owner_id(create=False)
    if owner is None or not value or not hmac.compare_digest(value, continue_token(owner)):
        abort(403, description="this form has expired: open the shared link again")
    return owner


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def origin_allowed(origin: str | None) -> bool:
    if not origin:
        return False
    origin = origin.rstrip("/").lower()
    own = _origin_of(request.host_url)
    allowed = {own, own.replace("http://", "ws://", 1), own.replace("https://", "wss://", 1)}
    allowed.update(o.lower() for o in current_app.config["ALLOWED_ORIGINS"])
    return origin in allowed


def require_same_origin() -> None:
    """Abort with 403 unless the request comes from a page of ours (used for the websocket)."""
    origin = request.headers.get("Origin")
    if not origin_allowed(origin):
        log.warning("refused websocket from origin %r (host %s)", origin, request.host)
        abort(403, description="this origin may not open the chat socket")


def set_security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Embedder-Policy", "require-corp")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "DENY")
    return response


def init_app(app: Flask) -> None:
    app.config.update(
        SESSION_COOKIE_NAME="bchat",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=app.config["COOKIE_SECURE"],
        PERMANENT_SESSION_LIFETIME=timedelta(days=400),
        MAX_CONTENT_LENGTH=app.config["MAX_UPLOAD_BYTES"],
    )
    app.after_request(set_security_headers)


def redacting_request_handler():
    """The development server's request handler, logging request lines through redact()."""
    from werkzeug.serving import WSGIRequestHandler

    class RedactingRequestHandler(WSGIRequestHandler):
        def log(self, type: str, message: str, *args) -> None:  # noqa: A002 - werkzeug's name
            args = tuple(redact(a) if isinstance(a, str) else a for a in args)
            super().log(type, redact(message), *args)

    return RedactingRequestHandler
