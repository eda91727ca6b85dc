"""Who is asking, from where, and what the browser may do with our pages.

- Owner identity: each browser gets a random anonymous id in Flask's signed session cookie
  (HttpOnly, SameSite=Lax). Conversations are visible only to that id.
- Origin check: the websocket handshake is refused unless Origin is our own origin or listed
  in BCHAT_ALLOWED_ORIGINS (simple-websocket checks nothing, and cookies ride along on
  cross-site websocket handshakes).
- Host check: a request whose Host is not ours (BCHAT_ALLOWED_HOSTS, loopback, the bound
  address) gets 400 before anything else runs. The origin check and every absolute URL are
  built from Host, so without this a DNS-rebinding page could talk to a loopback bchat as if
  it were same-origin.
- Passcode (BCHAT_PASSCODE): when set, a visitor enters it once (failed tries limited per
  address, an IPv6 /64 counting as one: webapp/limits.py; compared in constant time) before
  getting an identity; share links stay readable. ``/v1`` (the OpenAI-compatible API) is not
  behind it: an API key is its gate (openai_api.py).
- Headers: a strict CSP, and COOP/COEP so the page is cross-origin isolated (the browser
  engine needs that for multi-threaded WebAssembly); private answers are never cached.
- Logs: Flask's exception log goes through redact(), so it never prints a full id or token.
- Accounts (BCHAT_ACCOUNTS, accounts.py): a signed-in browser's cookie holds a session token
  instead of an anonymous id, and owner_id() answers the account's owner id; with
  ``required``, pages and the API need a signed-in account (``check_account``). Forms carry a
  token bound to the cookie (``form_token``), as the continue form always has.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import secrets
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from flask import Flask, Response, abort, current_app, g, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import BadHost

from .accounts import get_accounts
from .errors import AppError
from .limits import get_limits

log = logging.getLogger(__name__)

OWNER_KEY = "owner"
FORM_SEED_KEY = "form"
PASS_KEY = "pass"
SESSION_KEY = "sid"  # a signed-in browser's session token (accounts.py)
REFRESHED_KEY = "day"  # the UTC day the cookie was last sent (SessionInterface)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# A Host header: a bracketed IPv6 address or a DNS name / IPv4 address, then an optional port.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::\d{1,5})?")

_CSP_PARTS = [
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
CSP = "; ".join(_CSP_PARTS)


def allow_inline_script(text: str) -> None:
    """Let this response's page run one inline script whose text is exactly ``text`` (the
    import map, assets.py): its sha256 joins script-src, so no other inline script runs, and
    neither 'unsafe-inline' nor a per-response nonce is needed."""
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    g.setdefault("csp_script_hashes", []).append(f"'sha256-{digest}'")


def content_security_policy() -> str:
    hashes = g.get("csp_script_hashes")
    if not hashes:
        return CSP
    return "; ".join(f"{part} {' '.join(hashes)}" if part.startswith("script-src ") else part
                     for part in _CSP_PARTS)


def current_account() -> dict | None:
    """The account this browser is signed in to (None: anonymous, or accounts are off). A
    revoked session or a disabled account signs the browser out here, at its next request."""
    if "bchat_account" in g:
        return g.bchat_account
    account = None
    token = session.get(SESSION_KEY)
    if token is not None and current_app.config.get("ACCOUNTS", "off") != "off":
        account = get_accounts().session_account(token)
        if account is None:
            session.clear()  # signed out elsewhere: a fresh anonymous visitor from here on
    g.bchat_account = account
    return account


def account_session_token() -> str | None:
    """The session token of the account this browser is signed in to (None: anonymous): what
    a long-lived connection (the websocket) re-checks, as a request checks it at its start."""
    return session.get(SESSION_KEY) if current_account() is not None else None


def owner_id(*, create: bool = True) -> str | None:
    """Whose data this request acts on: the signed-in account's owner id, else the browser's
    anonymous id (created on first sight)."""
    account = current_account()
    if account is not None:
        return account["owner_id"]
    owner = session.get(OWNER_KEY)
    if owner is None and create:
        owner = secrets.token_urlsafe(18)
        session[OWNER_KEY] = owner
        session.permanent = True
    return owner


def short(identifier: str | None) -> str:
    """An id trimmed for logs: enough to correlate lines, not enough to use."""
    return f"{identifier[:6]}…" if identifier else "-"


# Path segments that are secrets (share tokens, device links) or private ids (conversations,
# shares).
_PRIVATE_SEGMENT = re.compile(r"(/(?:s|c|d|api/conversations|api/shares)/)([A-Za-z0-9_-]{6})[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """A request line or path with ids and share tokens cut to 6 characters."""
    return _PRIVATE_SEGMENT.sub(r"\1\2…", text)


def _form_seed(*, create: bool) -> str | None:
    """A random value in the visitor's cookie that forms are bound to. It is not an identity,
    so a visitor who has not entered the passcode yet can still be shown a form."""
    seed = session.get(FORM_SEED_KEY)
    if seed is None and create:
        seed = session[FORM_SEED_KEY] = secrets.token_urlsafe(12)
        session.permanent = True
    return seed


def continue_token() -> str:
    """Ties the "continue this conversation" form to the visitor's own cookie (CSRF).

    An Origin check cannot do this job on the shared page: its no-referrer policy makes
    browsers send "Origin: null" with the form.
    """
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, b"continue|" + _form_seed(create=True).encode(), hashlib.sha256).hexdigest()


def check_continue_token(value: str | None) -> None:
    seed = _form_seed(create=False)
    if seed is None or not value or not hmac.compare_digest(value, continue_token()):
        abort(403, description="this form has expired: open the shared link again")


def form_token(purpose: str) -> str:
    """A CSRF token for one kind of form (sign-in, the admin's actions …), bound to this
    browser's cookie: another site can make a browser post a form, not read this value."""
    key = current_app.config["SECRET_KEY"].encode()
    seed = _form_seed(create=True).encode()
    return hmac.new(key, purpose.encode() + b"|" + seed, hashlib.sha256).hexdigest()


def check_form_token(purpose: str, value: str | None) -> None:
    seed = _form_seed(create=False)
    if seed is None or not isinstance(value, str) or not hmac.compare_digest(value, form_token(purpose)):
        abort(403, description="this form has expired: go back, reload the page and try again")


def sign_in(account: dict, how: str = "password", *, claim: bool = True) -> dict[str, int]:
    """This browser is now signed in to ``account``: its anonymous data is claimed into the
    account (once; not with ``claim=False``, a device link, whose maker need not be the person
    opening it), and the cookie starts over (a new form seed, no anonymous id), so nothing
    a page or another site learnt about the old cookie works with the new one."""
    accounts = get_accounts()
    if session.get(SESSION_KEY) and current_account() is not None:
        accounts.end_session(session[SESSION_KEY])  # signing in again: the old one ends
    anonymous = session.get(OWNER_KEY)
    moved = accounts.claim(anonymous, account["id"]) if claim else {}
    token = accounts.open_session(account["id"], user_agent=request.user_agent.string,
                                  address=request.remote_addr, how=how)
    passed = session.get(PASS_KEY)
    session.clear()
    if passed:
        session[PASS_KEY] = passed  # the site's passcode stays entered
    session[SESSION_KEY] = token
    session.permanent = True
    g.bchat_account = {**account, "session_id": None}
    return moved


def sign_out() -> None:
    token = session.get(SESSION_KEY)
    if token is not None:
        get_accounts().end_session(token)
    passed = session.get(PASS_KEY)
    session.clear()
    if passed:
        session[PASS_KEY] = passed
    g.bchat_account = None


# Reachable without an account when BCHAT_ACCOUNTS=required: signing in, share links
# (read-only; continuing one needs an account), device links, static files, health, the API
# description, and the passcode form (the passcode comes first: without it here, the two
# gates sent a visitor back and forth between their forms).
_OPEN_WITHOUT_ACCOUNT = {"static", "pages.shared", "pages.passcode", "account.signin", "account.signup",
                         "account.device", "account.oidc_start", "account.oidc_callback",
                         "api.healthz", "api.openapi"}


def check_account():
    """BCHAT_ACCOUNTS=required: everything but the open endpoints needs a signed-in account."""
    if current_app.config.get("ACCOUNTS", "off") != "required":
        return None
    if request.endpoint in _OPEN_WITHOUT_ACCOUNT or request.endpoint is None:
        return None
    if request.blueprint == "admin":
        return None  # its own gate answers 404 to anyone but an admin, signed in or not
    if request.path.startswith("/v1/"):
        return None  # API keys are its gate; a key works only while its account does
    if current_account() is not None:
        return None
    if request.blueprint == "api":
        raise AppError("sign_in_required", "sign in first")
    if request.endpoint == "pages.continue_shared":  # back to the snapshot once signed in
        return redirect(url_for("account.signin", next=request.path.removesuffix("/continue")),
                        code=303)
    if request.method == "GET" and request.headers.get("Upgrade", "").lower() != "websocket":
        return redirect(url_for("account.signin", next=request.full_path.rstrip("?")))
    abort(401, description="sign in first")


# -- hosts ----------------------------------------------------------------------------------


def _host_name(host: str) -> str | None:
    """The name part of a Host header, or None when it is not a name a URL can hold."""
    host = host.strip().lower()
    match = _HOST.fullmatch(host)
    if not match:
        return None
    name = match.group(1)
    if name.startswith("["):
        return name
    name = name.removesuffix(".")  # one trailing dot: the fully qualified spelling
    # Empty or over-long labels ("localhost..") are not names: Werkzeug cannot build URLs
    # for them, so letting one through turned its refusal into a 500.
    if len(name) > 253 or not all(0 < len(label) <= 63 for label in name.split(".")):
        return None
    return name


def allowed_hosts(config) -> list[str]:
    """Loopback, the address ``bchat serve`` bound (unless a wildcard), BCHAT_ALLOWED_HOSTS."""
    hosts = list(LOOPBACK_HOSTS)
    bound = (config.get("BIND_HOST") or "").strip().lower()
    if bound and bound not in ("0.0.0.0", "::", "[::]"):
        hosts.append(f"[{bound.strip('[]')}]" if ":" in bound else bound)
    hosts.extend(h.strip().lower() for h in config.get("ALLOWED_HOSTS") or ())
    return hosts


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Django's ALLOWED_HOSTS rules: exact names, ``.example.com`` for it and its subdomains,
    ``*`` for any. Ports are ignored."""
    name = _host_name(host)
    if name is None:
        return False
    for pattern in allowed:
        if pattern == "*" or name == pattern.rstrip("."):
            return True
        if pattern.startswith(".") and (name == pattern[1:] or name.endswith(pattern)):
            return True
    return False


def check_host() -> None:
    if not host_allowed(request.host, current_app.config["BCHAT_HOSTS"]):
        log.warning("refused request for host %r (not in BCHAT_ALLOWED_HOSTS)", request.host[:100])
        raise BadHost()  # answered by errors.py, without the styled page (it builds URLs)


# Characters a browser drops from a URL (tab, CR, LF) or reads as "/" (backslash): after
# that, "/\t/evil.example" or "/\\evil.example" is "//evil.example", another site.
_UNSAFE_IN_PATH = re.compile(r"[\x00-\x20\x7f\\]")


def same_site_path(target: object, fallback: str = "/") -> str:
    """``target`` when it is a path on this site, else ``fallback`` (never another site)."""
    if not isinstance(target, str) or len(target) > 2000 or _UNSAFE_IN_PATH.search(target):
        return fallback
    if not target.startswith("/") or target.startswith("//"):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return fallback
    return target


# -- passcode ---------------------------------------------------------------------------------


def _passcode_mark() -> str:
    """What the cookie holds once the passcode was entered; changing the passcode voids it."""
    key = current_app.config["SECRET_KEY"].encode()
    passcode = current_app.config["PASSCODE"].encode()
    return hmac.new(key, b"passcode|" + passcode, hashlib.sha256).hexdigest()[:32]


def passcode_required() -> bool:
    """True when the site has a passcode and this visitor has not entered it."""
    if not current_app.config.get("PASSCODE"):
        return False
    return not hmac.compare_digest(str(session.get(PASS_KEY, "")), _passcode_mark())


def try_passcode(value: str | None) -> bool:
    """Check a typed passcode: 429 when this address failed too often, else True/False."""
    limits = get_limits()
    address = request.remote_addr
    seconds = limits.take_passcode_try(address)
    if seconds:
        wait = max(1, math.ceil(seconds))
        raise AppError("too_many_tries", f"try again in {wait} s", retry_after=wait)
    expected = hashlib.sha256(current_app.config["PASSCODE"].encode()).digest()
    given = hashlib.sha256((value or "").encode("utf-8", "replace")).digest()
    if not hmac.compare_digest(given, expected):  # digests: equal length, so no length leak
        log.warning("wrong passcode from %s", address)
        return False
    limits.passcode_right(address)
    session[PASS_KEY] = _passcode_mark()
    session.permanent = True
    return True


# Reachable without the passcode: the form itself, share links (the continue form asks for
# the passcode itself), static files, the health check and the API description.
_OPEN_ENDPOINTS = {"static", "pages.passcode", "pages.shared", "pages.continue_shared",
                   "api.healthz", "api.openapi"}


def check_passcode():
    if not passcode_required() or request.endpoint in _OPEN_ENDPOINTS or request.endpoint is None:
        return None
    if request.path.startswith("/v1/"):
        return None  # the OpenAI-compatible API: API keys are its gate, not the page's cookie
    if request.blueprint == "api":
        raise AppError("passcode_required", "enter the site's passcode first")
    if request.method == "GET" and request.headers.get("Upgrade", "").lower() != "websocket":
        return redirect(url_for("pages.passcode", next=request.full_path.rstrip("?")))
    abort(401, description="enter the site's passcode first")


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
    # Conversations, exports and pages are one visitor's own: no shared or disk cache may keep
    # them. Static files and model files set their own caching.
    if request.endpoint != "static" and not (request.endpoint or "").startswith("model_files."):
        headers.setdefault("Cache-Control", "private, no-store")
    headers.setdefault("Content-Security-Policy", content_security_policy())
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Embedder-Policy", "require-corp")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "DENY")
    return response


def utc_today() -> str:
    return datetime.now(UTC).date().isoformat()


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, re-sent at most once a day unless it changed, and never
    on static files.

    Flask re-signs and re-sends a permanent session on every answer
    (SESSION_REFRESH_EACH_REQUEST), so that its 400 days count from the last visit. Once a day
    keeps that (the cookie is the visitor's identity: it must not lapse while they use bchat)
    without the JSON, compression, HMAC and header on each of a class's API calls
    (bench/request_cost.py). On a static file a cookie made each cached copy match only the
    cookie it was fetched with, which changed every second, so the browser revalidated every
    "immutable" script on every visit, and a shared cache would not keep a file that sets one."""

    def should_set_cookie(self, app: Flask, session) -> bool:
        if request.endpoint == "static":
            return False
        today = utc_today()
        if not (session.modified or session.permanent and session.get(REFRESHED_KEY) != today):
            return False
        if session.permanent:
            session[REFRESHED_KEY] = today  # written into the cookie this answer sends
        return True


def init_app(app: Flask) -> None:
    app.config.update(
        SESSION_COOKIE_NAME="bchat",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=app.config["COOKIE_SECURE"],
        PERMANENT_SESSION_LIFETIME=timedelta(days=400),
        MAX_CONTENT_LENGTH=app.config["MAX_UPLOAD_BYTES"],
        BCHAT_HOSTS=allowed_hosts(app.config),
    )
    app.session_interface = SessionInterface()
    # Order matters: an unknown Host is refused before the passcode gate says anything.
    app.before_request(check_host)
    app.before_request(check_passcode)
    app.before_request(check_account)
    app.after_request(set_security_headers)
    if not any(isinstance(f, RedactingFilter) for f in app.logger.filters):
        app.logger.addFilter(RedactingFilter())


class RedactingFilter(logging.Filter):
    """Flask logs an unhandled exception as "Exception on /c/<full id> [GET]" with its
    traceback: cut ids and tokens in both before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redacting_request_handler():
    """The development server's request handler, logging request lines through redact()."""
    from werkzeug.serving import WSGIRequestHandler

    class RedactingRequestHandler(WSGIRequestHandler):
        def log(self, type: str, message: str, *args) -> None:  # noqa: A002 - werkzeug's name
            args = tuple(redact(a) if isinstance(a, str) else a for a in args)
            super().log(type, redact(message), *args)

    return RedactingRequestHandler
