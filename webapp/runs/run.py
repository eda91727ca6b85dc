"""One reply being written in this process, the frames its watchers get, and how it ends.

Every frame a run (or the socket, about a run) sends is built here: ``started``, ``queued``,
``token``, the final ``done`` or ``error``. How a run ends (complete, stopped, interrupted,
failed) is decided once, in ``outcome``, whether its reply is stored or only kept in memory.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from ..engines.base import EngineError, Finished
from ..engines.structured import call_parts
from ..errors import AppError
from ..limits import Lease
from ..models import Provenance
from ..options import GenerationOptions


class Watcher(Protocol):
    """Something that relays a run's frames to a client. ``deliver`` must not block."""

    def deliver(self, frame: dict[str, Any]) -> None: ...

    @property
    def active(self) -> bool: ...


# -- frames ----------------------------------------------------------------------------------
def started_frame(message_id: str, model: str, conversation: dict[str, Any] | None,
                  reply: dict[str, Any] | None, user_message: dict[str, Any] | None = None,
                  kind: str | None = None, **extra: Any) -> dict[str, Any]:
    """The reply's row is stored (``streaming``); the model starts after this frame."""
    return {"type": "started", **({"kind": kind} if kind else {}),
            "conversation_id": conversation["id"] if conversation else None,
            "conversation": conversation, "user_message": user_message,
            "message_id": message_id, "model": model, "reply": reply, **extra}


def token_frame(message_id: str, offset: int, text: str) -> dict[str, Any]:
    return {"type": "token", "message_id": message_id, "offset": offset, "text": text}


def tool_call_frame(message_id: str, index: int, call: dict[str, Any]) -> dict[str, Any]:
    """A tool call of reply ``message_id`` is about to run."""
    name, arguments = call_parts(call)
    return {"type": "tool_call", "message_id": message_id, "index": index,
            "call_id": call.get("id"), "name": name, "arguments": arguments}


def tool_result_frame(message_id: str, index: int, call: dict[str, Any], result: dict[str, Any]
                      ) -> dict[str, Any]:
    """A tool call of reply ``message_id`` ran: its result text (never HTML), time, error."""
    return {"type": "tool_result", "message_id": message_id, "index": index,
            "call_id": call.get("id"), "name": result["meta"].get("name"),
            "content": result["content"], **{k: v for k, v in result["meta"].items()
                                             if k in ("ms", "error", "truncated")}}


def step_frame(message_id: str, message: dict[str, Any], tools: list[dict[str, Any]],
               reply: dict[str, Any]) -> dict[str, Any]:
    """A tool step is stored: the reply that called (now complete), the tool messages, and
    the next reply, "streaming": the tokens after this frame are its."""
    return {"type": "step", "message_id": message_id, "message": message, "tool_messages": tools,
            "reply": reply}


def queued_frame(message_id: str, position: int) -> dict[str, Any]:
    return {"type": "queued", "message_id": message_id, "position": position}


