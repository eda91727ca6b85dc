"""The websocket protocol at /ws: a thin adapter over runs (``webapp/runs/``).

Frames are JSON text; docs/protocol.md is the reference. A socket starts runs and *watches*
them: it relays their frames, and when it closes the runs go on for the grace period, so a
page that reconnects (or comes back to the conversation) resumes the same reply. One thread
reads the socket (every receive has a timeout, so a dead peer cannot pin it); this thread
handles client frames and sends run frames, both taken from one queue: nothing polls, and
each token costs one wake-up.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from typing import Any

from flask import Blueprint, abort, current_app, g, request
from flask_sock import ConnectionClosed, Sock

from .accounts import get_accounts
from .chats import MISSING
from .errors import AppError, Invalid
from .limits import get_limits
from .runs.run import Run, error_frame
from .security import account_session_token, owner_id, require_same_origin
from .services import get_services
from .validation import parse_json_text

log = logging.getLogger(__name__)

bp = Blueprint("socket", __name__)
sock = Sock()

_CLOSED = object()  # the reader's last word: the client has gone
SESSION_CHECK_SECONDS = 30.0  # how often an idle signed-in socket checks its session is live


@bp.before_request
def _check_handshake():
    """Runs before the websocket upgrade: a refusal here is a plain HTTP answer."""
    require_same_origin()
    owner = owner_id(create=False)
    if owner is None:
        abort(403, description="open the chat page first: the socket needs its owner cookie")
    # Each open socket holds a server thread for as long as it is open: without a cap the
    # sockets take every thread and the site stops answering even page loads; without a
    # share per visitor and per network, one of them could take every slot. A refusal is an
    # AppError, answered in bchat's dialect with its Retry-After (errors.py).
    g.bchat_socket_lease = get_limits().take_socket(owner, request.remote_addr)


@bp.teardown_request
def _release(_exc) -> None:
    lease = g.pop("bchat_socket_lease", None)
    if lease is not None:
        lease.release()


@sock.route("/ws", bp=bp)
def chat_socket(ws) -> None:
    try:
        ChatSocket(ws, owner_id(create=False), request.remote_addr,
                   account_session_token()).run()
    finally:
        if getattr(ws, "mode", None) == "werkzeug":
            # The development server would go on reading the connection for a next HTTP
            # request, holding its thread until the client closes TCP (e.g. after a 1009
            # close for an oversized frame): end the connection from our side.
            try:
                ws.close()
            except Exception:  # already closed (ConnectionClosed): the usual case here
                pass
            try:
                ws.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def decode(raw: Any) -> dict[str, Any]:
    """A client frame under the API's JSON rules (no NaN, no lone surrogates, bounded depth
    and numbers): a bad one is an ``error`` frame and the socket stays open."""
    if isinstance(raw, bytes):
        raise Invalid("bad_frame", "send JSON text frames, not binary")
    frame = parse_json_text(raw)
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise Invalid("bad_frame", 'a frame is a JSON object with a "type"')
    return frame


class ChatSocket:
    """One open socket: the runs it started or resumed, and the frames they send."""

    def __init__(self, ws, owner: str, ip: str | None, account_token: str | None = None) -> None:
        self.ws = ws
        self.owner = owner
        self.ip = ip
        # A signed-in browser's session: a socket outlives the request that checked it, so it
        # is checked again before each frame and every SESSION_CHECK_SECONDS while idle, and a
        # revoke or a disabled account ends the socket (and what it relays) then.
        self.account_token = account_token
        self.session_checked = time.monotonic()
        self.services = get_services()
        self.config = current_app.config
        self.inbox: queue.Queue = queue.Queue()
        self.watching: list[str] = []  # message ids of the runs this socket relays
        self.connected = True

    # -- the watcher interface runs call (from their own threads) ------------------------------
    @property
    def active(self) -> bool:
        return self.connected

    def deliver(self, frame: dict[str, Any]) -> None:
        self.inbox.put(frame)

    # -- plumbing -----------------------------------------------------------------------------
    def send(self, frame: dict[str, Any]) -> None:
        if not self.connected:
            return
        try:
            self.ws.send(json.dumps(frame, ensure_ascii=False))
        except (ConnectionClosed, OSError):
            self.connected = False

    def read(self) -> None:
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
                self.inbox.put(raw)
        except Exception:
            log.exception("the socket reader failed")
        finally:
            self.inbox.put(_CLOSED)

    def still_signed_in(self) -> bool:
        """False, with an ``error`` frame and the socket closed, when this browser's session
        was revoked or its account disabled since the socket opened."""
        self.session_checked = time.monotonic()
        if get_accounts().session_account(self.account_token) is not None:
            return True
        log.info("a socket of a revoked session or disabled account closed")
        self.send(error_frame(AppError("signed_out", "this browser was signed out (its session "
                                       "was revoked, or the account disabled); sign in again")))
        self.connected = False
        try:
            self.ws.close(reason=1008, message="signed out")
        except Exception:  # already closed
            pass
        return False

    def going_away(self) -> None:
        """The server shuts down: end this socket now (the page reconnects and resumes)."""
        self.inbox.put(_CLOSED)
        try:
            self.ws.close(reason=1001, message="the server is restarting")
        except Exception:  # already closed: nothing to do
            pass

    def run(self) -> None:
        with self.services.sockets_lock:
            self.services.sockets.add(self)
        threading.Thread(target=self.read, name="bchat-ws-reader", daemon=True).start()
        try:
            while True:
                try:
                    item = self.inbox.get(timeout=SESSION_CHECK_SECONDS if self.account_token else None)
                except queue.Empty:
                    item = None
                if item is _CLOSED:
                    return
                if self.account_token and (not isinstance(item, dict) or time.monotonic()
                                           - self.session_checked > SESSION_CHECK_SECONDS):
                    if not self.still_signed_in():
                        return
                if item is None:
                    continue
                if isinstance(item, dict):  # a frame from a run
                    self.send(item)
                    continue
                try:
                    frame = decode(item)
                except AppError as exc:
                    self.send(error_frame(exc))
                else:
                    self.handle(frame)
        finally:
            self.connected = False
            with self.services.sockets_lock:
                self.services.sockets.discard(self)
            # The runs go on for the grace period: a page that reconnects resumes them.
            self.services.runs.detach(self, self.watching)

    # -- frames -------------------------------------------------------------------------------
    def handle(self, frame: dict[str, Any]) -> None:
        """One client frame; whatever goes wrong is an ``error`` frame naming the reply it
        concerns (``message_id``) and echoing the frame's ``request_id``, when they are valid."""
        request_id, message_id = frame.get("request_id"), frame.get("message_id")
        concerns = message_id if isinstance(message_id, str) else None
        about: dict[str, Any] = {}
        try:
            if request_id is not None:
                if (not isinstance(request_id, str | int) or isinstance(request_id, bool)
                        or len(str(request_id)) > 64):
                    raise Invalid("bad_frame", "request_id must be a short string or integer")
                about["request_id"] = request_id
            self._dispatch(frame["type"], frame, about)
        except Exception as exc:
            if not isinstance(exc, AppError):
                log.exception("a socket frame failed")
                exc = AppError("internal", "the server failed on that frame")
            self.send(error_frame(exc, concerns, **about))

    def _dispatch(self, kind: str, frame: dict[str, Any], about: dict[str, Any]) -> None:
        runs = self.services.runs
        if kind in ("chat", "compare", "regenerate", "continue"):
            started_runs = self._start(kind, frame)
            first = {**started_runs[0].started_frame, **about}
            if kind == "compare":
                first["replies"] = [run.started_frame["reply"] for run in started_runs]
            # Sent before any token: the runs' frames wait in the inbox behind this.
            self.send(first)
            for run in started_runs:
                self._watch(run.message_id)
        elif kind == "resume":
            self._watch(frame.get("message_id"))
            runs.watch(self.owner, frame.get("message_id"), frame.get("offset"), self)
        elif kind == "stop":
            target = frame.get("message_id")
            for message_id in [target] if target is not None else list(self.watching):
                runs.stop(self.owner, message_id)
        elif kind == "ping":
            self.send({"type": "pong"})
        else:
            raise Invalid("unknown_type", f"unknown frame type {kind[:40]!r}")

    def _start(self, kind: str, frame: dict[str, Any]) -> list[Run]:
        runs, options = self.services.runs, frame.get("options")
        if kind == "regenerate":
            return [runs.regenerate(self.owner, frame.get("message_id"), model=frame.get("model"),
                                    options=options, ip=self.ip, watcher=self)]
        if kind == "continue":
            return [runs.continue_reply(self.owner, frame.get("message_id"), options=options,
                                        ip=self.ip, watcher=self)]
        turn = {"options": options, "ip": self.ip, "watcher": self,
                "parent_id": frame.get("parent_id", MISSING), "settings": frame.get("settings"),
                "attachments": frame.get("attachments")}
        if kind == "compare":
            return runs.compare(self.owner, frame.get("conversation_id"), frame.get("content"),
                                frame.get("targets"), **turn)
        return [runs.start(self.owner, frame.get("conversation_id"), frame.get("content"),
                           model=frame.get("model"), **turn)]

    def _watch(self, message_id: Any) -> None:
        if isinstance(message_id, str) and message_id not in self.watching:
            self.watching.append(message_id)
            del self.watching[:-32]  # a long-lived page resumes many replies over time
