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

OPTION_NAMES = ("system", "temperature", "top_p", "max_tokens", "seed")
# Options a client may also send (the socket, the worker, /v1), kept out of to_dict() unless set.
EXTRA_OPTION_NAMES = ("stop", "presence_penalty", "frequency_penalty", "response_format")
TOOL_OPTION_NAMES = ("tools", "tool_choice")  # OpenAI request bodies only
SEED_LIMIT = 2**32  # llama.cpp samplers take a uint32 seed


@dataclass(frozen=True)
class GenerationOptions:
    """How to write one reply: the one options model of the socket, the worker and the API.

    ``response_format``, ``tools`` and ``tool_choice`` are kept as OpenAI spells them (an
    upstream gets them as given); ``grammar`` is the GBNF the embedded engines enforce for
    them, built (and so checked) when the options are parsed."""

    system: str | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = field(default=None, compare=False)
    tool_choice: Any = None
    grammar: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(
        cls, raw: Any, *, default_max_tokens: int = 512, max_tokens_limit: int = 4096,
        max_system_chars: int = 32_000, allow_tools: bool = False,
    ) -> GenerationOptions:
        """Validated options from a client's dict; ``Invalid("bad_options")`` on any bad value.
        ``allow_tools``: also ``tools``/``tool_choice`` (OpenAI request bodies)."""
        from ..errors import Invalid
        from .structured import SchemaError, build_grammar, check_response_format, check_stop, check_tools

        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise Invalid("bad_options", "options must be an object")
        known = OPTION_NAMES + EXTRA_OPTION_NAMES + (TOOL_OPTION_NAMES if allow_tools else ())
        unknown = set(raw) - set(known)
        if unknown:
            raise Invalid("bad_options", f"unknown options: {', '.join(sorted(map(str, unknown)))}")

        def number(name: str, low: float, high: float, default: float, *, integer: bool = False):
            value = raw.get(name)
            if value is None:
                return default
            ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
            # "low <= value <= high" is False for NaN, so NaN is refused here too.
            if isinstance(value, bool) or not ok_type or not (low <= value <= high):
                kind = "an integer" if integer else "a number"
                raise Invalid("bad_options", f"{name} must be {kind} from {low} to {high}")
            return value

        system = raw.get("system")
        if system is not None and (not isinstance(system, str) or len(system) > max_system_chars):
            raise Invalid("bad_options", "system must be a string within the message limit")
        seed = raw.get("seed")
        if seed is not None:
            seed = number("seed", 0, SEED_LIMIT - 1, 0, integer=True)
        try:
            stop = check_stop(raw.get("stop"))
            response_format = check_response_format(raw.get("response_format"))
            tools, tool_choice = check_tools(raw.get("tools"), raw.get("tool_choice"))
            grammar = build_grammar(response_format, tools, tool_choice)
        except SchemaError as exc:
            raise Invalid("bad_options", str(exc)) from None
        return cls(
            system=system or None,
            temperature=float(number("temperature", 0.0, 2.0, 0.7)),
            top_p=float(number("top_p", 0.0, 1.0, 0.95)),
            max_tokens=int(number("max_tokens", 1, max_tokens_limit, default_max_tokens, integer=True)),
            seed=seed,
            stop=stop,
            presence_penalty=float(number("presence_penalty", -2.0, 2.0, 0.0)),
            frequency_penalty=float(number("frequency_penalty", -2.0, 2.0, 0.0)),
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
            grammar=grammar,
        )

    def to_dict(self) -> dict[str, Any]:
        """What a reply's provenance records (compact: a schema's name, the tools' names)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in OPTION_NAMES}
        if self.stop:
            data["stop"] = list(self.stop)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.response_format:
            data["response_format"] = {"type": self.response_format["type"]}
            name = (self.response_format.get("json_schema") or {}).get("name")
            if isinstance(name, str):
                data["response_format"]["name"] = name[:100]
        if self.tools:
            data["tools"] = [t["function"]["name"] for t in self.tools]
            data["tool_choice"] = self.tool_choice
        return data


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
class Timing:
    """How long a reply took, in milliseconds from the request, and how fast it was written."""

    queued_ms: float | None = None  # before the engine began on the prompt (a slot, the fit)
    prompt_ms: float | None = None  # reading the prompt: the engine's own figure where it has one
    first_token_ms: float | None = None
    tokens_per_second: float | None = None  # decoding, from the first token to the last


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
    if first is not None and last is not None and last > first and done.completion_tokens > 1:
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
