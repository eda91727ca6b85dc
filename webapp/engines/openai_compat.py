"""Any OpenAI-compatible upstream (llama-server, vLLM, OpenRouter, bchat's own worker).

Replies stream through the ``openai`` package. A stop (or a vanished client) closes the HTTP
response from a small closer thread, so the upstream sees the connection drop and stops
generating even while it is still evaluating the prompt. Every failure becomes an
``EngineError`` with a code the chat UI can explain; the API key is never logged or sent to
browsers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..options import GenerationOptions
from .base import (
    Chunk,
    ContextTooLong,
    EngineError,
    Finished,
    ModelInfo,
    Queued,
    Token,
    UnknownModel,
)

log = logging.getLogger(__name__)

MODELS_TTL_SECONDS = 60.0
# How llama-server, vLLM and OpenAI word "the prompt does not fit the context".
CONTEXT_MARKERS = ("exceed_context_size", "context size", "context length", "context_length",
                   "maximum context", "too many tokens", "context window")


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    api_key: str = field(default="none", repr=False)
    models: tuple[str, ...] = ()  # empty: every model the upstream lists at /v1/models
    connect_timeout: float = 5.0
    read_timeout: float = 120.0  # longest silence between two chunks
    # Which of its models take images (sent as image_url parts): True for all, or their ids.
    vision: bool | tuple[str, ...] = False

    def takes_images(self, model: str) -> bool:
        return self.vision is True or (isinstance(self.vision, tuple) and model in self.vision)


def load_upstreams(config: Mapping[str, Any]) -> list[UpstreamConfig]:
    """Upstream servers from BCHAT_OPENAI_* and BCHAT_UPSTREAMS_FILE, in that order."""
    import os
    import tomllib
    from pathlib import Path
    from urllib.parse import urlsplit

    upstreams: list[UpstreamConfig] = []
    if config.get("OPENAI_BASE_URL"):
        url = str(config["OPENAI_BASE_URL"])
        upstreams.append(UpstreamConfig(
            name=urlsplit(url).hostname or "openai",
            base_url=url,
            api_key=config.get("OPENAI_API_KEY") or "none",
            models=tuple(config.get("OPENAI_MODELS") or ()),
        ))
    path = config.get("UPSTREAMS_FILE")
    if path:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        entries = data.get("upstream", data.get("upstreams", []))
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of [[upstream]] tables")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not entry.get("base_url"):
                raise ValueError(f"{path}: upstream #{i + 1} needs a base_url")
            key = entry.get("api_key")
            if entry.get("api_key_env"):  # keeps the secret itself out of the file
                key = os.environ.get(entry["api_key_env"])
                if not key:
                    raise ValueError(f"{path}: ${entry['api_key_env']} is not set")
            vision = entry.get("vision", False)
            if not (isinstance(vision, bool) or (isinstance(vision, list) and all(
                    isinstance(m, str) for m in vision))):
                raise ValueError(f"{path}: upstream #{i + 1}: vision is true, false or a list "
                                 "of model ids")
            upstreams.append(UpstreamConfig(
                name=str(entry.get("name") or urlsplit(entry["base_url"]).hostname or f"upstream{i + 1}"),
                base_url=str(entry["base_url"]),
                api_key=key or "none",
                models=tuple(entry.get("models") or ()),
                connect_timeout=float(entry.get("connect_timeout", 5)),
                read_timeout=float(entry.get("read_timeout", 120)),
                vision=tuple(vision) if isinstance(vision, list) else vision,
            ))
    return upstreams


class OpenAICompatEngine:
    """One upstream server; ``name`` appears in each reply's provenance as its backend."""

    def __init__(self, config: UpstreamConfig) -> None:
        import openai

        self.config = config
        self.name = config.name
        self._client = openai.OpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "none",
            max_retries=0,  # a retry would re-run a generation the user is watching
            timeout=openai.Timeout(
                config.read_timeout, connect=config.connect_timeout, read=config.read_timeout
            ),
        )
        self._models: list[ModelInfo] = []
        self._models_at = 0.0
        self._lock = threading.Lock()

    # -- models ----------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        if self.config.models:
            return [ModelInfo(id=m, engine=self.name, facts=self._seen(m, {"upstream": self.name}))
                    for m in self.config.models]
        with self._lock:
            if time.monotonic() - self._models_at > MODELS_TTL_SECONDS:
                self._models_at = time.monotonic()
                try:
                    listed = self._client.models.list(timeout=self.config.connect_timeout + 5)
                    self._models = [
                        ModelInfo(id=m.id, engine=self.name, facts=self._facts(m))
                        for m in listed.data
                    ]
                except Exception as exc:  # an unreachable upstream offers no models for now
                    log.warning("upstream %s: cannot list models (%s)", self.name, _describe(exc))
                    self._models_at -= MODELS_TTL_SECONDS - 5  # ask again soon
            return list(self._models)

    def _facts(self, model) -> dict[str, Any]:
        facts: dict[str, Any] = {"upstream": self.name}
        extra = getattr(model, "model_extra", None) or {}
        if isinstance(extra.get("bchat"), dict):
            facts.update(extra["bchat"])  # bchat's worker passes on the GGUF facts
        return self._seen(model.id, facts)

    def _seen(self, model: str, facts: dict[str, Any]) -> dict[str, Any]:
        """``vision`` as the upstreams file says, whatever the upstream claims."""
        facts.pop("vision", None)
        if self.config.takes_images(model):
            facts["vision"] = True
        return facts

    # -- generation ------------------------------------------------------------------------
    def stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
    ) -> Iterator[Chunk]:
        import openai

        if options.system:
            messages = [{"role": "system", "content": options.system}] + [
                m for m in messages if m["role"] != "system"
            ]
        request: dict[str, Any] = dict(
            model=model,
            messages=messages,
            stream=True,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stream_options={"include_usage": True},
        )
        if options.seed is not None:
            request["seed"] = options.seed
        # Passed through as the client gave them: the upstream enforces its own formats.
        if options.stop:
            request["stop"] = list(options.stop)
        for name in ("presence_penalty", "frequency_penalty", "response_format", "tools",
                     "logit_bias", "logprobs", "top_logprobs"):
            if getattr(options, name):
                request[name] = getattr(options, name)
        if options.tools and options.tool_choice is not None:
            request["tool_choice"] = options.tool_choice
        # The raw event stream, parsed here with json.loads: building the package's typed
        # chunk object costs ~140 us a token, CPU taken from the model on a small machine.
        # The package still does the HTTP, auth and the status-code errors.
        manager = self._client.chat.completions.with_streaming_response.create(**request)
        try:
            response = manager.__enter__()
        except openai.APIError as exc:
            raise self._error(exc, model) from exc

        done = threading.Event()

        def close_on_cancel() -> None:
            cancel.wait()  # set by a stop, a hang-up, or our own finally below
            if not done.is_set():
                response.close()  # the upstream sees the connection go and stops

        closer = threading.Thread(target=close_on_cancel, name="bchat-upstream-stop", daemon=True)
        closer.start()
        pieces = 0
        finish_reason = None
        usage: dict[str, Any] | None = None
        extra_meta: dict[str, Any] = {}
        calls: dict[int, dict[str, Any]] = {}  # streamed tool calls, by index
        reasoning: list[str] = []
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # comments (keepalives), event names, blank separators
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise _StreamError(chunk["error"])
                if isinstance(chunk.get("bchat_queued"), int):
                    yield Queued(position=chunk["bchat_queued"])
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if isinstance(chunk.get("timings"), dict):
                    extra_meta["upstream_timings"] = chunk["timings"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    _merge_tool_calls(calls, delta.get("tool_calls"))
                    thought = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(thought, str):
                        reasoning.append(thought)
                    text = delta.get("content")
                    logprobs = (choice.get("logprobs") or {}).get("content")
                    if text or logprobs:
                        pieces += 1
                        yield Token(text or "", logprobs or None)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                if cancel.is_set():
                    break
        except Exception as exc:
            if not cancel.is_set():  # else: our own close() ended the read; that is a stop
                raise self._error(exc, model, mid_stream=pieces > 0) from exc
        finally:
            stopped = cancel.is_set()
            done.set()
            cancel.set()  # releases the closer thread; the caller's turn is over either way
            manager.__exit__(None, None, None)
        if stopped:
            finish_reason = "stopped"
        elif finish_reason is None:
            raise EngineError(
                f"{self.name} closed the reply before it was finished", code="upstream_disconnected"
            )
        completion = (usage or {}).get("completion_tokens") or pieces
        meta = {"upstream": self.name, **extra_meta}
        if calls:
            meta["tool_calls"] = [calls[i] for i in sorted(calls)]
        if reasoning:
            meta["reasoning_content"] = "".join(reasoning)
        yield Finished(
            finish_reason=finish_reason,
            prompt_tokens=(usage or {}).get("prompt_tokens") or 0,
            completion_tokens=completion,
            meta=meta,
        )

    def _error(self, exc: Exception, model: str, *, mid_stream: bool = False) -> EngineError:
        import openai

        name = self.name
        text = _describe(exc)
        body = getattr(exc, "body", None)
        haystack = (json.dumps(body) if body is not None else text).lower()
        too_long = any(marker in haystack for marker in CONTEXT_MARKERS)
        log.warning("upstream %s failed for %s: %s", name, model, text)
        if isinstance(exc, openai.APITimeoutError) or "timeout" in type(exc).__name__.lower():
            return EngineError(f"{name} did not answer in time ({self.config.read_timeout:g} s)",
                               code="upstream_timeout")
        if isinstance(exc, openai.APIConnectionError) or isinstance(exc, OSError):
            if mid_stream:
                return EngineError(f"{name} dropped the connection in the middle of the reply",
                                   code="upstream_disconnected")
            return EngineError(f"{name} cannot be reached at {self.config.base_url}",
                               code="upstream_unreachable")
        if isinstance(exc, openai.APIStatusError) and not (exc.status_code == 400 and too_long):
            status = exc.status_code
            if status in (401, 403):
                return EngineError(f"{name} refused bchat's credentials (HTTP {status}); check its "
                                   "API key in the server settings", code="upstream_auth")
            if status == 404:
                return UnknownModel(f"{name} does not serve the model {model!r}")
            if status == 429:
                return EngineError(f"{name} is rate-limiting requests (HTTP 429); try again shortly",
                                   code="upstream_rate_limited")
            refused = _refused_field(text) if status == 500 else None
            if refused:
                return EngineError(f"{name} does not take this request's {refused}",
                                   code="upstream_rejected")
            if status >= 500:
                return EngineError(f"{name} failed (HTTP {status}): {text}", code="upstream_error")
            return EngineError(f"{name} refused the request (HTTP {status}): {text}",
                               code="upstream_rejected")
        # An error event in the stream, a 400 saying the prompt is too long, any other API error.
        if isinstance(exc, _StreamError | openai.APIError):
            if too_long:
                return ContextTooLong(f"the conversation is too long for {model} on {name}: {text}")
            return EngineError(f"{name} reported an error while replying: {text}",
                               code="upstream_error")
        if mid_stream:
            return EngineError(f"{name} broke off the reply: {text}", code="upstream_disconnected")
        return EngineError(f"{name} failed: {text}", code="upstream_error")

    def close(self) -> None:
        self._client.close()


def _merge_tool_calls(calls: dict[int, dict[str, Any]], deltas: Any) -> None:
    """OpenAI streams a tool call in pieces: the id and name first, then the arguments."""
    if not isinstance(deltas, list):
        return
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index") if isinstance(delta.get("index"), int) else len(calls)
        call = calls.setdefault(index, {"id": "", "type": "function",
                                        "function": {"name": "", "arguments": ""}})
        if isinstance(delta.get("id"), str):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        name = function.get("name")
        if isinstance(name, str) and name and not call["function"]["name"]:
            call["function"]["name"] = name  # sent once, with the first piece
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]


# llama-cpp-python's server answers a body its request model refuses with a 500 whose message
# is pydantic's: "1 validation error:\n  {'type': …, 'loc': ('body', 'response_format', 'type'),
# 'msg': "Input should be 'text' or 'json_object'", …}". That is the request's fault, not the
# server's: a 400 naming the field and the upstream's reason, never a server error.
_VALIDATION = re.compile(r"^\d+ validation errors?:.*?'loc': \('body', ([^)]*)\).*?"
                         r"""'msg': (?:"([^"]*)"|'([^']*)')""", re.S)


def _refused_field(text: str) -> str | None:
    """``field.path: reason`` of such a refusal, or None."""
    found = _VALIDATION.search(text)
    if not found:
        return None
    where = ".".join(part.strip(" '\"") for part in found[1].split(",") if part.strip(" '\""))
    return f"{where}: {found[2] or found[3]}"


class _StreamError(Exception):
    """An error event inside the stream (the HTTP status was already 200)."""

    def __init__(self, body: Any) -> None:
        super().__init__(str(body))
        self.body = {"error": body}


def _describe(exc: Exception) -> str:
    """The upstream's own error message, without headers (which may hold the API key)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(error, str):
            return error[:300]
    return (str(exc) or type(exc).__name__)[:300]
