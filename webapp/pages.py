"""HTML pages: the chat shell, shared snapshots, the passcode form. Everything dynamic is
fetched by the page's ES modules; static files travel through assets.py, errors through
errors.py."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for

from .errors import NotFound
from .options import page_options
from .security import (
    check_continue_token,
    continue_token,
    owner_id,
    passcode_required,
    same_site_path,
    try_passcode,
)
from .services import get_services

log = logging.getLogger(__name__)

bp = Blueprint("pages", __name__)


# Registered last (decorators apply bottom-up), so url_for("pages.chat") builds "/", not it.
@bp.get("/models")  # the chat page with the Models panel open (static/js/ui/models.js)
@bp.get("/")
@bp.get("/c/<conversation_id>")
def chat(conversation_id: str | None = None):
    owner_id()  # the first visit creates the anonymous owner cookie the socket needs
    return render_template(
        "chat.html",
        conversation_id=conversation_id or "",
        default_model=get_services().engines.default_model or "",
        max_message_chars=current_app.config["MAX_MESSAGE_CHARS"],
        n_ctx=current_app.config["N_CTX"],
        max_attachment_bytes=current_app.config["MAX_ATTACHMENT_BYTES"],
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
