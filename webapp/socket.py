"""The websocket protocol at /ws: receive a chat, store it, stream the reply, store the reply.

Frames are JSON text; docs/protocol.md is the reference. One socket runs at most one
generation at a time. While it runs, this thread relays tokens and keeps reading the socket,
so a ``stop`` frame or a vanished client cancels the model within a fraction of a second and
the partial reply is still stored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from flask import Blueprint, abort, current_app
from flask_sock import ConnectionClosed, Sock

from .chats import Invalid, NotFound, Provenance
from .engines.base import EngineError, Finished, GenerationOptions, Queued, Token, UnknownModel
from .models import new_public_id
from .security import owner_id, require_same_origin, short
from .services import get_services

log = logging.getLogger(__name__)

bp = Blueprint("socket", __name__)
sock = Sock()

WATCH_SECONDS = 0.05  # how soon the watcher notices that a reply has ended


class _Turn:
    """What the relay and its watcher share about one reply."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.connected = True
        self.stop_reason: str | None = None

    def disconnected(self) -> None:
        if self.connected:
            self.connected = False
            self.stop_reason = self.stop_reason or "disconnect"
            self.cancel.set()


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@bp.before_request
def _check_handshake():
    """Runs before the websocket upgrade: a refusal here is a plain HTTP 403."""
    require_same_origin()
    if owner_id(create=False) is None:
        abort(403, description="open the chat page first: the socket needs its owner cookie")


@sock.route("/ws", bp=bp)
def chat_socket(ws) -> None:
    ChatSocket(ws, owner_id(create=False)).run()


def parse_options(raw: Any, config) -> GenerationOptions:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError("bad_options", "options must be an object")
    unknown = set(raw) - {"system", "temperature", "top_p", "max_tokens", "seed"}
    if unknown:
        raise ProtocolError("bad_options", f"unknown options: {', '.join(sorted(unknown))}")

    def number(name: str, low: float, high: float, default: float, *, integer=False):
        value = raw.get(name, default)
        if value is None:
            return default
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not (low <= value <= high):
            kind = "an integer" if integer else "a number"
            raise ProtocolError("bad_options", f"{name} must be {kind} from {low} to {high}")
        return value

    system = raw.get("system")
    if system is not None and (
        not isinstance(system, str) or len(system) > config["MAX_MESSAGE_CHARS"]
    ):
        raise ProtocolError("bad_options", "system must be a string within the message limit")
    return GenerationOptions(
        system=system or None,
        temperature=float(number("temperature", 0.0, 2.0, 0.7)),
        top_p=float(number("top_p", 0.0, 1.0, 0.95)),
        max_tokens=int(
            number("max_tokens", 1, config["MAX_TOKENS_LIMIT"], config["MAX_TOKENS"], integer=True)
        ),
        seed=raw.get("seed") if isinstance(raw.get("seed"), int) else None,
    )


