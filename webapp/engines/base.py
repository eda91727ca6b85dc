"""The one interface every server-side engine implements, and the values it yields.

``Engine.stream(model, messages, options, cancel)`` yields ``Token`` chunks and ends with
exactly one ``Finished``; failures raise ``EngineError`` (possibly after some tokens, which the
caller keeps as a partial reply). ``cancel`` is a ``threading.Event`` the caller sets on stop
or disconnect; an engine must notice it between tokens and end with finish_reason "stopped".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..options import GenerationOptions


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Queued:
    """The request waits behind others; ``position`` 1 is next."""

    position: int


@dataclass(frozen=True)
class Idle:
    """Nothing new for a while (only from engines asked for heartbeats): lets a caller check
    on its client, e.g. write a keepalive that fails fast once the client is gone."""


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "stopped"
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float | None
    meta: dict[str, Any] = field(default_factory=dict)


Chunk = Token | Queued | Idle | Finished


class EngineError(Exception):
    """A failure the user should see; ``code`` goes into the websocket error frame."""

    code = "model_failed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class ContextTooLong(EngineError):
    code = "context_too_long"


class UnknownModel(EngineError):
    code = "unknown_model"


@dataclass(frozen=True)
class ModelInfo:
    id: str
    engine: str  # which backend serves it: "llamacpp" or "openai"
    facts: dict[str, Any] = field(default_factory=dict)
    browser_url: str | None = None  # set when the page can download and run it itself


class Engine(Protocol):
    def models(self) -> list[ModelInfo]: ...

    def stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
    ) -> Iterator[Chunk]: ...

    def close(self) -> None: ...
