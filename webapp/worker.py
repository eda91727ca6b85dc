"""`bchat worker`: the embedded llama.cpp models in a process of their own, served over an
OpenAI-compatible HTTP API (``/v1/models``, streaming ``/v1/chat/completions``).

Any number of web processes (``gunicorn -w N``) point ``BCHAT_WORKER_URL`` at it, so each
model is loaded once on the machine, and requests from every web worker queue for its one
inference thread in arrival order. A client that disconnects stops its generation: the
stream writes a keepalive comment every half second while the model is busy elsewhere, and
a failed write ends the generator, which cancels the request.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from .config import load_config
from .engines.base import (
    ContextTooLong,
    EngineError,
    Finished,
    GenerationOptions,
    Idle,
    Queued,
    Token,
    UnknownModel,
)
from .engines.llamacpp import LlamaCppEngine
from .model_files import ModelCatalogue

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5
ENGINE_KEY = "bchat.worker.engine"

bp = Blueprint("worker", __name__)


def error_response(status: int, message: str, kind: str, code: str | None = None):
    body = {"error": {"message": message, "type": kind, "code": code or kind}}
    return jsonify(body), status


def engine_error_payload(exc: EngineError) -> tuple[int, str]:
    if isinstance(exc, ContextTooLong):
        return 400, "exceed_context_size_error"  # as llama-server names it
    if isinstance(exc, UnknownModel):
        return 404, "model_not_found"
    return 500, exc.code


@bp.before_request
def _check_key():
    key = current_app.config.get("WORKER_API_KEY")
    if key:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given, key):
            return error_response(401, "invalid API key", "authentication_error")
    return None


@bp.get("/health")
def health():
    engine: LlamaCppEngine = current_app.extensions[ENGINE_KEY]
    return {"status": "ok", "models": [m.id for m in engine.models()],
            "loaded": engine.loaded_models(), "activity": engine.activity()}


@bp.get("/v1/models")
def list_models():
    engine: LlamaCppEngine = current_app.extensions[ENGINE_KEY]
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": m.id, "object": "model", "created": created, "owned_by": "bchat",
             "bchat": m.facts}
            for m in engine.models()
        ],
    }


def parse_request(body: Any) -> tuple[str, list[dict[str, str]], GenerationOptions, bool, bool]:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str):
        raise ValueError("model is required")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError("each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ValueError("message content must be text")
        clean.append({"role": m["role"], "content": content})
    limit = current_app.config["MAX_TOKENS_LIMIT"]
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 512
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise ValueError(f"max_tokens must be from 1 to {limit}")
    temperature, top_p = body.get("temperature"), body.get("top_p")
    options = GenerationOptions(
        temperature=float(0.7 if temperature is None else temperature),
        top_p=float(0.95 if top_p is None else top_p),
        max_tokens=max_tokens,
        seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
    )
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return model, clean, options, bool(body.get("stream")), usage


def _chunk(base: dict, **fields) -> bytes:
    return f"data: {json.dumps({**base, **fields}, ensure_ascii=False)}\n\n".encode()


@bp.post("/v1/chat/completions")
def chat_completions():
    engine: LlamaCppEngine = current_app.extensions[ENGINE_KEY]
    try:
        model, messages, options, stream, include_usage = parse_request(request.get_json(silent=True))
    except ValueError as exc:
        return error_response(400, str(exc), "invalid_request_error")
    cancel = threading.Event()
    try:
        chunks = engine.stream(model, messages, options, cancel, heartbeat=HEARTBEAT_SECONDS)
    except UnknownModel as exc:
        return error_response(404, exc.message, "model_not_found")
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}
    if not stream:
        return _complete(chunks, cancel, base)

    def events() -> Iterator[bytes]:
        try:
            yield _chunk(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}])
            for item in chunks:
                if isinstance(item, Token):
                    yield _chunk(base, choices=[{"index": 0, "delta": {"content": item.text},
                                                 "finish_reason": None}])
                elif isinstance(item, Queued):
                    yield _chunk(base, choices=[], bchat_queued=item.position)
                elif isinstance(item, Idle):
                    yield b": keepalive\n\n"  # fails fast once the client has gone
                elif isinstance(item, Finished):
                    reason = "length" if item.finish_reason == "length" else "stop"
                    yield _chunk(base, choices=[{"index": 0, "delta": {}, "finish_reason": reason}],
                                 timings={"bchat": item.meta,
                                          "predicted_per_second": item.tokens_per_second})
                    if include_usage:
                        yield _chunk(base, choices=[], usage={
                            "prompt_tokens": item.prompt_tokens,
                            "completion_tokens": item.completion_tokens,
                            "total_tokens": item.prompt_tokens + item.completion_tokens})
            yield b"data: [DONE]\n\n"
        except EngineError as exc:
            status, kind = engine_error_payload(exc)
            yield _chunk({}, error={"message": exc.message, "type": kind, "code": status})
        finally:
            cancel.set()  # the client went away (GeneratorExit) or we are done: free the model

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _complete(chunks, cancel: threading.Event, base: dict):
    parts: list[str] = []
    try:
        for item in chunks:
            if isinstance(item, Token):
                parts.append(item.text)
            elif isinstance(item, Finished):
                reason = "length" if item.finish_reason == "length" else "stop"
                return {**base, "object": "chat.completion",
                        "choices": [{"index": 0, "finish_reason": reason,
                                     "message": {"role": "assistant", "content": "".join(parts)}}],
                        "usage": {"prompt_tokens": item.prompt_tokens,
                                  "completion_tokens": item.completion_tokens,
                                  "total_tokens": item.prompt_tokens + item.completion_tokens}}
    except EngineError as exc:
        status, kind = engine_error_payload(exc)
        return error_response(status, exc.message, kind)
    finally:
        cancel.set()
    return error_response(500, "the model ended without a result", "server_error")


def create_worker_app(config: dict[str, Any] | None = None) -> Flask:
    from . import ROOT

    app = Flask(__name__, instance_path=str(ROOT / "instance"))
    app.config.update(load_config(app.instance_path))
    app.config.update(config or {})
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LlamaCppEngine(
        ModelCatalogue(app.config["MODEL_PATH"]),
        n_ctx=app.config["N_CTX"],
        n_threads=app.config["N_THREADS"],
        n_gpu_layers=app.config["N_GPU_LAYERS"],
        preload=app.config.get("PRELOAD_MODELS", True),
        parallel=app.config["PARALLEL"],
        chat_template=app.config["CHAT_TEMPLATE"],
    )
    app.extensions[ENGINE_KEY] = engine
    app.register_blueprint(bp)
    return app


def run_worker(host: str, port: int, threads: int) -> None:
    """Serve the worker with gunicorn's gthread worker: one process (one copy of each model),
    one thread per open request."""
    from gunicorn.app.base import BaseApplication

    class WorkerServer(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", 1)  # never more: each process would load every model
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("proc_name", "bchat-worker")
            self.cfg.set("control_socket_disable", True)  # no clash with the web gunicorn's

        def load(self):
            # Built in the worker process, after the fork: inference threads do not survive one.
            return create_worker_app({"PRELOAD_MODELS": True})

    WorkerServer().run()