def error_frame(error: AppError, message_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """An ``error`` frame; it names the reply it concerns whenever there is one."""
    frame = {"type": "error", **error.to_dict(), **extra}
    if message_id is not None:
        frame["message_id"] = message_id
    return frame


def final_frame(message: dict[str, Any]) -> dict[str, Any]:
    """What a watcher gets when a reply is over: ``done``, or ``error`` for a failed one."""
    if message["status"] == "failed":
        error = (message.get("meta") or {}).get("error") or {}
        return error_frame(AppError(error.get("code", "model_failed"),
                                    error.get("message", "the model failed")),
                           message["id"], reply=message)
    return {"type": "done", "message_id": message["id"], "message": message}


def last_left_out(history: list[dict[str, Any]], options: GenerationOptions, dropped: int) -> str:
    """The start of the newest message the model did not see (its oldest ``dropped`` turns
    were left out to fit the context), so the page can say where its view began."""
    offset = 1 if (not options.system and history and history[0]["role"] == "system") else 0
    index = min(offset + dropped, len(history)) - 1
    text = " ".join(str(history[index].get("content") or "").split()) if index >= 0 else ""
    return text[:80] + ("…" if len(text) > 80 else "")


class Run:
    """One reply being written in this process."""

    def __init__(self, *, message_id: str, conversation_id: str, owner: str, model: str,
                 engine: Any, options: GenerationOptions, history: list[dict[str, Any]],
                 started_frame: dict[str, Any], lease: Lease, stored: bool = True,
                 continues: dict[str, Any] | None = None,
                 files: list[dict[str, Any]] | None = None) -> None:
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.owner = owner
        self.model = model
        self.engine = engine
        self.options = options
        self.history = history
        self.started_frame = started_frame
        self.lease = lease  # its place in the visitor's and the address's limits
        self.stored = stored  # False for a /v1 call with "store": false: nothing is written
        self.continues = continues  # the reply as it was, when continuing it
        self.files = files  # what the model was given of the branch's files (attachments.py)
        self.lock = threading.Lock()
        self.parts: list[str] = [continues["content"]] if continues else []
        self.length = len(continues["content"]) if continues else 0  # in code points
        self.position: int | None = None  # place in the model's queue while waiting
        self.watchers: list[Watcher] = []
        self.cancel = threading.Event()
        self.stop_reason: str | None = None
        self.final_frame: dict[str, Any] | None = None
        self.finished = threading.Event()
        self.flushed = self.length
        self.vouched_at = time.monotonic()
        self.orphaned_at: float | None = time.monotonic()
        self.started_at = time.perf_counter()
        # A conversation with tools on (service.py's loop): the tools its model may call, the
        # steps taken, calls a continued reply left unrun, and meta its row keeps however it ends.
        self.tools: list[Any] | None = None
        self.steps = 0
        self.pending_calls: list[dict[str, Any]] | None = None
        self.extra_meta: dict[str, Any] = {}

    @property
    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)

    def _send(self, frame: dict[str, Any]) -> None:  # lock held
        for watcher in list(self.watchers):
            if watcher.active:
                watcher.deliver(frame)
            else:
                self.watchers.remove(watcher)
        if not self.watchers and self.orphaned_at is None:
            self.orphaned_at = time.monotonic()

    def append(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        with self.lock:
            frame = token_frame(self.message_id, self.length, text)
            if logprobs:  # asked for by a /v1 call (options.logprobs): its live watcher's
                frame["logprobs"] = logprobs
            self.parts.append(text)
            self.length += len(text)
            self.position = None
            self._send(frame)

    def send(self, frame: dict[str, Any]) -> None:
        with self.lock:
            self._send(frame)

    def next_step(self, message_id: str, history: list[dict[str, Any]],
                  frame: dict[str, Any]) -> None:
        """The loop goes on in a new reply row: its text starts empty, under its own id."""
        with self.lock:
            self.message_id = message_id
            self.history = history
            self.parts, self.length, self.flushed = [], 0, 0
            self.continues = None
            self.extra_meta = {}
            self.vouched_at = time.monotonic()
            self._send(frame)

    def queued(self, position: int) -> None:
        with self.lock:
            self.position = position
            self._send(queued_frame(self.message_id, position))

    def attach(self, watcher: Watcher, offset: int = 0) -> None:
        """Send ``watcher`` the text from ``offset`` and keep it posted until the end. Under
        the lock, so no token can slip between the catch-up and the live ones."""
        with self.lock:
            if self.final_frame is not None:
                watcher.deliver(self.final_frame)
                return
            if offset < self.length:
                watcher.deliver(token_frame(self.message_id, offset, "".join(self.parts)[offset:]))
            if self.position:
                watcher.deliver(queued_frame(self.message_id, self.position))
            if watcher not in self.watchers:
                self.watchers.append(watcher)
            self.orphaned_at = None

    def detach(self, watcher: Watcher) -> None:
        with self.lock:
            if watcher in self.watchers:
                self.watchers.remove(watcher)
            if not self.watchers and self.orphaned_at is None:
                self.orphaned_at = time.monotonic()

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancel.set()

    def fresh_cancel(self) -> None:
        """A new cancel event for the loop's next model call (engines set theirs when a
        stream ends); a stop asked for meanwhile sets it too."""
        self.cancel = threading.Event()
        if self.stop_reason is not None:
            self.cancel.set()

    def settle(self, frame: dict[str, Any]) -> None:
        self.lease.release()  # before the final frame: a client may start the next at once
        with self.lock:
            self.final_frame = frame
            self._send(frame)
            self.watchers.clear()
        self.finished.set()

    def outcome(self, finished: Finished | None, error: EngineError | None) -> tuple[str, Provenance]:
        """How the run ended, stored or not: ``complete``, ``stopped`` (a user or a lost
        watcher), ``interrupted`` (the server shutting down) or ``failed``; and the reply's
        provenance."""
        meta: dict[str, Any] = dict(finished.meta) if finished else {}
        meta.update(self.extra_meta)
        meta["options"] = self.options.to_dict()
        if self.files:
            meta["files"] = self.files
        if meta.get("trimmed_messages"):
            meta["trimmed_through"] = last_left_out(self.history, self.options,
                                                    meta["trimmed_messages"])
        earlier_tokens = 0
        if self.continues is not None:  # the same message, written in more than one go
            earlier_tokens = (self.continues.get("usage") or {}).get("completion_tokens") or 0
            meta["continued"] = int((self.continues.get("meta") or {}).get("continued", 0)) + 1
        if error is not None:
            status, finish_reason = "failed", "error"
            meta["error"] = {"code": error.code, "message": error.message}
        elif finished is None or finished.finish_reason == "stopped":
            reason = self.stop_reason or "user"
            status = "interrupted" if reason == "shutdown" else "stopped"
            finish_reason = "stopped"
            meta["stop_reason"] = reason
        else:
            status, finish_reason = "complete", finished.finish_reason
        return status, Provenance(
            engine="server",
            backend=getattr(self.engine, "name", None),
            model=self.model,
            prompt_tokens=finished.prompt_tokens if finished else None,
            completion_tokens=(finished.completion_tokens + earlier_tokens) if finished
            else (earlier_tokens or None),
            tokens_per_second=finished.tokens_per_second if finished else None,
            finish_reason=finish_reason,
            meta=meta,
        )


class Follower:
    """One watcher following a reply written elsewhere, by reading its row as it grows. A
    second resume of the same reply by the same watcher restarts it from the new offset."""

    def __init__(self, owner: str, message_id: str, offset: int, watcher: Watcher,
                 lease: Lease) -> None:
        self.owner, self.message_id, self.offset, self.watcher = owner, message_id, offset, watcher
        self.lease = lease  # its place among the replies its visitor follows
        self.pending: int | None = None  # an offset a later resume asked for
        self.ended = threading.Event()
        self.wake = threading.Event()  # its row changed (a NOTIFY), or it should look again

    def end(self) -> None:
        """Stop following: its thread wakes and leaves now, not after its wait."""
        self.ended.set()
        self.wake.set()

    def restart(self, offset: int) -> bool:
        """Send the text again from ``offset`` (RunService's lock held); False once it ended."""
        if self.ended.is_set():
            return False
        self.pending = offset if self.pending is None else min(self.pending, offset)
        self.wake.set()
        return True

    def take_restart(self, sent: int) -> int:
        """Where to send from next (RunService's lock held)."""
        pending, self.pending = self.pending, None
        return sent if pending is None else pending
