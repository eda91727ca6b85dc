"""The one error type bchat's adapters (JSON API, websocket, worker) turn into responses.

An ``AppError`` carries a machine-readable ``code``, a sentence for the user, the HTTP status
an API answers with, and optional extra fields (``retry_after`` …). The API renders it as
``{"error": {"code", "message", …}}`` with that status; the socket as an ``error`` frame.
"""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    status = 400

    def __init__(self, code: str, message: str, *, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}


class Invalid(AppError, ValueError):
    """Input that breaks a rule (400)."""


class NotFound(AppError, LookupError):
    """Missing, or someone else's: both answer 404 so ids cannot be probed."""

    status = 404

    def __init__(self, what: str = "conversation", message: str | None = None) -> None:
        super().__init__("not_found", message or f"no such {what}")


class RateLimited(AppError):
    status = 429

    def __init__(self, message: str, retry_after: float, code: str = "rate_limited") -> None:
        super().__init__(code, message, retry_after=max(1, round(retry_after)))
