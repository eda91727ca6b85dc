"""The one error type, and the two dialects it is rendered in.

An ``AppError`` carries a machine-readable ``code``, a sentence for the user, optional extra
fields (``retry_after`` …) and, where one value is at fault, its ``param``. Its HTTP status
comes from ``STATUS`` (one table for the API, ``/v1``, the worker and engine failures). It
renders itself in bchat's dialect, ``{"error": {"code", "message", …}}`` (the JSON API; the
socket sends the same fields as an ``error`` frame), and in OpenAI's, ``{"error": {"message",
"type", "param", "code"}}`` with OpenAI's own codes where it has one (``/v1``, ``bchat worker``).
``register(app)`` answers every request's errors in its path's dialect.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import BadHost, HTTPException
from werkzeug.http import HTTP_STATUS_CODES

log = logging.getLogger(__name__)

# code → HTTP status. A code not listed is the request's fault (400), except an upstream's
# failure (502, "upstream_…").
STATUS = {
    "invalid_api_key": 401, "passcode_required": 401, "sign_in_required": 401,
    "signed_out": 401,
    "account_disabled": 403, "username_taken": 409, "quota_exceeded": 429,
    "not_found": 404, "unknown_model": 404,
    "busy": 409, "already_final": 409, "cancelled": 409,
    "json_required": 415,
    "file_too_large": 413, "storage_quota_exceeded": 413, "unsupported_file": 415,
    "multipart_required": 415, "already_sent": 409, "cross_site": 403,
    "rate_limited": 429, "too_many_queued": 429, "too_many_sockets": 429, "too_many_tries": 429,
    "upstream_rate_limited": 429,
    "upstream_rejected": 400,
    "internal": 500, "model_failed": 500, "model_crashed": 500, "no_chat_template": 500,
    "model_starting": 503, "model_unavailable": 503, "database_busy": 503,
}
# bchat's code → OpenAI's, where OpenAI has one for the same fault; others keep bchat's.
OPENAI_CODES = {
    "unknown_model": "model_not_found", "bad_messages": "missing_required_parameter",
    "bad_message": "invalid_value", "bad_options": "invalid_value", "bad_n": "invalid_value",
    "bad_model": "invalid_value", "bad_stream": "invalid_value", "bad_store": "invalid_value",
    "bad_stream_options": "invalid_value", "empty_content": "invalid_value",
    "content_too_long": "string_above_max_length", "bad_grammar": "invalid_value",
    "context_too_long": "context_length_exceeded", "rate_limited": "rate_limit_exceeded",
    "not_found": "not_found", "internal": "server_error", "model_failed": "server_error",
    "bad_logit_bias": "invalid_value", "template_refused": "invalid_value",
}
# The request field an engine's refusal is about (the engine knows the code, not the field).
CODE_PARAMS = {"bad_logit_bias": "logit_bias", "context_too_long": "messages",
               "template_refused": "messages"}
# HTTP status → OpenAI's error type.
OPENAI_TYPES = {403: "permission_error", 429: "requests"}


def status_of(code: str) -> int:
    return STATUS.get(code) or (502 if code.startswith("upstream_") else 400)


class AppError(Exception):
    def __init__(self, code: str, message: str, *, status: int | None = None,
                 param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or status_of(code)  # given: where one code has two causes
        self.param = param
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """bchat's dialect (the JSON API's ``error``, the socket's ``error`` frame)."""
        return {"code": self.code, "message": self.message, **self.extra}

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's dialect: its codes and types, and the ``param`` at fault."""
        kind = OPENAI_TYPES.get(self.status) or (
            "server_error" if self.status >= 500 else "invalid_request_error")
        return {"message": self.message, "type": kind,
                "param": self.param or CODE_PARAMS.get(self.code),
                "code": OPENAI_CODES.get(self.code, self.code)}

    def response(self, dialect: str = "bchat") -> Response:
        body = self.to_openai() if dialect == "openai" else self.to_dict()
        return self._retry(jsonify({"error": body}))

    def _retry(self, response: Response) -> Response:
        response.status_code = self.status
        if "retry_after" in self.extra:  # a 429 or 503 says when to come back, in the header too
            response.headers["Retry-After"] = str(self.extra["retry_after"])
        return response


class Invalid(AppError, ValueError):
    """Input that breaks a rule (400)."""


class NotFound(AppError, LookupError):
    """Missing, or someone else's: both answer 404 so ids cannot be probed."""

    def __init__(self, what: str = "conversation", message: str | None = None) -> None:
        super().__init__("not_found", message or f"no such {what}")


class RateLimited(AppError):
    def __init__(self, message: str, retry_after: float, code: str = "rate_limited") -> None:
        super().__init__(code, message, retry_after=max(1, round(retry_after)))


def from_http(exc: HTTPException) -> AppError:
    return AppError(exc.name.lower().replace(" ", "_"), exc.description or exc.name,
                    status=exc.code or 500)


# -- how a request's errors are answered -------------------------------------------------------

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


def _dialect() -> str:
    """openai for /v1 (main app and worker), bchat for the API, html for people."""
    if request.path.startswith("/v1/"):
        return "openai"
    if request.path.startswith(("/api/", "/ws")) or request.blueprint == "api":  # /healthz too
        return "bchat"
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return "bchat" if best == "application/json" and not request.accept_mimetypes["text/html"] \
        else "html"


def register(app: Flask, *, pages: bool = True) -> None:
    """Answer every error of ``app`` in the request's dialect; ``pages``: people get the
    styled page (templates/error.html), else JSON."""

    def answer(error: AppError) -> Response:
        dialect = _dialect()
        if dialect != "html" or not pages:
            return error.response("openai" if dialect == "openai" else "bchat")
        message = error.message if error.status not in (404, 405) else None
        return error._retry(app.make_response(render_template(
            "error.html", code=error.status, message=message, revoked_share=False,
            title=TITLES.get(error.status) or HTTP_STATUS_CODES.get(error.status, "Error"))))

    @app.errorhandler(AppError)
    def _app_error(exc: AppError):
        return answer(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if isinstance(exc, BadHost):  # no URLs can be built for this request: no styled page
            return AppError("unknown_host", "unknown host: add it to BCHAT_ALLOWED_HOSTS").response()
        return answer(from_http(exc))
