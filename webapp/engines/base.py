"""The one interface every server-side engine implements, and the values it yields.

``Engine.stream(model, messages, options, cancel)`` yields ``Token`` chunks and ends with
exactly one ``Finished``; failures raise ``EngineError`` (possibly after some tokens, which the
caller keeps as a partial reply). ``cancel`` is a ``threading.Event`` the caller sets on stop
or disconnect; an engine must notice it between tokens and end with finish_reason "stopped".
Engines report counts; how long a reply took is measured above them, by ``timed``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..options import GenerationOptions


@dataclass(frozen=True)
class Token:
    text: str
    # Asked for (options.logprobs): OpenAI's logprobs.content entries of the tokens this text
    # completes, {"token", "logprob", "bytes", "top_logprobs"}, as JSON-ready dicts.
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Queued:
    """The request waits behind others; ``position`` 1 is next."""

    position: int


@dataclass(frozen=True)
class Idle:
    """Nothing new for a while (only from engines asked for heartbeats): lets a caller check
    on its client, e.g. write a keepalive that fails fast once the client is gone."""


@dataclass(frozen=True)
class Timing:
    """How long a reply took, in milliseconds from the request, and how fast it was written."""

    queued_ms: float | None = None  # before the engine began on the prompt (a slot, the fit)
    prompt_ms: float | None = None  # reading the prompt: the engine's own figure where it has one
    first_token_ms: float | None = None
    tokens_per_second: float | None = None  # decoding, first token to last (engine-timed if it can)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "stopped"
    prompt_tokens: int
    completion_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)  # "prompt_ms" where the engine knows it
    timing: Timing = Timing()  # set by timed()

    @property
    def tokens_per_second(self) -> float | None:
        return self.timing.tokens_per_second


Chunk = Token | Queued | Idle | Finished


def timed(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """``chunks`` of one reply, its Finished carrying the Timing of when the chunks came: the
    one place a reply's speed is measured, whichever engine (or process) wrote it. Call it
    as the request is made (the clock starts here, not at the first read)."""
    started = time.perf_counter()

    def measured() -> Iterator[Chunk]:
        first = last = None
        try:
            for chunk in chunks:
                if isinstance(chunk, Token):
                    last = time.perf_counter()
                    first = first or last
                elif isinstance(chunk, Finished):
                    chunk = _with_timing(chunk, started, first, last)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:  # a reader that stops early ends the engine's stream now
                close()

    return measured()


def _with_timing(done: Finished, started: float, first: float | None,
                 last: float | None) -> Finished:
    first_ms = round((first - started) * 1000, 1) if first is not None else None
    prompt_ms = done.meta.get("prompt_ms", first_ms)
    tps = None
    decode_ms = done.meta.get("decode_ms")  # the engine's own figure, where it has one
    if decode_ms and done.completion_tokens > 1:
        tps = round((done.completion_tokens - 1) / (decode_ms / 1000), 2)
    elif first is not None and last is not None and last > first and done.completion_tokens > 1:
        tps = round((done.completion_tokens - 1) / (last - first), 2)
    queued_ms = None
    if first_ms is not None and prompt_ms is not None:
        queued_ms = round(max(0.0, first_ms - prompt_ms), 1)
    meta = done.meta if prompt_ms is None else {**done.meta, "prompt_ms": prompt_ms}
    return replace(done, meta=meta, timing=Timing(queued_ms, prompt_ms, first_ms, tps))


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


def takes_images(facts: dict[str, Any] | None) -> bool:
    """Whether a model is shown images: its facts say ``vision`` (an upstream marked
    ``vision = true`` in the upstreams file, or an embedded GGUF with an image projector
    beside it, which the embedded engine runs: vision.py)."""
    return bool(facts) and facts.get("vision") is True


def images_reason(facts: dict[str, Any] | None, engine: str) -> str:
    """Why a model is not shown images, as the page says it (empty when it is)."""
    if takes_images(facts) and engine == "server":
        return ""
    if engine == "browser":
        return "the page's engine does not take images"
    if facts and facts.get("projector_problem"):
        return f"its image projector cannot be run: {facts['projector_problem']}"
    return "it does not take images"


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
