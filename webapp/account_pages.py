"""The account pages: sign in, sign up, sign out, the account page (use on another device,
where you are signed in), and the one-time device link. Server-rendered forms, each with a
CSRF token bound to the cookie (security.form_token); accounts.py holds the rules.

With BCHAT_ACCOUNTS=off only the device link exists: it carries the anonymous identity to
another browser, which is what "the same chats on my phone" means without accounts.
"""

from __future__ import annotations

import logging
import math

from flask import Blueprint, abort, current_app, redirect, render_template, request, session, url_for

from . import accounts, oidc
from .accounts import get_accounts
from .errors import AppError, NotFound
from .limits import EXTENSION_KEY as LIMITS_KEY
from .limits import get_limits
from .models import iso
from .security import (
    OWNER_KEY,
    check_form_token,
    current_account,
    form_token,
    owner_id,
    same_site_path,
    short,
    sign_in,
    sign_out,
)

log = logging.getLogger(__name__)

bp = Blueprint("account", __name__)


def init_accounts(app) -> None:
    """Everything accounts add to an app (create_app calls it once the services exist): the
    account service and its quota check, OpenID Connect, these pages and the admin's."""
    from . import admin
    from .services import EXTENSION_KEY as SERVICES_KEY

    built = app.extensions[SERVICES_KEY]
    accounts.init_app(app, app.extensions[LIMITS_KEY], built.runs, built.db)
    oidc.init_app(app)
    app.register_blueprint(bp)
    app.register_blueprint(admin.bp)


def _mode() -> str:
    return current_app.config["ACCOUNTS"]


def _need_accounts() -> None:
    if _mode() == "off":
        abort(404)


def _signup_open() -> bool:
    return _mode() != "off" and current_app.config["SIGNUP"] == "open"


@bp.app_context_processor
def account_nav():
    """What the chat page's account corner shows (templates/chat.html)."""
    if request.endpoint not in ("pages.chat",):
        return {}
    return {"account_nav": {"mode": _mode(), "account": current_account(),
                            "signup": _signup_open()}}


def _too_many(seconds: float):
    wait = max(1, math.ceil(seconds))
    raise AppError("too_many_tries", f"too many sign-in tries; try again in {wait} s",
                   retry_after=wait)


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    _need_accounts()
    target = same_site_path(request.values.get("next"), url_for("pages.chat"))
    error = None
    username = ""
    if request.method == "POST":
        check_form_token("signin", request.form.get("csrf"))
        username = (request.form.get("username") or "").strip()[:64]
        key = username.lower()
        address = request.remote_addr
        wait = get_limits().take_signin_try(key, address)
        if wait:
            # One audit row per backoff step: a row per refused try let a guesser flood the log.
            if get_limits().signin_refusal_is_first(key, address):
                get_accounts().audit("sign_in_limited", target=key, address=address)
            else:
                log.info("sign-in for %r from %s refused again (backoff)", key[:64], address)
            _too_many(wait)
        account = get_accounts().verify(username, request.form.get("password"))
        if account is None:
            # The username is recorded (the audit log shows guessing), the password never is.
            log.warning("failed sign-in for %r from %s", key[:64], address)
            get_accounts().audit("sign_in_failed", target=key, address=address)
            error = "That username and password do not match an account."
        else:
            get_limits().signin_right(key, address)
            moved = sign_in(account)
            get_accounts().audit("sign_in", actor=account["username"], target=account["username"],
                                 address=address, detail={"claimed": moved})
            return redirect(target, code=303)
    return render_template("account/signin.html", mode="signin", target=target, error=error,
                           username=username, csrf=form_token("signin"),
                           signup=_signup_open(), required=_mode() == "required",
                           oidc_name=oidc.provider_name() if oidc.enabled() else None), \
        (403 if error else 200)


NEXT_KEY = "oidc_next"


@bp.get("/signin/oidc")
def oidc_start():
    """To the school's sign-in page; it sends the browser back to ``oidc_callback``."""
    _need_accounts()
    if not oidc.enabled():
        abort(404)
    session[NEXT_KEY] = same_site_path(request.args.get("next"), url_for("pages.chat"))
    return oidc.client().authorize_redirect(url_for("account.oidc_callback", _external=True))


