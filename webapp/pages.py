"""HTML pages: the chat shell. Everything dynamic is fetched by the page's ES modules."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for

from .chats import NotFound
from .security import check_continue_token, continue_token, owner_id, passcode_required, try_passcode
from .services import get_services

bp = Blueprint("pages", __name__)


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
    )


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
        abort(404)
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
        abort(404)
    return redirect(url_for("pages.chat", conversation_id=conversation["id"]), code=303)


def _local_path(target: str | None) -> str:
    """Where to go after the passcode: only a path on this site, never another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return url_for("pages.chat")
    return target


@bp.route("/passcode", methods=["GET", "POST"])
def passcode():
    """The one form a visitor sees before the passcode; then an identity, then the chat."""
    target = _local_path(request.values.get("next"))
    if not current_app.config.get("PASSCODE") or not passcode_required():
        return redirect(target, code=303)
    wrong = False
    if request.method == "POST":
        if try_passcode(request.form.get("passcode")):
            owner_id()
            return redirect(target, code=303)
        wrong = True
    return render_template("passcode.html", target=target, wrong=wrong), (403 if wrong else 200)
