"""``/v1``: an OpenAI-compatible API on the main app, for programs holding an API key.

A thin adapter over the run service (runs.py), as the websocket is: a call is a run that the
request watches through a queue. Whatever the page can chat with (the embedded models, a
shared ``bchat worker``, upstreams) is offered here under the same ids. A call made with a key
acts as the key's owner; unless the body says ``"store": false`` it becomes a conversation of
that owner (``source: "api"``), and a client that hangs up stops its reply.

The request parser and the reply shaper here are also used by ``bchat worker``, which is an
OpenAI-compatible server over the same engines, so both speak the same dialect: structured
outputs (``response_format``), tool calls, ``stop``, penalties, ``seed``, content parts, and
``<think>`` text returned as ``reasoning_content``. Errors have OpenAI's shape,
``{"error": {"message", "type", "code"}}``, with a matching HTTP status.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .engines.base import SEED_LIMIT, GenerationOptions
from .engines.structured import ReplySplitter, message_text, split_reply
from .errors import AppError, Invalid
from .services import get_services
from .validation import check_text, parse_json_text

log = logging.getLogger(__name__)

bp = Blueprint("openai_api", __name__)

HEARTBEAT_SECONDS = 0.5
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
OPTION_FIELDS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                 "response_format", "tools", "tool_choice")
# Engine failure codes that are the request's fault, and what OpenAI calls them.
REQUEST_FAULTS = {"bad_grammar": "invalid_request_error", "grammar_too_slow": "grammar_too_slow",
                  "context_too_long": "context_length_exceeded"}


# -- errors ------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(status: int, message: str, code: str | None = None, *, kind: str | None = None):
    kind = kind or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    response = jsonify({"error": {"message": message, "type": kind, "code": code or kind}})
    response.status_code = status
    return response


def engine_failure(code: str) -> int:
    """The HTTP status for a reply that failed with engine error ``code``."""
    if code in REQUEST_FAULTS or code == "upstream_rejected":
        return 400
    if code == "unknown_model":
        return 404
    if code == "upstream_rate_limited":
        return 429
    if code.startswith("upstream_"):
        return 502
    return 500


@bp.errorhandler(AppError)
def _app_error(exc: AppError):
    response = openai_error(exc.status, exc.message, exc.code)
    if "retry_after" in exc.extra:
        response.headers["Retry-After"] = str(exc.extra["retry_after"])
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return openai_error(exc.code or 500, exc.description or exc.name,
                        exc.name.lower().replace(" ", "_"))


@bp.before_request
def _authenticate():
    """Keys are the only gate here: a page's cookie is neither needed nor enough."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    key = None
    if scheme.lower() == "bearer":
        key = get_services().keys.authenticate(token.strip())
    if key is None:
        message = ("no API key: send Authorization: Bearer <key> (make one in Settings → API "
                   "keys, or with `bchat keys create`)" if not header else
                   "this API key is unknown or revoked")
        response = openai_error(401, message, "invalid_api_key", kind="invalid_request_error")
        response.headers["WWW-Authenticate"] = 'Bearer realm="bchat"'
        return response
    g.api_key = key
    return None


# -- the request -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    options: GenerationOptions
    stream: bool
    include_usage: bool
    store: bool


