"""HTML pages: the chat shell. Everything dynamic is fetched by the page's ES modules."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from .security import owner_id
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