@bp.get("/signin/oidc/callback")
def oidc_callback():
    _need_accounts()
    if not oidc.enabled():
        abort(404)
    from authlib.common.errors import AuthlibBaseError
    from joserfc.errors import JoseError
    from requests import RequestException

    address = request.remote_addr
    target = same_site_path(session.pop(NEXT_KEY, None), url_for("pages.chat"))
    try:
        token = oidc.client().authorize_access_token()
        claims = token.get("userinfo")
        if not claims or not claims.get("sub"):
            raise ValueError("no ID token")
    except (AuthlibBaseError, JoseError, RequestException, ValueError, KeyError) as exc:
        # A wrong audience or issuer, a bad signature, an expired token, a used or forged
        # state (a replayed callback): nobody is signed in, and the log says why.
        log.warning("OpenID Connect sign-in refused from %s: %s", address, type(exc).__name__)
        get_accounts().audit("sign_in_failed", target=oidc.provider_name()[:64], address=address,
                             detail={"how": "oidc", "why": type(exc).__name__})
        return render_template("account/signin.html", mode="signin", target=target,
                               error=f"Signing in with {oidc.provider_name()} did not work. "
                                     "Try again from the start.",
                               username="", csrf=form_token("signin"), signup=_signup_open(),
                               required=_mode() == "required",
                               oidc_name=oidc.provider_name()), 403
    subject, wanted = oidc.identity(claims)
    account = get_accounts().oidc_account(subject, wanted,
                                          create=current_app.config["SIGNUP"] == "open")
    if account is None:
        # BCHAT_SIGNUP=admin: only an admin makes accounts, for this sign-in too. The identity
        # is shown (it is no secret) so the person can hand it to an admin, who links it.
        get_accounts().audit("sign_in_failed", target=str(wanted)[:64], address=address,
                             detail={"how": "oidc", "why": "no_account", "subject": subject})
        return render_template("account/signin.html", mode="signin", target=target,
                               error=f"There is no account here for your {oidc.provider_name()} "
                                     "sign-in yet: only an admin makes accounts on this site. "
                                     "Ask one to make yours and link it to this identity: "
                                     f"{subject}",
                               username="", csrf=form_token("signin"), signup=False,
                               required=_mode() == "required",
                               oidc_name=oidc.provider_name()), 403
    if account["disabled"]:
        get_accounts().audit("sign_in_failed", target=account["username"], address=address,
                             detail={"how": "oidc", "why": "disabled"})
        abort(403, description="this account is disabled")
    moved = sign_in(account, how="oidc")
    get_accounts().audit("sign_in", actor=account["username"], target=account["username"],
                         address=address, detail={"how": "oidc", "claimed": moved})
    return redirect(target, code=303)


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    _need_accounts()
    if not _signup_open():
        abort(404)
    target = same_site_path(request.values.get("next"), url_for("pages.chat"))
    error = None
    username = ""
    if request.method == "POST":
        check_form_token("signup", request.form.get("csrf"))
        username = (request.form.get("username") or "").strip()[:64]
        password = request.form.get("password")
        if password != request.form.get("password2"):
            error = "The two passwords differ."
        else:
            # Creating accounts is limited like failed sign-ins: per address, with backoff.
            wait = get_limits().take_signup(request.remote_addr)
            if wait:
                _too_many(wait)
            try:
                account = get_accounts().create(username, password)
            except AppError as exc:
                error = exc.message
            else:
                moved = sign_in(account)
                get_accounts().audit("sign_up", actor=account["username"],
                                     target=account["username"], address=request.remote_addr,
                                     detail={"claimed": moved})
                return redirect(target, code=303)
    return render_template("account/signin.html", mode="signup", target=target, error=error,
                           username=username, csrf=form_token("signup"), signup=True,
                           required=_mode() == "required"), (400 if error else 200)


@bp.post("/signout")
def signout():
    _need_accounts()
    check_form_token("account", request.form.get("csrf"))
    account = current_account()
    sign_out()
    if account is not None:
        get_accounts().audit("sign_out", actor=account["username"], address=request.remote_addr)
    return redirect(url_for("account.signin") if _mode() == "required" else url_for("pages.chat"),
                    code=303)


