"""OpenAI's chat-completions dialect, spoken by ``/v1`` (openai_api.py) and by ``bchat worker``
(worker.py): the request parser, the completion shaper, the model list and SSE framing.

Structured outputs (``response_format``), tool calls, ``stop``, penalties, ``seed``, content
parts, and ``<think>`` text returned as ``reasoning_content``. Errors are rendered by
errors.py in OpenAI's shape.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .engines.base import ModelInfo
from .engines.structured import ReplySplitter, message_text, split_reply
from .errors import AppError, Invalid
from .options import CONFIG_DEFAULTS, GenerationOptions, names
from .validation import INT64, check_text, parse_json_text

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
# The body's fields besides the generation options (options.py, where "v1"), as published in
# the OpenAPI document; ``seed`` is wider than llama.cpp's and reduced below.
REQUEST_FIELDS: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "example": "tiny-chat"},
    "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role"],
        "properties": {"role": {"type": "string", "enum": list(MESSAGE_ROLES)},
                       "content": {"nullable": True}, "name": {"type": "string"},
                       "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"}}},
        "example": [{"role": "user", "content": "hi"}]},
    "stream": {"type": "boolean", "example": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                       "example": {"include_usage": True}},
    "store": {"type": "boolean", "description": "false: no conversation is stored", "example": False},
    "n": {"type": "integer", "minimum": 1, "example": 2,
          "description": "choices, up to BCHAT_MAX_N (default 4); each a run of its own"},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "example": 8,
                              "description": "OpenAI's newer name for max_tokens; wins over it"},
    "seed": {"type": "integer", "format": "int64", "example": 2**40,
             "description": "any int64, as OpenAI's; the embedded engines take it modulo "
                            "2**32 - 1 (llama.cpp's seeds are 32-bit, 0xFFFFFFFF meaning "
                            "random), upstreams get it as given"},
}


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    options: GenerationOptions
    stream: bool
    include_usage: bool
    store: bool
    n: int = 1


def _clean_message(m: Any, index: int, max_chars: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES:
        raise Invalid("bad_message", f"{where} needs a role of {', '.join(MESSAGE_ROLES)}",
                      param=f"{where}.role")
    role, content = m["role"], m.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(
                    part.get("text"), str):
                raise Invalid("bad_message", f"{where}: only text content parts are supported",
                              param=f"{where}.content")
    elif content is not None and not isinstance(content, str):
        raise Invalid("bad_message", f"{where}.content must be a string, a list of text parts "
                      "or null", param=f"{where}.content")
    text = check_text(message_text(content), f"{where}.content")
    if len(text) > max_chars:
        raise Invalid("content_too_long", f"{where} is {len(text)} characters; the limit is "
                      f"{max_chars}", param=f"{where}.content")
    clean: dict[str, Any] = {"role": role, "content": text}
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise Invalid("bad_message", f"{where}: tool_calls belong to assistant messages",
                          param=f"{where}.tool_calls")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not \
                    isinstance(function.get("arguments", "{}"), str):
                raise Invalid("bad_message", f"{where}: each tool call needs function.name and "
                              "function.arguments (a JSON string)", param=f"{where}.tool_calls")
            try:  # as llama-server and OpenAI: the model would be shown a call it cannot parse
                parse_json_text(function.get("arguments", "{}"))
            except Invalid as exc:
                raise Invalid("bad_message", f"{where}.tool_calls[{j}].function.arguments is "
                              f"not valid JSON ({exc.message})",
                              param=f"{where}.tool_calls[{j}].function.arguments") from None
        clean["tool_calls"] = [
            {"id": str(c.get("id") or "call_" + secrets.token_hex(12)), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": c["function"].get("arguments", "{}")}} for c in calls]
    if role == "tool":
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise Invalid("bad_message", f"{where}.tool_call_id must be a string",
                          param=f"{where}.tool_call_id")
        clean["tool_call_id"] = call_id or ""
    elif not text and not clean.get("tool_calls") and role == "user":
        raise Invalid("empty_content", f"{where} is empty", param=f"{where}.content")
    if isinstance(m.get("name"), str):
        clean["name"] = m["name"][:64]
    return clean


def parse_chat_request(body: Any, config: Mapping[str, Any] = CONFIG_DEFAULTS) -> ChatRequest:
    """An OpenAI chat-completions body, checked: ``Invalid`` (400) on any bad value, with the
    ``param`` at fault; fields this server does not use are ignored, as OpenAI-compatible
    servers do. ``config``: the limits (MAX_TOKENS, MAX_TOKENS_LIMIT, MAX_MESSAGE_CHARS, MAX_N)."""
    if not isinstance(body, dict):
        raise Invalid("bad_json", "the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Invalid("bad_model", "model must be a string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("bad_messages", "messages must be a non-empty list", param="messages")
    clean = [_clean_message(m, i, config["MAX_MESSAGE_CHARS"]) for i, m in enumerate(messages)]
    for name in ("stream", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise Invalid(f"bad_{name}", f"{name} must be true or false", param=name)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise Invalid("bad_stream_options", "stream_options must be an object",
                      param="stream_options")
    n = 1 if body.get("n") is None else body["n"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= config["MAX_N"]:
        raise Invalid("bad_n", f"n must be an integer from 1 to {config['MAX_N']} (BCHAT_MAX_N)",
                      param="n")
    raw = {name: body[name] for name in names("v1") if body.get(name) is not None}
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name wins
        raw["max_tokens"] = body["max_completion_tokens"]
    # OpenAI's seeds are any int64, wider than the socket's (llama.cpp's uint32): checked
    # here, kept as given (an upstream gets it so), reduced where llama.cpp takes it.
    seed = raw.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or
                             not INT64[0] <= seed <= INT64[1]):
        raise Invalid("bad_options", f"seed must be an integer from {INT64[0]} to {INT64[1]}",
                      param="seed")
    options = replace(GenerationOptions.parse(raw, config, allow_tools=True), seed=seed)
    return ChatRequest(model=model, messages=clean, options=options,
                       stream=bool(body.get("stream")),
                       include_usage=bool((stream_options or {}).get("include_usage")),
                       store=body.get("store") is not False, n=n)


# -- the reply ---------------------------------------------------------------------------------


def _finish_reason(engine_reason: str | None, tool_calls: Any) -> str:
    if tool_calls:
        return "tool_calls"
    return engine_reason if engine_reason in ("length", "tool_calls", "content_filter") else "stop"


class CompletionShaper:
    """Turns a reply's text (as it streams, or finished) into OpenAI completion objects:
    ``<think>`` text as ``reasoning_content``, ``<tool_call>`` blocks as ``tool_calls``.
    ``index``: the choice it shapes; the shapers of one call's other choices are ``sibling``s,
    sharing its id."""

    def __init__(self, model: str, options: GenerationOptions, *, include_usage: bool = False,
                 extra: dict[str, Any] | None = None, index: int = 0) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.index = index
        self.options = options
        self.model = model
        self.include_usage = include_usage
        self.extra = extra or {}
        self.tools = bool(options.tools) and options.tool_choice != "none"
        self.splitter = ReplySplitter(tools=self.tools)
        self.logprobs = options.logprobs
        self._logprobs: list[dict[str, Any]] = []  # entries fed, not yet in a chunk

    def sibling(self, index: int, extra: dict[str, Any] | None = None) -> CompletionShaper:
        """The shaper of choice ``index`` of the same completion (its usage comes once, from
        whoever sums it); ``extra``: its chunks' own fields (its reply's ids), else these."""
        other = CompletionShaper(self.model, self.options, extra=extra or self.extra, index=index)
        other.id, other.created = self.id, self.created
        return other

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": "bchat", **self.extra}

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
              **fields: Any) -> dict[str, Any]:
        choices = [] if delta is None else [{"index": self.index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        if choices and self._logprobs:  # with the first chunk after their text was fed
            choices[0]["logprobs"] = {"content": self._logprobs, "refusal": None}
            self._logprobs = []
        return {**self._base("chat.completion.chunk"), "choices": choices, **fields}

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def _pieces(self, pieces: list[tuple[str, str]]) -> list[dict[str, Any]]:
        key = {"content": "content", "reasoning": "reasoning_content"}
        return [self.chunk({key[kind]: text}) for kind, text in pieces if text]

    def feed(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Chunks of ``text``; ``logprobs``: its tokens' entries (Token.logprobs)."""
        if self.logprobs and logprobs:
            self._logprobs.extend(logprobs)
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
            out.append(self.usage_chunk([usage]))
        return out

    def usage_chunk(self, usages: list[dict[str, Any]]) -> dict[str, Any]:
        return self.chunk(None, usage=_usage(usages))

    def complete(self, text: str, engine_reason: str | None, usage: dict[str, Any],
                 meta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
        return self.completion([self.choice(text, engine_reason, meta, logprobs)], [usage])

    def completion(self, choices: list[dict[str, Any]], usages: list[dict[str, Any]]
                   ) -> dict[str, Any]:
        """The whole reply: its ``choice``s, the usage of each summed."""
        return {**self._base("chat.completion"), "choices": choices, "usage": _usage(usages)}

    def choice(self, text: str, engine_reason: str | None, meta: dict[str, Any],
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
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
        return {"index": self.index, "message": message,
                "logprobs": {"content": logprobs or [], "refusal": None} if self.logprobs else None,
                "finish_reason": _finish_reason(engine_reason, calls)}


def _usage(usages: list[dict[str, Any]]) -> dict[str, int]:
    """The choices' usage summed; their prompt is one, counted once (as OpenAI does)."""
    prompt = max((int(u.get("prompt_tokens") or 0) for u in usages), default=0)
    completion = sum(int(u.get("completion_tokens") or 0) for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def hung_up(environ: Mapping[str, Any]) -> bool:
    """Whether the caller has closed its connection: its socket reads as the end of the
    stream. A streamed reply finds out by writing, but a whole reply cannot write before it
    has its status (an error found late must still be a 4xx or 5xx), so it looks without
    reading: a peek. The WSGI servers bchat runs on (werkzeug, gunicorn) hand over the socket;
    behind a proxy, the proxy closes its connection when its client does. Unknown (no socket,
    or TLS, which cannot peek): not gone."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True
    except (OSError, ValueError):
        return False


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def sse_error(error: AppError) -> bytes:
    """An error after the stream began (its status was already 200)."""
    return sse({"error": error.to_openai()})


def model_object(model: ModelInfo, owned_by: str | None = None) -> dict[str, Any]:
    """OpenAI's Model object; ``owned_by`` says where it runs: ``bchat`` for the embedded
    models, an upstream's name for its models (or the one given)."""
    return {"id": model.id, "object": "model", "created": int(time.time()),
            "owned_by": owned_by or ("bchat" if model.engine == "llamacpp" else model.engine),
            "bchat": model.facts}


def model_list(models: list[ModelInfo], owned_by: str | None = None) -> dict[str, Any]:
    """``GET /v1/models``."""
    return {"object": "list", "data": [model_object(m, owned_by) for m in models]}


def find_model(models: list[ModelInfo], model_id: str, owned_by: str | None = None
               ) -> dict[str, Any]:
    """``GET /v1/models/{id}``: its Model object, or 404 ``model_not_found``."""
    for model in models:
        if model.id == model_id:
            return model_object(model, owned_by)
    raise AppError("unknown_model", f"no model named {model_id!r} on this server", param="model")