def _clean_message(m: Any, index: int, max_chars: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES:
        raise Invalid("bad_message", f"{where} needs a role of {', '.join(MESSAGE_ROLES)}")
    role, content = m["role"], m.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(
                    part.get("text"), str):
                raise Invalid("bad_message", f"{where}: only text content parts are supported")
    elif content is not None and not isinstance(content, str):
        raise Invalid("bad_message", f"{where}.content must be a string, a list of text parts "
                      "or null")
    text = check_text(message_text(content), f"{where}.content")
    if len(text) > max_chars:
        raise Invalid("content_too_long", f"{where} is {len(text)} characters; the limit is "
                      f"{max_chars}")
    clean: dict[str, Any] = {"role": role, "content": text}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise Invalid("bad_message", f"{where}: tool_calls belong to assistant messages")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not \
                    isinstance(function.get("arguments", ""), str):
                raise Invalid("bad_message", f"{where}: each tool call needs function.name and "
                              "function.arguments (a JSON string)")
        clean["tool_calls"] = [
            {"id": str(c.get("id") or "call_" + secrets.token_hex(12)), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": c["function"].get("arguments", "")}} for c in calls]
    if role == "tool":
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise Invalid("bad_message", f"{where}.tool_call_id must be a string")
        clean["tool_call_id"] = call_id or ""
    elif not text and not clean.get("tool_calls") and role == "user":
        raise Invalid("empty_content", f"{where} is empty")
    if isinstance(m.get("name"), str):
        clean["name"] = m["name"][:64]
    return clean


def parse_chat_request(body: Any, *, default_max_tokens: int = 512, max_tokens_limit: int = 4096,
                       max_message_chars: int = 32_000) -> ChatRequest:
    """An OpenAI chat-completions body, checked: ``Invalid`` (400) on any bad value; fields
    this server does not use are ignored, as OpenAI-compatible servers do."""
    if not isinstance(body, dict):
        raise Invalid("bad_json", "the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Invalid("bad_model", "model must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("bad_messages", "messages must be a non-empty list")
    clean = [_clean_message(m, i, max_message_chars) for i, m in enumerate(messages)]
    for name in ("stream", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise Invalid(f"bad_{name}", f"{name} must be true or false")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise Invalid("bad_stream_options", "stream_options must be an object")
    n = body.get("n")
    if n is not None and n != 1:
        raise Invalid("bad_n", "n must be 1: this server writes one choice per request")
    raw = {name: body[name] for name in OPTION_FIELDS if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        raw["max_tokens"] = max_tokens
    seed = raw.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        raw["seed"] = seed % SEED_LIMIT  # OpenAI's seeds are wider than llama.cpp's uint32
    try:
        options = GenerationOptions.parse(raw, default_max_tokens=default_max_tokens,
                                          max_tokens_limit=max_tokens_limit, allow_tools=True)
    except Invalid as exc:
        raise Invalid("invalid_value", exc.message) from None
    return ChatRequest(model=model, messages=clean, options=options,
                       stream=bool(body.get("stream")),
                       include_usage=bool((stream_options or {}).get("include_usage")),
                       store=body.get("store") is not False)


# -- the reply ---------------------------------------------------------------------------------


def _finish_reason(engine_reason: str | None, tool_calls: Any) -> str:
    if tool_calls:
        return "tool_calls"
    return engine_reason if engine_reason in ("length", "tool_calls", "content_filter") else "stop"


class CompletionShaper:
    """Turns a reply's text (as it streams, or finished) into OpenAI completion objects:
    ``<think>`` text as ``reasoning_content``, ``<tool_call>`` blocks as ``tool_calls``."""

    def __init__(self, model: str, options: GenerationOptions, *, include_usage: bool = False,
                 extra: dict[str, Any] | None = None) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.extra = extra or {}
        self.tools = bool(options.tools) and options.tool_choice != "none"
        self.splitter = ReplySplitter(tools=self.tools)

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": "bchat", **self.extra}

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
              **fields: Any) -> dict[str, Any]:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        return {**self._base("chat.completion.chunk"), "choices": choices, **fields}

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def _pieces(self, pieces: list[tuple[str, str]]) -> list[dict[str, Any]]:
        key = {"content": "content", "reasoning": "reasoning_content"}
        return [self.chunk({key[kind]: text}) for kind, text in pieces if text]

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._pieces(self.splitter.feed(text))

    def finish(self, engine_reason: str | None, usage: dict[str, Any], meta: dict[str, Any],
               timings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        pieces, calls = self.splitter.finish()
        out = self._pieces(pieces)
        if meta.get("reasoning_content"):  # an upstream's own reasoning field
            out.append(self.chunk({"reasoning_content": meta["reasoning_content"]}))
        calls = calls or meta.get("tool_calls")
        if calls:
            out.append(self.chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
        last = self.chunk({}, _finish_reason(engine_reason, calls))
        if timings:
            last["timings"] = timings
        out.append(last)
        if self.include_usage:
            out.append(self.chunk(None, usage=_usage(usage)))
        return out

    def complete(self, text: str, engine_reason: str | None, usage: dict[str, Any],
                 meta: dict[str, Any]) -> dict[str, Any]:
        content, reasoning, calls = split_reply(text, self.tools)
        reasoning = reasoning or meta.get("reasoning_content")
        calls = calls or meta.get("tool_calls")
        message: dict[str, Any] = {"role": "assistant",
                                   "content": content if content or not calls else None,
                                   "refusal": None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": _finish_reason(engine_reason, calls)}],
                "usage": _usage(usage)}


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# -- the views ---------------------------------------------------------------------------------


@bp.get("/v1/models")
def list_models():
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": created, "owned_by": m.engine, "bchat": m.facts}
        for m in get_services().engines.models()]}


class QueueWatcher:
    """Receives a run's frames for one HTTP request."""

    def __init__(self) -> None:
        self.frames: queue.Queue[dict[str, Any]] = queue.Queue()
        self._active = True

    def deliver(self, frame: dict[str, Any]) -> None:
        self.frames.put(frame)

    @property
    def active(self) -> bool:
        return self._active

    def close(self) -> None:
        self._active = False

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            return None


def _json_body() -> Any:
    limit = current_app.config["MAX_UPLOAD_BYTES"]
    data = request.get_data(cache=True)
    if request.content_length is None and len(data) >= limit:
        raise AppError("too_large", f"the body is over {limit} bytes", status=413)
    return parse_json_text(data, max_bytes=limit)


def _failed(frame: dict[str, Any]) -> AppError:
    code = frame.get("code", "model_failed")
    return AppError(REQUEST_FAULTS.get(code, code), frame.get("message", "the model failed"),
                    status=engine_failure(code))


@bp.post("/v1/chat/completions")
def chat_completions():
    services = get_services()
    config = current_app.config
    call = parse_chat_request(_json_body(), default_max_tokens=config["MAX_TOKENS"],
                              max_tokens_limit=config["MAX_TOKENS_LIMIT"],
                              max_message_chars=config["MAX_MESSAGE_CHARS"])
    owner = g.api_key["owner"]
    watcher = QueueWatcher()
    run = services.runs.start_api(owner, call.messages, model=call.model, options=call.options,
                                  store=call.store, ip=request.remote_addr, watcher=watcher)
    extra = {"bchat": {"conversation_id": run.conversation_id or None,
                       "message_id": run.message_id, "stored": call.store}}
    shaper = CompletionShaper(run.model, call.options, include_usage=call.include_usage,
                              extra=extra)

    def end(finished: bool) -> None:
        watcher.close()
        services.runs.detach(watcher, [run.message_id])
        if not finished:  # the client hung up: an API client cannot come back for the rest
            services.runs.stop(owner, run.message_id, "disconnect")

    if not call.stream:
        text: list[str] = []
        try:
            while True:
                frame = watcher.next()
                if frame["type"] == "token":
                    text.append(frame["text"])
                elif frame["type"] == "error":
                    raise _failed(frame)
                elif frame["type"] == "done":
                    reply = frame["message"]
                    return shaper.complete(reply["content"], reply["finish_reason"],
                                           reply["usage"], reply.get("meta") or {})
        finally:
            end(True)

    # The first frame decides between an error status and a stream: a schema llama.cpp cannot
    # compile, or a prompt too long, is then a 400 like any other bad request.
    first = watcher.next()
    if first["type"] == "error":
        end(True)
        raise _failed(first)

    def events() -> Iterator[bytes]:
        finished = False
        frame: dict[str, Any] | None = first
        try:
            yield sse(shaper.first())
            while True:
                if frame is None:
                    yield b": keepalive\n\n"  # a write that fails once the client has gone
                elif frame["type"] == "token":
                    for chunk in shaper.feed(frame["text"]):
                        yield sse(chunk)
                elif frame["type"] == "queued":
                    yield f": queued {frame['position']}\n\n".encode()
                elif frame["type"] == "error":
                    finished = True
                    failure = _failed(frame)
                    yield sse({"error": {"message": failure.message, "code": failure.code,
                                         "type": ERROR_TYPES.get(failure.status, "server_error")}})
                    return
                elif frame["type"] == "done":
                    finished = True
                    reply = frame["message"]
                    for chunk in shaper.finish(reply["finish_reason"], reply["usage"],
                                               reply.get("meta") or {}):
                        yield sse(chunk)
                    yield b"data: [DONE]\n\n"
                    return
                frame = watcher.next(HEARTBEAT_SECONDS)
        finally:
            end(finished)

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