class ChatSocket:
    def __init__(self, ws, owner: str) -> None:
        self.ws = ws
        self.owner = owner
        self.services = get_services()
        self.config = current_app.config
        self.pending: list[Any] = []  # frames the watcher read as a reply ended
        self._send_lock = threading.Lock()  # the relay and its watcher both send

    # -- plumbing --------------------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> bool:
        """Send a frame; False when the client is gone (the caller carries on, quietly)."""
        data = json.dumps(frame, ensure_ascii=False)
        try:
            with self._send_lock:
                self.ws.send(data)
            return True
        except (ConnectionClosed, OSError):
            return False

    def send_error(self, code: str, message: str, **extra: Any) -> None:
        self.send({"type": "error", "code": code, "message": message, **extra})

    @staticmethod
    def decode(raw: Any) -> dict[str, Any]:
        if isinstance(raw, bytes):
            raise ProtocolError("bad_frame", "send JSON text frames, not binary")
        try:
            frame = json.loads(raw)
        except ValueError:
            raise ProtocolError("bad_json", "the frame is not valid JSON") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ProtocolError("bad_frame", 'a frame is a JSON object with a "type"')
        return frame

    def run(self) -> None:
        timeout = self.config["WS_RECEIVE_TIMEOUT"]
        while self.ws.connected or self.pending:
            try:
                raw = self.pending.pop(0) if self.pending else self.ws.receive(timeout=timeout)
            except ConnectionClosed:
                break
            if raw is None:
                continue  # timeout: look at ws.connected again
            try:
                frame = self.decode(raw)
                if frame["type"] == "chat":
                    self.chat(frame)
                elif frame["type"] == "stop":
                    pass  # nothing is running: a stop racing a finished reply is normal
                elif frame["type"] == "ping":
                    self.send({"type": "pong"})
                else:
                    raise ProtocolError("unknown_type", f"unknown frame type {frame['type']!r}")
            except ProtocolError as exc:
                self.send_error(exc.code, exc.message)

    # -- one chat turn ---------------------------------------------------------------------
    def chat(self, frame: dict[str, Any]) -> None:
        services = self.services
        conversation_id = frame.get("conversation_id")
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise ProtocolError("bad_frame", "conversation_id must be a string or null")
        model = frame.get("model") or services.engines.default_model
        if not isinstance(model, str):
            raise ProtocolError("unknown_model", "no model is available on this server")
        try:
            services.engines.engine_for(model)
        except UnknownModel as exc:
            raise ProtocolError("unknown_model", exc.message) from None
        options = parse_options(frame.get("options"), self.config)
        try:
            conv, user_message = services.chats.add_user_message(
                self.owner, conversation_id, frame.get("content")
            )
        except Invalid as exc:
            raise ProtocolError(exc.code, exc.message) from None
        except NotFound:
            raise ProtocolError("not_found", "no such conversation") from None

        reply_id = new_public_id()
        self.send(
            {
                "type": "started",
                "conversation_id": conv["id"],
                "conversation": conv,
                "user_message": user_message,
                "message_id": reply_id,
                "model": model,
            }
        )
        history = services.chats.history(self.owner, conv["id"])
        self.relay(conv["id"], reply_id, model, history, options)

    def relay(self, conversation_id, reply_id, model, history, options) -> None:
        """Stream the reply to the client while a watcher thread reads the socket.

        The watcher sleeps in ``receive`` and wakes only for a frame or a closed socket, so
        the token path costs one thread wake-up per token: on a 2-core machine every extra
        runnable thread steals time from llama.cpp's own threads.
        """
        engines = self.services.engines
        engine = engines.engine_for(model)
        turn = _Turn()
        watcher = threading.Thread(target=self.watch, args=(turn,), name="bchat-watch", daemon=True)
        log.info("chat %s: generating with %s", short(conversation_id), model)
        parts: list[str] = []
        finished: Finished | None = None
        error: Exception | None = None
        started = time.perf_counter()
        watcher.start()
        try:
            for item in engines.stream(model, history, options, turn.cancel):
                if isinstance(item, Token):
                    parts.append(item.text)
                    if turn.connected and not self.send({"type": "token", "text": item.text}):
                        turn.disconnected()
                elif isinstance(item, Queued):
                    if turn.connected and not self.send({"type": "queued", "position": item.position}):
                        turn.disconnected()
                elif isinstance(item, Finished):
                    finished = item
        except Exception as exc:  # stored as a failed reply and reported below
            error = exc
        finally:
            turn.done.set()
            watcher.join()
        self.store_reply(
            conversation_id, reply_id, model, engine, "".join(parts),
            finished, error, turn.stop_reason, turn.connected, time.perf_counter() - started,
        )

    def watch(self, turn: _Turn) -> None:
        """Runs beside a generation: handles stop, refuses a second chat, notices a hang-up."""
        while not turn.done.is_set():
            try:
                raw = self.ws.receive(timeout=WATCH_SECONDS)
            except ConnectionClosed:
                turn.disconnected()
                return
            if raw is None:
                continue
            if turn.done.is_set():
                self.pending.append(raw)  # arrived as the reply ended: the main loop takes it
                return
            if self.frame_while_generating(raw, turn.cancel):
                turn.stop_reason = turn.stop_reason or "user"

    def frame_while_generating(self, raw: Any, cancel: threading.Event) -> bool:
        """Handle a frame that arrived mid-reply; True when it was a stop."""
        try:
            frame = self.decode(raw)
            if frame["type"] == "stop":
                cancel.set()
                return True
            if frame["type"] == "chat":
                raise ProtocolError(
                    "busy", "a reply is still being written on this socket; stop it first"
                )
            if frame["type"] == "ping":
                self.send({"type": "pong"})
                return False
            raise ProtocolError("unknown_type", f"unknown frame type {frame['type']!r}")
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message)
        return False

    def store_reply(
        self, conversation_id, reply_id, model, engine, text, finished, error, stop_reason,
        connected, elapsed,
    ) -> None:
        meta: dict[str, Any] = dict(finished.meta) if finished else {}
        if error is not None:
            status = "failed"
            code = getattr(error, "code", "model_failed")
            message = getattr(error, "message", None) or "the model failed"
            if not isinstance(error, EngineError):
                log.error("chat %s: unexpected failure", short(conversation_id), exc_info=error)
                code, message = "internal", "the server failed while writing the reply"
            meta["error"] = {"code": code, "message": message}
        elif finished is None or finished.finish_reason == "stopped":
            status = "stopped"
            meta["stop_reason"] = stop_reason or "user"
        else:
            status = "complete"
        provenance = Provenance(
            engine="server",
            backend=getattr(engine, "name", None),
            model=model,
            prompt_tokens=finished.prompt_tokens if finished else None,
            completion_tokens=finished.completion_tokens if finished else None,
            tokens_per_second=finished.tokens_per_second if finished else None,
            finish_reason=(finished.finish_reason if finished else None)
            if status != "failed"
            else "error",
            meta=meta,
        )
        try:
            stored = self.services.chats.add_reply(
                self.owner, conversation_id, text, status, provenance, public_id=reply_id
            )
        except NotFound:
            # Deleted from another tab while the reply streamed: nothing left to attach it to.
            log.warning("chat %s: deleted during generation; reply dropped", short(conversation_id))
            if connected:
                self.send_error("not_found", "the conversation was deleted while replying")
            return
        log.info(
            "chat %s: reply %s (%s tokens, %.1fs)",
            short(conversation_id), status,
            provenance.completion_tokens, elapsed,
        )
        if not connected:
            return
        if status == "failed":
            self.send_error(meta["error"]["code"], meta["error"]["message"], message_id=reply_id,
                            reply=stored)
        else:
            self.send({"type": "done", "message": stored})