def _render_account(link: str | None = None, expires: str | None = None, qr: str | None = None,
                    message: str | None = None):
    account = current_account()
    sessions = get_accounts().sessions(account["id"]) if account else []
    return render_template("account/account.html", mode=_mode(), account=account,
                           sessions=sessions, current_session=account and account.get("session_id"),
                           csrf=form_token("account"), link=link, expires=expires, qr=qr,
                           link_minutes=max(1, current_app.config["DEVICE_LINK_SECONDS"] // 60),
                           signup=_signup_open(), message=message)


@bp.get("/account")
def account_page():
    return _render_account()


def _qr_svg(url: str) -> str:
    """The link as a QR code, an SVG drawn here (no script, nothing fetched)."""
    import segno

    return segno.make(url, error="m").svg_inline(scale=5, border=2, dark="#000", light="#fff",
                                                 omitsize=True, title="QR code of the link")


@bp.post("/account/device-link")
def device_link():
    check_form_token("account", request.form.get("csrf"))
    account = current_account()  # None: the link carries this browser's anonymous identity
    seconds = current_app.config["DEVICE_LINK_SECONDS"]
    token, expires = get_accounts().make_device_link(
        account_id=account["id"] if account else None,
        owner_id=None if account else owner_id(), seconds=seconds)
    url = url_for("account.device", token=token, _external=True)
    if account is not None:
        get_accounts().audit("device_link", actor=account["username"], address=request.remote_addr)
    return _render_account(link=url, expires=iso(expires), qr=_qr_svg(url))


@bp.route("/d/<token>", methods=["GET", "POST"])
def device(token: str):
    """A device link: a page with one button (a link preview or a scanner that fetches the
    URL must not use up the link), then the sign-in."""
    accounts = get_accounts()
    if request.method == "GET":
        works = accounts.peek_device_link(token)
        response = current_app.make_response((render_template(
            "account/device.html", token=token, works=works, csrf=form_token("device"),
            mode=_mode()), 200 if works else 404))
        response.headers["Referrer-Policy"] = "no-referrer"  # the URL is the secret
        response.headers["X-Robots-Tag"] = "noindex, nofollow"
        return response
    check_form_token("device", request.form.get("csrf"))
    try:
        found = accounts.redeem_device_link(token)
    except NotFound:
        return render_template("account/device.html", token=token, works=False,
                               csrf=form_token("device"), mode=_mode()), 404
    # Whoever made the link need not be whoever opens it: the opener's own data (chats, API
    # keys) is never moved into the link's account or identity; it stays with the old one.
    if "account" in found:
        account = found["account"]
        sign_in(account, how="device link", claim=False)
        accounts.audit("sign_in", actor=account["username"], target=account["username"],
                       address=request.remote_addr, detail={"how": "device link"})
    else:
        # No account: this browser becomes the same anonymous visitor as the other one.
        log.info("device link carried owner %s", short(found["owner_id"]))
        if current_account() is not None:
            sign_out()
        session[OWNER_KEY] = found["owner_id"]
        session.permanent = True
    return redirect(url_for("pages.chat"), code=303)


@bp.post("/account/sessions/<session_id>/revoke")
def revoke_session(session_id: str):
    _need_accounts()
    check_form_token("account", request.form.get("csrf"))
    account = current_account()
    if account is None:
        return redirect(url_for("account.signin"), code=303)
    get_accounts().revoke_session(account["id"], session_id)
    if session_id == account.get("session_id"):
        sign_out()
        return redirect(url_for("pages.chat"), code=303)
    return _render_account(message="That browser is signed out.")


@bp.post("/account/password")
def change_password():
    _need_accounts()
    check_form_token("account", request.form.get("csrf"))
    account = current_account()
    if account is None:
        return redirect(url_for("account.signin"), code=303)
    accounts = get_accounts()
    # Limited like sign-in: a borrowed session must not be a way to guess the password.
    wait = get_limits().take_signin_try(account["username"], request.remote_addr)
    if wait:
        _too_many(wait)
    if accounts.verify(account["username"], request.form.get("current")) is None:
        return _render_account(message="The current password is wrong."), 403
    get_limits().signin_right(account["username"], request.remote_addr)
    try:
        updated = accounts.set_password(account["username"], request.form.get("password"))
    except AppError as exc:
        return _render_account(message=exc.message), 400
    accounts.audit("password_changed", actor=account["username"], address=request.remote_addr)
    sign_in(updated)  # every other browser was signed out; this one stays in, on a new session
    return _render_account(message="Password changed; your other browsers are signed out.")
