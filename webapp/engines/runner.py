"""The embedded models as the web process sees them: each in a runner process (model_runner.py).

A reply is one connection to the model's runner on its Unix socket: one JSON request line
(history and the already-validated options), then JSON lines back. A stop closes the
connection, which the runner sees at once. A runner that dies mid-reply breaks the connection;
the supervisor's ``state.json`` then says how it died, and the reply fails with
``model_crashed`` (the run service keeps the text it had). Nothing here loads native code.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..catalogue import ModelCatalogue
from ..model_runner import MAX_REQUEST_BYTES, STATE_FILE, encode_options
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

READY_WAIT_SECONDS = 120.0  # a runner restarting or loading a big model: a chat waits this long
EXIT_WAIT_SECONDS = 3.0  # how long a broken reply waits for the supervisor to say why
POLL_SECONDS = 0.02
HEALTH_TIMEOUT_SECONDS = 2.0


class RunnerState:
    """state.json of a supervisor, re-read when it changes."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / STATE_FILE
        self._cache: tuple[int, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        with self._lock:
            try:
                stamp = self.path.stat().st_mtime_ns
                if self._cache is None or self._cache[0] != stamp:
                    self._cache = (stamp, json.loads(self.path.read_text()))
            except (OSError, ValueError):  # not written yet (or being replaced): nothing known
                return {}
            return self._cache[1].get("runners", {})

    def runner(self, model_id: str) -> dict[str, Any] | None:
        return self.read().get(model_id)

    def wait(self, model_id: str, until, timeout: float) -> dict[str, Any] | None:
        """The runner's record once ``until(record)`` holds, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.runner(model_id)
            if record is not None and until(record):
                return record
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_SECONDS)


class RunnerEngine:
    """Every GGUF of the catalogue, each answered by its runner process."""

    name = "llamacpp"  # the provenance is the same as for a model loaded in the web process

    def __init__(self, catalogue: ModelCatalogue, directory: str | Path, supervisor=None) -> None:
        self.catalogue = catalogue
        self.state = RunnerState(directory)
        self.supervisor = supervisor  # set when this process started the runners itself

    def models(self) -> list[ModelInfo]:
        runners = self.state.read()
        found = []
        for model in self.catalogue:
            facts = self.catalogue.facts(model.id) or {}
            record = runners.get(model.id) or {}
            if record.get("status") == "unavailable":
                facts["unavailable"] = record.get("reason")
            found.append(ModelInfo(id=model.id, engine=self.name, facts=facts))
        return found

    # -- generation ------------------------------------------------------------------------
    def stream(self, model: str, messages: list[dict[str, str]], options: GenerationOptions,
               cancel: threading.Event) -> Iterator[Chunk]:
        if self.catalogue.get(model) is None:
            raise UnknownModel(f"no model named {model!r}")
        request = json.dumps({"messages": messages, "options": encode_options(options)},
                             ensure_ascii=False).encode() + b"\n"
        if len(request) > MAX_REQUEST_BYTES:  # the runner would not read it: say why instead
            raise EngineError(f"this conversation is {len(request) >> 20} MB with its images; "
                              f"a model is sent at most {MAX_REQUEST_BYTES >> 20} MB: send "
                              "smaller images, or start a new conversation",
                              code="images_too_large")
        return self._stream(model, request, cancel)

    def _stream(self, model: str, request: bytes, cancel: threading.Event) -> Iterator[Chunk]:
        record = self._ready(model, cancel)
        for attempt in (1, 2):
            conn = None
            try:
                conn = self._connect(record)
                conn.sendall(request)
                replies = conn.makefile("rb")
                accepted = json.loads(replies.readline() or b"{}").get("a")
            except (OSError, ValueError):
                accepted = False
            if accepted:
                yield from self._read(model, record, conn, replies, cancel)
                return
            if conn is not None:
                conn.close()
            # The runner never took the request: it died a moment ago (its socket may still
            # have queued the connection) and the supervisor has not said so yet. Nothing ran,
            # so ask the next runner instead, once.
            if attempt == 2 or cancel.is_set():
                raise self._broken(model, record, None)
            generation = record.get("generation")
            self.state.wait(model, lambda r, old=generation: r.get("generation") != old or
                            r["status"] == "unavailable", EXIT_WAIT_SECONDS)
            record = self._ready(model, cancel)

    @staticmethod
    def _connect(record: dict[str, Any]) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(record["socket"])
        except OSError:
            conn.close()
            raise
        return conn

    def _ready(self, model: str, cancel: threading.Event) -> dict[str, Any]:
        record = self.state.wait(
            model, lambda r: r["status"] in ("ready", "unavailable") or cancel.is_set(),
            READY_WAIT_SECONDS)
        if record is None:
            current = self.state.runner(model) or {}
            raise EngineError(
                f"the model process for {model} is not ready ({current.get('status', 'not started')}"
                f"{'; last: ' + current['last_exit'] if current.get('last_exit') else ''}); try again",
                code="model_starting")
        if record["status"] == "unavailable":
            raise EngineError(f"{model} is unavailable: {record.get('reason')}", code="model_unavailable")
        return record

    def _read(self, model: str, record: dict[str, Any], conn: socket.socket, replies,
              cancel: threading.Event) -> Iterator[Chunk]:
        done = threading.Event()

        def close_on_cancel() -> None:
            cancel.wait()
            if not done.is_set():
                try:
                    # Half-close: the runner's recv sees the end at once and stops generating,
                    # then still sends its last line (a "stopped" finish with the real counts).
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=close_on_cancel, name="bchat-runner-stop", daemon=True).start()
        finished = False
        try:
            with replies:
                for line in replies:
                    data = json.loads(line)
                    if "t" in data:
                        yield Token(data["t"], data.get("l"))
                    elif "q" in data:
                        yield Queued(position=data["q"])
                    elif "f" in data:
                        finished = True
                        yield Finished(**data["f"])
                    elif "e" in data:
                        finished = True
                        raise _engine_error(data["e"])
        except OSError as exc:
            if not cancel.is_set():
                raise self._broken(model, record, exc) from None
        finally:
            stopped = cancel.is_set()
            done.set()
            cancel.set()  # releases the closer thread
            conn.close()
        if not finished:
            if stopped:  # our own shutdown ended the read before the runner's last line
                yield Finished(finish_reason="stopped", prompt_tokens=0, completion_tokens=0,
                               meta={"stopped_early": True})
                return
            raise self._broken(model, record, None)

    def _broken(self, model: str, record: dict[str, Any], exc: Exception | None) -> EngineError:
        """The runner went away mid-request: wait briefly for the supervisor to say how."""
        generation = record.get("generation")
        after = self.state.wait(
            model, lambda r: r.get("generation") != generation or r["status"] != "ready",
            EXIT_WAIT_SECONDS) or {}
        cause = after.get("last_exit") if after.get("generation") == generation or \
            after.get("status") in ("restarting", "unavailable") else None
        log.error("the runner of %s broke off a reply: %s", model, cause or exc or "connection closed")
        return EngineError(
            f"The model {model} stopped: its process {cause or 'went away'}. The reply so far is "
            "kept, and the model is being restarted.", code="model_crashed")

    # -- watching ----------------------------------------------------------------------------
    def runners(self) -> list[dict[str, Any]]:
        """Each runner's pid, status, restarts and last exit cause (for /healthz)."""
        keys = ("model", "status", "pid", "restarts", "last_exit", "last_exit_at", "reason")
        return [{key: record.get(key) for key in keys} for record in self.state.read().values()]

    def health(self, stuck_after: float) -> list[dict[str, Any]]:
        """Problems that fail every chat to a model: unavailable, or a runner that is stuck."""
        problems: list[dict[str, Any]] = []
        for model_id, record in self.state.read().items():
            if record["status"] == "unavailable":
                problems.append({"model": model_id, "problem": "unavailable",
                                 "message": record.get("reason")})
            elif record["status"] == "ready":
                problems.extend(self._ask_health(model_id, record, stuck_after))
        return problems

    def _ask_health(self, model_id: str, record: dict[str, Any],
                    stuck_after: float) -> list[dict[str, Any]]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(HEALTH_TIMEOUT_SECONDS)
                conn.connect(record["socket"])
                conn.sendall(json.dumps({"op": "health", "stuck_after": stuck_after}).encode() + b"\n")
                with conn.makefile("rb") as replies:
                    answer = json.loads(replies.readline() or b"{}")
        except (OSError, ValueError):
            return []  # it is restarting: the supervisor's record says so, it is not a problem yet
        return list(answer.get("problems") or [])

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()


def _engine_error(error: dict[str, Any]) -> EngineError:
    kind, message = error.get("kind"), str(error.get("message") or "the model failed")
    if kind == "context_too_long":
        return ContextTooLong(message)
    if kind == "unknown_model":
        return UnknownModel(message)
    return EngineError(message, code=error.get("code") or None)
