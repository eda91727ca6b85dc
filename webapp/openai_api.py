"""``/v1``: an OpenAI-compatible API on the main app, for programs holding an API key.

A thin adapter over the run service (runs/), as the websocket is: a call is a run (``n``
runs for ``n`` choices) that the request watches through one queue. Whatever the page can
chat with (the embedded models, a shared ``bchat worker``, upstreams) is offered here under
the same ids. A call made with a key acts as the key's owner; unless the body says
``"store": false`` it becomes a conversation of that owner (``source: "api"``), and a client
that hangs up stops its reply. The dialect itself (parser, shaper, SSE) is openai_dialect.py,
shared with ``bchat worker``; errors are answered in OpenAI's shape by errors.py.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from .accounts import get_accounts
from .api import request_json
from .errors import AppError
from .openai_dialect import (
    CompletionShaper,
    find_model,
    hung_up,
    model_list,
    parse_chat_request,
    sse,
    sse_error,
)
from .services import get_services
from .validation import INT64

log = logging.getLogger(__name__)

bp = Blueprint("openai_api", __name__)

HEARTBEAT_SECONDS = 0.5


@bp.before_request
def _authenticate():
    """Keys are the only gate here: a page's cookie is neither needed nor enough."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    key = None
    if scheme.lower() == "bearer":
        key = get_services().keys.authenticate(token.strip())
        if key is not None and not get_accounts().key_allowed(key["owner"]):
            key = None  # its account is disabled, or (accounts required) no account's key
    if key is None:
        message = ("no API key: send Authorization: Bearer <key> (make one in Settings → API "
                   "keys, or with `bchat keys create`)" if not header else
                   "this API key is unknown or revoked")
        response = AppError("invalid_api_key", message).response("openai")
        response.headers["WWW-Authenticate"] = 'Bearer realm="bchat"'
        return response
    g.api_key = key
    return None


@bp.get("/v1/models")
def list_models():
    return model_list(get_services().engines.models())


@bp.get("/v1/models/<path:model_id>")
def retrieve_model(model_id: str):
    return find_model(get_services().engines.models(), model_id)


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


def _failed(frame: dict[str, Any]) -> AppError:
    """A run's error frame (an engine's failure, mapped once in errors.py)."""
    return AppError(frame.get("code", "model_failed"), frame.get("message", "the model failed"))


@bp.post("/v1/chat/completions")
def chat_completions():
    services = get_services()
    config = current_app.config
    call = parse_chat_request(request_json(INT64), config)
    owner = g.api_key["owner"]
    watcher = QueueWatcher()
    runs = services.runs.start_api(owner, call.messages, model=call.model, options=call.options,
                                   store=call.store, ip=request.remote_addr, watcher=watcher,
                                   n=call.n)
    def ids(run) -> dict[str, Any]:
        return {"bchat": {"conversation_id": run.conversation_id or None,
                          "message_id": run.message_id, "stored": call.store}}

    first_shaper = CompletionShaper(runs[0].model, call.options, extra=ids(runs[0]))
    # Choice i is run i; the frames of all n come through the one watcher. Each choice's
    # chunks name its own reply.
    shapers = {run.message_id: first_shaper.sibling(i, ids(run)) if i else first_shaper
               for i, run in enumerate(runs)}
    usages: dict[str, dict[str, Any]] = {}  # each choice's, once done

    def end() -> None:
        watcher.close()
        services.runs.detach(watcher, list(shapers))
        for run in runs:
            # The client hung up, or another choice failed: an API client cannot come back
            # for the rest.
            if run.message_id not in usages:
                run.stop("disconnect")

    def shaper_of(frame: dict[str, Any]) -> CompletionShaper:
        return shapers.get(frame.get("message_id"), first_shaper)

    if not call.stream:
        choices: dict[str, dict[str, Any]] = {}
        logprobs: dict[str, list[dict[str, Any]]] = {m: [] for m in shapers}
        try:
            # Each token, or each heartbeat while there is none, looks for a hang-up (a
            # syscall: cheap beside a token).
            while not hung_up(request.environ):
                frame = watcher.next(HEARTBEAT_SECONDS)
                if frame is None:
                    continue
                if frame["type"] == "token":
                    logprobs[frame["message_id"]] += frame.get("logprobs") or ()
                elif frame["type"] == "error":
                    raise _failed(frame)
                elif frame["type"] == "done":
                    reply, key = frame["message"], frame["message_id"]
                    usages[key] = reply["usage"]
                    choices[key] = shapers[key].choice(reply["content"], reply["finish_reason"],
                                                 reply.get("meta") or {}, logprobs[key])
                    if len(choices) == len(runs):
                        return first_shaper.completion([choices[m] for m in shapers],
                                                       list(usages.values()))
            return Response(status=499)  # nginx's "client closed request": nobody reads it
        finally:
            end()

    # The first frame decides between an error status and a stream: a schema llama.cpp cannot
    # compile, or a prompt too long, is then a 400 like any other bad request.
    first = watcher.next()
    if first["type"] == "error":
        end()
        raise _failed(first)

    def events() -> Iterator[bytes]:
        frame: dict[str, Any] | None = first
        try:
            for shaper in shapers.values():
                yield sse(shaper.first())
            while True:
                if frame is None:
                    yield b": keepalive\n\n"  # a write that fails once the client has gone
                elif frame["type"] == "token":
                    for chunk in shaper_of(frame).feed(frame["text"], frame.get("logprobs")):
                        yield sse(chunk)
                elif frame["type"] == "queued":
                    yield f": queued {frame['position']}\n\n".encode()
                elif frame["type"] == "error":
                    yield sse_error(_failed(frame))
                    return
                elif frame["type"] == "done":
                    reply = frame["message"]
                    usages[frame["message_id"]] = reply["usage"]
                    for chunk in shaper_of(frame).finish(reply["finish_reason"], reply["usage"],
                                                         reply.get("meta") or {}):
                        yield sse(chunk)
                    if len(usages) == len(runs):
                        if call.include_usage:
                            yield sse(first_shaper.usage_chunk(list(usages.values())))
                        yield b"data: [DONE]\n\n"
                        return
                frame = watcher.next(HEARTBEAT_SECONDS)
        finally:
            end()

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
