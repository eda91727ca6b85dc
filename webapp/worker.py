"""`bchat worker`: the embedded llama.cpp models in a process of their own, served over an
OpenAI-compatible HTTP API (``/v1/models``, streaming ``/v1/chat/completions``). Requests are
read, replies shaped and errors rendered by the same code as the main app's ``/v1``
(openai_dialect.py, errors.py), so ``response_format``, ``tools``, ``stop`` and the rest are
enforced here too.

Any number of web processes (``gunicorn -w N``) point ``BCHAT_WORKER_URL`` at it, so each
model is loaded once on the machine, and requests from every web worker queue for its one
inference thread in arrival order. A client that disconnects stops its generation: the
stream writes a keepalive comment every half second while the model is busy elsewhere, and
a failed write ends the generator, which cancels the request.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from .catalogue import ModelCatalogue
from .config import load_config
from .engines.base import EngineError, Finished, Idle, Queued, Token, timed
from .engines.llamacpp import LlamaCppEngine
from .errors import AppError, Invalid
from .errors import register as register_errors
from .openai_dialect import (
    CompletionShaper,
    find_model,
    hung_up,
    model_list,
    parse_chat_request,
    sse,
    sse_error,
)
from .validation import INT64, parse_json_text

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5
ENGINE_KEY = "bchat.worker.engine"

bp = Blueprint("worker", __name__)


@bp.before_request
def _check_key():
    key = current_app.config.get("WORKER_API_KEY")
    if key:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given, key):
            raise AppError("invalid_api_key", "invalid API key")
    return None


@bp.get("/health")
def health():
    engine: LlamaCppEngine = current_app.extensions[ENGINE_KEY]
    return {"status": "ok", "models": [m.id for m in engine.models()],
            "loaded": engine.loaded_models(), "activity": engine.activity()}


@bp.get("/v1/models")
def list_models():
    return model_list(current_app.extensions[ENGINE_KEY].models(), owned_by="bchat")


@bp.get("/v1/models/<path:model_id>")
def retrieve_model(model_id: str):
    return find_model(current_app.extensions[ENGINE_KEY].models(), model_id, owned_by="bchat")


def _failure(exc: EngineError) -> AppError:
    return AppError(exc.code, exc.message)


@bp.post("/v1/chat/completions")
def chat_completions():
    engine: LlamaCppEngine = current_app.extensions[ENGINE_KEY]
    body = parse_json_text(request.get_data(cache=True),
                           max_bytes=current_app.config["MAX_UPLOAD_BYTES"], ints=INT64)
    call = parse_chat_request(body, current_app.config)
    if call.n != 1:  # bchat's /v1 runs each of n choices as a call of its own
        raise Invalid("bad_n", "a bchat worker writes one choice per call", param="n")
    model = call.model
    if model is None:
        models = engine.models()
        if not models:
            raise AppError("unknown_model", "this worker serves no models")
        model = models[0].id
    cancel = threading.Event()
    try:
        chunks = timed(engine.stream(model, call.messages, call.options, cancel,
                                     heartbeat=HEARTBEAT_SECONDS))
    except EngineError as exc:
        raise _failure(exc) from None
    shaper = CompletionShaper(model, call.options, include_usage=call.include_usage)
    if not call.stream:
        return _complete(chunks, cancel, shaper)

    # The first item decides between an error status and a stream (a grammar llama.cpp
    # cannot compile, a prompt too long: 400 like any other bad request).
    try:
        first = next(chunks)
    except StopIteration:
        first = None
    except EngineError as exc:
        cancel.set()
        raise _failure(exc) from None

    def events() -> Iterator[bytes]:
        try:
            yield sse(shaper.first())
            for item in itertools.chain([first] if first is not None else [], chunks):
                if isinstance(item, Token):
                    for chunk in shaper.feed(item.text, item.logprobs):
                        yield sse(chunk)
                elif isinstance(item, Queued):
                    yield sse(shaper.chunk(None, bchat_queued=item.position))
                elif isinstance(item, Idle):
                    yield b": keepalive\n\n"  # fails fast once the client has gone
                elif isinstance(item, Finished):
                    usage = {"prompt_tokens": item.prompt_tokens,
                             "completion_tokens": item.completion_tokens}
                    timings = {"bchat": item.meta, "predicted_per_second": item.tokens_per_second}
                    for chunk in shaper.finish(item.finish_reason, usage, {}, timings):
                        yield sse(chunk)
            yield b"data: [DONE]\n\n"
        except EngineError as exc:
            yield sse_error(_failure(exc))
        finally:
            cancel.set()  # the client went away (GeneratorExit) or we are done: free the model

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _complete(chunks, cancel: threading.Event, shaper: CompletionShaper):
    parts: list[str] = []
    logprobs: list[dict] = []
    try:
        for item in chunks:  # Idle heartbeats while the model is busy: a hang-up is seen then too
            if hung_up(request.environ):
                return Response(status=499)  # nginx's "client closed request": nobody reads it
            if isinstance(item, Token):
                parts.append(item.text)
                logprobs += item.logprobs or ()
            elif isinstance(item, Finished):
                usage = {"prompt_tokens": item.prompt_tokens,
                         "completion_tokens": item.completion_tokens}
                return shaper.complete("".join(parts), item.finish_reason, usage, {}, logprobs)
    except EngineError as exc:
        raise _failure(exc) from None
    finally:
        cancel.set()
    raise AppError("model_failed", "the model ended without a result")


def create_worker_app(config: dict[str, Any] | None = None) -> Flask:
    from .config import instance_path

    app = Flask(__name__, instance_path=str(instance_path()))
    app.config.update(load_config(app.instance_path))
    app.config.update(config or {})
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    catalogue = ModelCatalogue(app.config["MODEL_PATH"], n_ctx=app.config["N_CTX"],
                               parallel=app.config["PARALLEL"])
    engine = LlamaCppEngine.from_config(catalogue, app.config)
    app.extensions[ENGINE_KEY] = engine
    register_errors(app, pages=False)
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
