"""The websocket protocol at /ws: receive a chat, store it, stream the reply, store the reply.

Frames are JSON text; docs/protocol.md is the reference. One socket runs at most one
generation at a time. While it runs, this thread relays tokens and keeps reading the socket,
so a ``stop`` frame or a vanished client cancels the model within a fraction of a second and
the partial reply is still stored.
"""

from __future__ import annotations

import json
import logging
import queue
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

class _Turn:
    """What the relay and the reader thread share about one reply."""

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


def _is_stop(raw: Any) -> bool:
    if not isinstance(raw, str) or '"stop"' not in raw:
        return False
    try:
        frame = json.loads(raw)
    except ValueError:
        return False
    return isinstance(frame, dict) and frame.get("type") == "stop"


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


_CLOSED = object()  # the reader's last word: the client has gone


class ChatSocket:
    """One open socket. A reader thread owns ``ws.receive``: it acts on ``stop`` and on a
    closed connection at once (even while the model is still reading a long prompt) and hands
    every other frame to this thread through ``inbox``. Nothing polls: on a 2-core machine
    every needless wake-up is time taken from llama.cpp's own threads."""

    def __init__(self, ws, owner: str) -> None:
        self.ws = ws
        self.owner = owner
        self.services = get_services()
        self.config = current_app.config
        self.inbox: queue.Queue = queue.Queue()
        self.turn: _Turn | None = None  # the reply being written, if any
        self._send_lock = threading.Lock()  # this thread and the reader both send

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

    def read(self) -> None:
        """The reader thread: every receive has a timeout, so a dead peer cannot pin it."""
        timeout = self.config["WS_RECEIVE_TIMEOUT"]
        try:
            while True:
                try:
                    raw = self.ws.receive(timeout=timeout)
                except ConnectionClosed:
                    return
                if raw is None:
                    if not self.ws.connected:
                        return
                    continue
                turn = self.turn
                if turn is not None and _is_stop(raw):
                    turn.stop_reason = turn.stop_reason or "user"
                    turn.cancel.set()
                    continue
                self.inbox.put(raw)
        finally:
            turn = self.turn
            if turn is not None:
                turn.disconnected()
            self.inbox.put(_CLOSED)

    def run(self) -> None:
        threading.Thread(target=self.read, name="bchat-ws-reader", daemon=True).start()
        while True:
            raw = self.inbox.get()
            if raw is _CLOSED:
                return
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
            if not self.ws.connected and self.inbox.empty():
                return

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
            engine = services.engines.engine_for(model)
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
        self.relay(conv["id"], reply_id, model, engine, history, options)

    def relay(self, conversation_id, reply_id, model, engine, history, options) -> None:
        """Stream the reply to the client; frames that arrive meanwhile are answered between
        tokens (stop and hang-ups were already acted on by the reader)."""
        turn = self.turn = _Turn()
        if not self.ws.connected:
            turn.disconnected()
        log.info("chat %s: generating with %s", short(conversation_id), model)
        parts: list[str] = []
        finished: Finished | None = None
        error: Exception | None = None
        started = time.perf_counter()
        try:
            for item in engine.stream(model, history, options, turn.cancel):
                if isinstance(item, Token):
                    parts.append(item.text)
                    if turn.connected and not self.send({"type": "token", "text": item.text}):
                        turn.disconnected()
                elif isinstance(item, Queued):
                    if turn.connected and not self.send({"type": "queued", "position": item.position}):
                        turn.disconnected()
                elif isinstance(item, Finished):
                    finished = item
                if not self.inbox.empty():
                    self.answer_while_generating()
        except Exception as exc:  # stored as a failed reply and reported below
            error = exc
        finally:
            self.turn = None
        self.store_reply(
            conversation_id, reply_id, model, engine, "".join(parts),
            finished, error, turn.stop_reason, turn.connected, time.perf_counter() - started,
        )

    def answer_while_generating(self) -> None:
        while True:
            try:
                raw = self.inbox.get_nowait()
            except queue.Empty:
                return
            if raw is _CLOSED:
                self.inbox.put(_CLOSED)  # for run() to see after the reply is stored
                return
            try:
                frame = self.decode(raw)
                if frame["type"] == "chat":
                    raise ProtocolError(
                        "busy", "a reply is still being written on this socket; stop it first"
                    )
                if frame["type"] == "ping":
                    self.send({"type": "pong"})
                elif frame["type"] != "stop":
                    raise ProtocolError("unknown_type", f"unknown frame type {frame['type']!r}")
            except ProtocolError as exc:
                self.send_error(exc.code, exc.message)

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
