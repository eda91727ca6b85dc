"""Replies as runs: a reply being generated belongs to the server, not to the socket that asked.

A run owns everything about one reply: the validated options, the history the model sees, the
engine stream, tok/s and provenance, and persistence. Its assistant row is inserted before the
model starts (status ``streaming``) and a keeper thread writes the text to the database as it
grows (every ``FLUSH_SECONDS``), so a crash loses at most that much. Sockets (and later other
adapters) *watch* runs: a watcher gets the text from an offset, then the live tokens, then the
final frame. A run whose last watcher left is stopped after ``BCHAT_RUN_GRACE_SECONDS``; an
explicit stop ends it at once.

Several processes (``gunicorn -w N``) share one database: each streaming row names the process
writing it (``run_owner``) and is vouched for every ``LEASE_RENEW_SECONDS``. A process that
finds a row whose writer is dead (its pid gone, or its lease run out) marks it ``interrupted``
with what it holds; a watcher on another process follows the row as it is flushed.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from .chats import MISSING, ChatService, Provenance
from .engines import EngineRegistry
from .engines.base import (
    EngineError,
    Finished,
    Queued,
    Token,
    UnknownModel,
    timed,
)
from .errors import AppError, Invalid, RateLimited
from .limits import COMPARE_MAX, Lease, Limits
from .models import new_public_id, utcnow
from .options import GenerationOptions, settings_options
from .security import short

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25  # text reaches the database at least this often while it grows
LEASE_RENEW_SECONDS = 2.0  # a live run's row is vouched for at least this often
SERVER_LEASE_SECONDS = 10.0  # a streaming row nobody vouched for this long has a dead writer
BROWSER_LEASE_SECONDS = 120.0  # pages in background tabs may only wake once a minute
REMOTE_POLL_SECONDS = 0.25  # how often a watcher on another process re-reads the row
MAX_FOLLOWS = 16  # replies written elsewhere one visitor may follow at once, all sockets together

HOST = socket.gethostname()
_LIVE_IDENTITIES: set[str] = set()  # run services alive in this process


class Watcher(Protocol):
    """Something that relays a run's frames to a client. ``deliver`` must not block."""

    def deliver(self, frame: dict[str, Any]) -> None: ...

    @property
    def active(self) -> bool: ...


def last_left_out(history: list[dict[str, Any]], options: GenerationOptions, dropped: int) -> str:
    """The start of the newest message the model did not see (its oldest ``dropped`` turns
    were left out to fit the context), so the page can say where its view began."""
    offset = 1 if (not options.system and history and history[0]["role"] == "system") else 0
    index = min(offset + dropped, len(history)) - 1
    text = " ".join(str(history[index].get("content") or "").split()) if index >= 0 else ""
    return text[:80] + ("…" if len(text) > 80 else "")


def check_message_id(value: Any) -> str:
    """A message id from a client: a string, or Invalid before it reaches a query (where an
    object or a list failed as a 500)."""
    if not isinstance(value, str):
        raise Invalid("bad_frame", "message_id must be a string")
    return value


class Run:
    """One reply being written in this process."""

    stored = True  # False for a /v1 call with "store": false: nothing reaches the database

    def __init__(self, *, message_id: str, conversation_id: str, owner: str, model: str,
                 engine: Any, options: GenerationOptions, history: list[dict[str, str]],
                 started_frame: dict[str, Any]) -> None:
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.owner = owner
        self.model = model
        self.engine = engine
        self.options = options
        self.history = history
        self.started_frame = started_frame
        self.lock = threading.Lock()
        self.parts: list[str] = []
        self.length = 0  # in code points, as offsets are counted
        self.position: int | None = None  # place in the model's queue while waiting
        self.watchers: list[Watcher] = []
        self.cancel = threading.Event()
        self.stop_reason: str | None = None
        self.final_frame: dict[str, Any] | None = None
        self.finished = threading.Event()
        self.flushed = 0
        self.vouched_at = time.monotonic()
        self.orphaned_at: float | None = time.monotonic()
        self.started_at = time.perf_counter()
        self.continues: dict[str, Any] | None = None  # the reply as it was, when continuing it
        self.lease: Lease | None = None  # its place in the visitor's and the address's limits

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

    def append(self, text: str) -> None:
        with self.lock:
            frame = {"type": "token", "message_id": self.message_id, "offset": self.length,
                     "text": text}
            self.parts.append(text)
            self.length += len(text)
            self.position = None
            self._send(frame)

    def queued(self, position: int) -> None:
        with self.lock:
            self.position = position
            self._send({"type": "queued", "message_id": self.message_id, "position": position})

    def attach(self, watcher: Watcher, offset: int = 0) -> None:
        """Send ``watcher`` the text from ``offset`` and keep it posted until the end. Under
        the lock, so no token can slip between the catch-up and the live ones."""
        with self.lock:
            if self.final_frame is not None:
                watcher.deliver(self.final_frame)
                return
            if offset < self.length:
                text = "".join(self.parts)
                watcher.deliver({"type": "token", "message_id": self.message_id,
                                 "offset": offset, "text": text[offset:]})
            if self.position:
                watcher.deliver({"type": "queued", "message_id": self.message_id,
                                 "position": self.position})
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

    def settle(self, frame: dict[str, Any]) -> None:
        if self.lease is not None:  # before the final frame: a client may start the next at once
            self.lease.release()
        with self.lock:
            self.final_frame = frame
            self._send(frame)
            self.watchers.clear()
        self.finished.set()


class Follower:
    """One watcher following a reply written elsewhere, by reading its row as it grows. A
    second resume of the same reply by the same watcher restarts it from the new offset."""

    def __init__(self, owner: str, message_id: str, offset: int, watcher: Watcher) -> None:
        self.owner, self.message_id, self.offset, self.watcher = owner, message_id, offset, watcher
        self.pending: int | None = None  # an offset a later resume asked for
        self.ended = threading.Event()

    def restart(self, offset: int) -> bool:
        """Send the text again from ``offset`` (RunService's lock held); False once it ended."""
        if self.ended.is_set():
            return False
        self.pending = offset if self.pending is None else min(self.pending, offset)
        return True

    def take_restart(self, sent: int) -> int:
        """Where to send from next (RunService's lock held)."""
        pending, self.pending = self.pending, None
        return sent if pending is None else pending


def final_frame(message: dict[str, Any]) -> dict[str, Any]:
    """What a watcher gets when a reply is over: ``done``, or ``error`` for a failed one."""
    if message["status"] == "failed":
        error = (message.get("meta") or {}).get("error") or {}
        return {"type": "error", "code": error.get("code", "model_failed"),
                "message": error.get("message", "the model failed"),
                "message_id": message["id"], "reply": message}
    return {"type": "done", "message_id": message["id"], "message": message}


class RunService:
    """Starts, watches, stops and persists the runs of one app instance."""

    def __init__(self, chats: ChatService, engines: EngineRegistry, config: dict,
                 limits: Limits | None = None) -> None:
        self.chats = chats
        self.engines = engines
        self.config = config
        self.limits = limits if limits is not None else Limits(config)
        self.grace = float(config.get("RUN_GRACE_SECONDS", 30))
        self.identity = f"{HOST}|{os.getpid()}|{secrets.token_hex(4)}"
        self.runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._followers: dict[tuple[int, str], Follower] = {}  # (id(watcher), message id)
        _LIVE_IDENTITIES.add(self.identity)
        self._keeper = threading.Thread(target=self._keep, name="bchat-run-keeper", daemon=True)
        self._keeper.start()
        # A server stopped with SIGTERM (gunicorn, or bchat serve) keeps its partial replies.
        ref = weakref.ref(self)
        atexit.register(lambda: (svc := ref()) and svc.shutdown())

    # -- starting ---------------------------------------------------------------------------
    def options(self, raw: Any) -> GenerationOptions:
        return GenerationOptions.parse(raw, self.config)

    def admit(self, owner: str, ip: str | None, needed: int = 1) -> Lease:
        """Limits before any model call (webapp/limits.py): replies at once per visitor and
        per address, chats per minute. The lease is the run's until it ends, whichever way;
        a caller that does not start a run gives it back (``with`` or ``release``)."""
        return self.limits.take_replies(owner, ip, needed)

    def _prepare(self, owner: str, conversation_id: str | None, options: Any, model: Any,
                 settings: Any = None) -> tuple[GenerationOptions, str, Any, dict[str, Any] | None]:
        """The reply's options: the conversation's settings (a new conversation: the visitor's
        defaults and the ``settings`` sent with it), overridden by the frame's ``options``."""
        if options is not None and not isinstance(options, dict):
            raise Invalid("bad_options", "options must be an object")
        new_settings = self.chats.clean_settings(settings) if settings is not None else None
        base = self.chats.conversation_settings(owner, conversation_id)
        if new_settings:
            base.update({k: v for k, v in new_settings.items() if v is not None})
        raw = settings_options(base)
        raw.update(options or {})
        parsed = self.options(raw)
        chosen = model or base.get("model") or self.engines.default_model
        if not isinstance(chosen, str):
            raise AppError("unknown_model", "no model is available on this server", status=404)
        try:
            engine = self.engines.engine_for(chosen)
        except UnknownModel as exc:
            if model or not self.engines.default_model:
                raise AppError("unknown_model", exc.message, status=404) from None
            # The conversation's model is gone from this server: use the default one.
            chosen = self.engines.default_model
            engine = self.engines.engine_for(chosen)
        return parsed, chosen, engine, new_settings

    @staticmethod
    def _provenance(engine: Any, model: str, options: GenerationOptions) -> Provenance:
        return Provenance(engine="server", backend=getattr(engine, "name", None), model=model,
                          meta={"options": options.to_dict()})

    def start(
        self, owner: str, conversation_id: str | None, content: Any, *, model: Any = None,
        options: Any = None, ip: str | None = None, watcher: Watcher | None = None,
        parent_id: Any = MISSING, settings: Any = None,
    ) -> Run:
        """A new user message (after the current leaf, or under ``parent_id``: an edit is a
        new message beside the one edited) and its reply."""
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise Invalid("bad_frame", "conversation_id must be a string or null")
        parsed, model, engine, new_settings = self._prepare(owner, conversation_id, options,
                                                            model, settings)
        self.chats.check_content(content)
        with self._admitted(owner, ip) as lease:
            conv, user_message, reply, history = self.chats.begin_turn(
                owner, conversation_id, content, self._provenance(engine, model, parsed),
                run_owner=self.identity, parent_id=parent_id, settings=new_settings,
            )
            started = {"type": "started", "conversation_id": conv["id"], "conversation": conv,
                       "user_message": user_message, "message_id": reply["id"], "model": model,
                       "reply": reply}
            return self._launch(owner, conv["id"], model, engine, parsed, history, started,
                                watcher, lease)

    def compare(self, owner: str, conversation_id: str | None, content: Any, targets: Any, *,
                options: Any = None, ip: str | None = None, watcher: Watcher | None = None,
                parent_id: Any = MISSING, settings: Any = None) -> list[Run]:
        """One prompt, several server models at once: sibling replies, each its own run (the
        batched worker decodes them together). Browser targets are the page's own."""
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise Invalid("bad_frame", "conversation_id must be a string or null")
        if not isinstance(targets, list) or not 1 <= len(targets) <= COMPARE_MAX or not all(
                isinstance(t, dict) and isinstance(t.get("model"), str) for t in targets):
            raise Invalid("bad_targets", f"targets is a list of 1 to {COMPARE_MAX} "
                          '{"model": ID} objects (server models)')
        prepared = [self._prepare(owner, conversation_id, options, t["model"], settings)
                    for t in targets]
        self.chats.check_content(content)
        with self._admitted(owner, ip, len(prepared)) as lease:
            conv, user, replies, history = self.chats.begin_compare(
                owner, conversation_id, content,
                [self._provenance(engine, model, parsed) for parsed, model, engine, _ in prepared],
                run_owner=self.identity, parent_id=parent_id, settings=prepared[0][3],
            )
            parts = lease.split(len(prepared))  # each run gives back its own when it ends
        runs = []
        try:
            for (parsed, model, engine, _), reply, part in zip(prepared, replies, parts,
                                                               strict=True):
                started = {"type": "started", "kind": "compare", "conversation_id": conv["id"],
                           "conversation": conv, "user_message": user, "message_id": reply["id"],
                           "model": model, "reply": reply,
                           "message_ids": [r["id"] for r in replies]}
                runs.append(self._launch(owner, conv["id"], model, engine, parsed, history,
                                         started, watcher, part))
        finally:
            for part in parts[len(runs):]:  # the runs that did not start
                part.release()
        return runs

    def regenerate(self, owner: str, message_id: Any, *, model: Any = None, options: Any = None,
                   ip: str | None = None, watcher: Watcher | None = None) -> Run:
        """Another reply to the same user message, as a sibling of ``message_id``."""
        check_message_id(message_id)
        conversation_id = self.chats.reply_state(owner, message_id)["conversation_id"]
        parsed, model, engine, _ = self._prepare(owner, conversation_id, options, model)
        with self._admitted(owner, ip) as lease:
            conv, asked, reply, history = self.chats.begin_regenerate(
                owner, message_id, self._provenance(engine, model, parsed), run_owner=self.identity
            )
            started = {"type": "started", "kind": "regenerate", "conversation_id": conv["id"],
                       "conversation": conv, "user_message": asked, "message_id": reply["id"],
                       "model": model, "reply": reply, "regenerates": message_id}
            return self._launch(owner, conv["id"], model, engine, parsed, history, started,
                                watcher, lease)

    def continue_reply(self, owner: str, message_id: Any, *, options: Any = None,
                       ip: str | None = None, watcher: Watcher | None = None) -> Run:
        """More text in the same message, for a reply cut off by the token limit (or a stop,
        or an interruption), written by the model that wrote it when it is still here."""
        check_message_id(message_id)
        state = self.chats.reply_state(owner, message_id)
        same = state["model"] if state["engine"] == "server" and self._serves(state["model"]) else None
        parsed, model, engine, _ = self._prepare(owner, state["conversation_id"], options, same)
        with self._admitted(owner, ip) as lease:
            conv, before, history = self.chats.begin_continue(owner, message_id,
                                                              run_owner=self.identity)
            started = {"type": "started", "kind": "continue", "conversation_id": conv["id"],
                       "conversation": conv, "user_message": None, "message_id": before["id"],
                       "model": model, "reply": {**before, "status": "streaming"}}
            return self._launch(owner, conv["id"], model, engine, parsed, history, started,
                                watcher, lease, continues=before)

    def _serves(self, model: Any) -> bool:
        try:
            self.engines.engine_for(model)
        except UnknownModel:
            return False
        return isinstance(model, str)

    @contextmanager
    def _admitted(self, owner: str, ip: str | None, needed: int = 1) -> Iterator[Lease]:
        """A lease for the block: given back if the block fails before a run owns it."""
        lease = self.admit(owner, ip, needed)
        try:
            yield lease
        except BaseException:
            lease.release()
            raise

    def _launch(self, owner: str, conversation_id: str, model: str, engine: Any,
                options: GenerationOptions, history: list[dict[str, str]],
                started: dict[str, Any], watcher: Watcher | None, lease: Lease,
                continues: dict[str, Any] | None = None) -> Run:
        run = Run(message_id=started["message_id"], conversation_id=conversation_id, owner=owner,
                  model=model, engine=engine, options=options, history=history,
                  started_frame=started)
        run.lease = lease
        if continues is not None:
            run.continues = continues
            run.parts = [continues["content"]]
            run.length = run.flushed = len(continues["content"])
        if watcher is not None:
            # Before the model starts, so no token goes unseen; a continued reply's text so
            # far is already with the client that asked.
            run.attach(watcher, run.length)
        with self._lock:
            self.runs[run.message_id] = run
        self._wake.set()
        log.info("chat %s: reply %s with %s", short(conversation_id), short(run.message_id), model)
        self._start_thread(run)
        return run

    def _start_thread(self, run: Run) -> None:
        try:
            threading.Thread(target=self._drive, args=(run,), name="bchat-run", daemon=True).start()
        except BaseException:  # no thread (e.g. the process is out of them): nothing runs it
            with self._lock:
                self.runs.pop(run.message_id, None)
            if run.lease is not None:
                run.lease.release()
            raise

    # -- watching and stopping -------------------------------------------------------------
    def watch(self, owner: str, message_id: Any, offset: Any, watcher: Watcher) -> None:
        """Resume: the text of ``message_id`` from ``offset``, the live tokens, the end."""
        check_message_id(message_id)
        if offset is None:
            offset = 0
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= 2**31:
            raise Invalid("bad_frame", "offset must be a non-negative integer")
        with self._lock:
            run = self.runs.get(message_id)
            follower = self._followers.get((id(watcher), message_id))
            if follower is not None and follower.restart(offset):
                return  # a resume of a reply this watcher already follows: no second thread
        if run is not None and run.owner == owner:
            run.attach(watcher, offset)
            return
        state = self.chats.reply_state(owner, message_id)  # NotFound for someone else's
        if state["status"] == "streaming" and self.reap_stale([message_id]):
            state = self.chats.reply_state(owner, message_id)
        if state["status"] != "streaming":
            watcher.deliver(final_frame(_public(state)))
            return
        # Written by another process (or by a page: the browser engine): follow its row as
        # it is flushed. One follower per reply and watcher, a few per visitor: each is a
        # thread that reads the database four times a second.
        with self._lock:
            key = (id(watcher), message_id)
            follower = self._followers.get(key)
            if follower is not None and follower.restart(offset):
                return
            if sum(1 for f in self._followers.values() if f.owner == owner) >= MAX_FOLLOWS:
                raise RateLimited(f"you already follow {MAX_FOLLOWS} replies being written "
                                  "elsewhere; close a tab or wait for one to end",
                                  retry_after=REMOTE_POLL_SECONDS)
            follower = self._followers[key] = Follower(owner, message_id, offset, watcher)
        log.info("reply %s: following it from the database (written elsewhere)", short(message_id))
        threading.Thread(target=self._follow_remote, args=(follower,), name="bchat-run-follow",
                         daemon=True).start()

    def _follow_remote(self, follower: Follower) -> None:
        owner, message_id, watcher = follower.owner, follower.message_id, follower.watcher
        sent = follower.offset
        try:
            while watcher.active and not follower.ended.is_set():
                with self._lock:
                    sent = follower.take_restart(sent)
                state = self.chats.reply_state(owner, message_id)
                if state["status"] == "streaming" and self.reap_stale([message_id]):
                    continue
                content = state["content"]
                if len(content) > sent:
                    watcher.deliver({"type": "token", "message_id": message_id, "offset": sent,
                                     "text": content[sent:]})
                    sent = len(content)
                if state["status"] != "streaming":
                    watcher.deliver(final_frame(_public(state)))
                    # A resume that came after this read gets its answer from one more turn.
                    if self._end_follower(follower):
                        return
                    continue
                follower.ended.wait(REMOTE_POLL_SECONDS)
        except AppError as exc:  # the conversation was deleted meanwhile
            watcher.deliver({"type": "error", "message_id": message_id, **exc.to_dict()})
        except Exception:
            log.exception("following reply %s failed", short(message_id))
            watcher.deliver({"type": "error", "code": "internal", "message_id": message_id,
                             "message": "the server failed while following the reply"})
        finally:
            self._end_follower(follower, force=True)

    def _end_follower(self, follower: Follower, *, force: bool = False) -> bool:
        """Take ``follower`` out of the registry, unless a resume is waiting for it."""
        with self._lock:
            if not force and follower.pending is not None:
                return False
            follower.ended.set()
            key = (id(follower.watcher), follower.message_id)
            if self._followers.get(key) is follower:
                del self._followers[key]
            return True

    def followers(self, watcher: Watcher | None = None) -> int:
        """How many replies are being followed from the database (by ``watcher``)."""
        with self._lock:
            return sum(1 for f in self._followers.values() if watcher is None or f.watcher is watcher)

    def detach(self, watcher: Watcher, message_ids: list[str]) -> None:
        with self._lock:
            runs = [self.runs[m] for m in message_ids if m in self.runs]
            # A watcher that has gone: its followers end now, not at their next read.
            gone = [f for f in self._followers.values()
                    if f.watcher is watcher and (f.message_id in message_ids or not watcher.active)]
        for follower in gone:
            follower.ended.set()
        for run in runs:
            run.detach(watcher)

    def stop(self, owner: str, message_id: Any, reason: str = "user") -> bool:
        check_message_id(message_id)
        with self._lock:
            run = self.runs.get(message_id)
        if run is not None and run.owner == owner:
            run.stop(reason)
            return True
        return self.chats.request_stop(owner, message_id)  # another process writes it

    def live_runs(self, owner: str | None = None) -> list[Run]:
        with self._lock:
            return [r for r in self.runs.values() if owner is None or r.owner == owner]

    # -- the run itself -------------------------------------------------------------------
    def _drive(self, run: Run) -> None:
        try:
            self._generate(run)
        finally:
            with self._lock:
                self.runs.pop(run.message_id, None)
            if run.lease is not None:  # whichever way it ended: done, stopped, failed, crashed
                run.lease.release()

    def _generate(self, run: Run) -> None:
        finished: Finished | None = None
        error: EngineError | None = None
        try:
            for item in timed(run.engine.stream(run.model, run.history, run.options, run.cancel)):
                if isinstance(item, Token):
                    run.append(item.text)
                elif isinstance(item, Queued):
                    run.queued(item.position)
                elif isinstance(item, Finished):
                    finished = item
        except EngineError as exc:
            error = exc
        except Exception as exc:  # reported as a failed reply: never a silent, dead run
            log.exception("chat %s: the run failed", short(run.conversation_id))
            error = EngineError(f"the server failed while writing the reply ({type(exc).__name__})",
                                code="internal")
        self._settle(run, finished, error)

    def _settle(self, run: Run, finished: Finished | None, error: EngineError | None) -> None:
        if not run.stored:
            self._settle_unstored(run, finished, error)
            return
        meta: dict[str, Any] = dict(finished.meta) if finished else {}
        meta["options"] = run.options.to_dict()
        if meta.get("trimmed_messages"):
            meta["trimmed_through"] = last_left_out(run.history, run.options, meta["trimmed_messages"])
        earlier_tokens = 0
        if run.continues is not None:  # the same message, written in more than one go
            before = run.continues
            earlier_tokens = (before.get("usage") or {}).get("completion_tokens") or 0
            meta["continued"] = int((before.get("meta") or {}).get("continued", 0)) + 1
        if error is not None:
            status, finish_reason = "failed", "error"
            meta["error"] = {"code": error.code, "message": error.message}
        elif finished is None or finished.finish_reason == "stopped":
            reason = run.stop_reason or "user"
            status = "interrupted" if reason == "shutdown" else "stopped"
            finish_reason = "stopped"
            meta["stop_reason"] = reason
        else:
            status, finish_reason = "complete", finished.finish_reason
        provenance = Provenance(
            engine="server",
            backend=getattr(run.engine, "name", None),
            model=run.model,
            prompt_tokens=finished.prompt_tokens if finished else None,
            completion_tokens=(finished.completion_tokens + earlier_tokens) if finished
            else (earlier_tokens or None),
            tokens_per_second=finished.tokens_per_second if finished else None,
            finish_reason=finish_reason,
            meta=meta,
        )
        try:
            stored = self.chats.finish_reply(run.message_id, run.text, status, provenance)
        except Exception:
            # The row stays "streaming" with its last flush; the reaper interrupts it later.
            log.exception("chat %s: could not store the reply", short(run.conversation_id))
            run.settle({"type": "error", "code": "internal", "message_id": run.message_id,
                        "message": "the reply could not be stored"})
            return
        if stored is None:
            log.warning("chat %s: deleted during generation; reply dropped",
                        short(run.conversation_id))
            run.settle({"type": "error", "code": "not_found", "message_id": run.message_id,
                        "message": "the conversation was deleted while replying"})
            return
        log.info("chat %s: reply %s (%s tokens, %.1fs)", short(run.conversation_id), status,
                 provenance.completion_tokens, time.perf_counter() - run.started_at)
        run.settle(final_frame(stored))

    # -- runs for /v1: the client's whole message list, stored or not ------------------------
    def start_api(
        self, owner: str, messages: list[dict[str, Any]], *, model: Any, options: GenerationOptions,
        store: bool, ip: str | None = None, watcher: Watcher | None = None,
    ) -> Run:
        """A reply to ``messages`` as an OpenAI client sent them (tool turns included). With
        ``store`` the call becomes a conversation of ``owner`` (source "api") that grows like
        any reply; without, nothing is written and the final frame carries the reply."""
        model = model or self.engines.default_model
        if not isinstance(model, str):
            raise AppError("unknown_model", "no model is available on this server", status=404)
        try:
            engine = self.engines.engine_for(model)
        except UnknownModel as exc:
            raise AppError("unknown_model", exc.message, status=404) from None
        provenance = Provenance(engine="server", backend=getattr(engine, "name", None),
                                model=model, meta={"options": options.to_dict()})
        with self._admitted(owner, ip) as lease:
            if store:
                conv, reply = self.chats.begin_api_reply(owner, messages, provenance,
                                                         run_owner=self.identity)
                message_id, conversation_id = reply["id"], conv["id"]
            else:
                conv, reply = None, None
                message_id, conversation_id = new_public_id(), ""
            started = {"type": "started", "conversation_id": conversation_id or None,
                       "conversation": conv, "message_id": message_id, "model": model,
                       "reply": reply}
            run = Run(message_id=message_id, conversation_id=conversation_id, owner=owner,
                      model=model, engine=engine, options=options, history=messages,
                      started_frame=started)
            run.stored = store
            run.lease = lease
            if watcher is not None:
                run.attach(watcher)
            with self._lock:
                self.runs[run.message_id] = run
            self._wake.set()
            log.info("api call: reply %s with %s (%s)", short(message_id), model,
                     "stored" if store else "not stored")
            self._start_thread(run)
        return run

    def _settle_unstored(self, run: Run, finished: Finished | None,
                         error: EngineError | None) -> None:
        """The final frame of a run kept only in memory: the same message dict a stored
        reply's final frame carries."""
        meta: dict[str, Any] = dict(finished.meta) if finished else {}
        meta["options"] = run.options.to_dict()
        if error is not None:
            status, finish_reason = "failed", "error"
            meta["error"] = {"code": error.code, "message": error.message}
        elif finished is None or finished.finish_reason == "stopped":
            status, finish_reason = "stopped", "stopped"
            meta["stop_reason"] = run.stop_reason or "user"
        else:
            status, finish_reason = "complete", finished.finish_reason
        message = {
            "id": run.message_id, "role": "assistant", "content": run.text, "status": status,
            "created_at": None, "engine": "server", "backend": getattr(run.engine, "name", None),
            "model": run.model,
            "usage": {"prompt_tokens": finished.prompt_tokens if finished else None,
                      "completion_tokens": finished.completion_tokens if finished else None},
            "tokens_per_second": finished.tokens_per_second if finished else None,
            "finish_reason": finish_reason, "meta": meta,
        }
        run.settle(final_frame(message))

    # -- persistence ------------------------------------------------------------------------
    def _keep(self) -> None:
        """Flushes growing text, renews leases, and stops runs nobody watches any more."""
        while not self._closing.is_set():
            runs = self.live_runs()
            if not runs:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.flush(runs)
            except Exception:
                log.exception("flushing replies failed; retrying")
            self._closing.wait(FLUSH_SECONDS)

    def flush(self, runs: list[Run]) -> None:
        now = time.monotonic()
        contents: dict[str, str] = {}
        lengths: dict[str, int] = {}
        vouch: list[str] = []
        for run in runs:
            if run.orphaned_at is not None and now - run.orphaned_at >= self.grace:
                run.stop("disconnect")
            with run.lock:
                if run.final_frame is not None or not run.stored:
                    continue
                if run.length != run.flushed:
                    contents[run.message_id] = "".join(run.parts)
                    lengths[run.message_id] = run.length
                elif now - run.vouched_at >= LEASE_RENEW_SECONDS:
                    vouch.append(run.message_id)
        if not contents and not vouch:
            return
        stops = self.chats.flush_runs(contents, vouch)
        by_id = {run.message_id: run for run in runs}
        for message_id, length in lengths.items():
            by_id[message_id].flushed = length
        for message_id in list(contents) + vouch:
            by_id[message_id].vouched_at = now
        for message_id in stops:
            by_id[message_id].stop("user")

    def reap_stale(self, message_ids: list[str] | None = None) -> int:
        """Mark "interrupted" the streaming rows whose writer is dead; how many were."""
        now = utcnow()
        dead = []
        for message_id, run_owner, engine, renewed in self.chats.streaming_replies():
            if message_ids is not None and message_id not in message_ids:
                continue
            if message_id in self.runs:
                continue
            if _writer_dead(run_owner, engine, renewed, now):
                dead.append(message_id)
        count = self.chats.interrupt(dead, "server_restart")
        if count:
            log.warning("marked %d replies whose writer died as interrupted", count)
        return count

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop every run and keep what it wrote, marked "interrupted"."""
        if self._closing.is_set():
            return
        runs = self.live_runs()
        for run in runs:
            run.stop("shutdown")
        deadline = time.monotonic() + timeout
        for run in runs:
            run.finished.wait(max(0.0, deadline - time.monotonic()))
        left = [run for run in runs if not run.finished.is_set()]
        if left:
            try:
                self.chats.flush_runs({run.message_id: run.text for run in left}, [])
                self.chats.interrupt([run.message_id for run in left], "shutdown")
            except Exception:
                log.exception("could not keep %d partial replies at shutdown", len(left))
        self._closing.set()
        self._wake.set()
        with self._lock:
            for follower in self._followers.values():
                follower.ended.set()
        _LIVE_IDENTITIES.discard(self.identity)


def _public(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("conversation_id", "run_owner", "lease_at")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_dead(run_owner: str | None, engine: str | None, renewed, now) -> bool:
    age = (now - renewed).total_seconds() if renewed is not None else float("inf")
    if engine == "browser" or run_owner == "browser":
        return age > BROWSER_LEASE_SECONDS
    if not run_owner or run_owner.count("|") != 2:
        return True
    host, pid_text, _nonce = run_owner.split("|")
    if host == HOST and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid():
            return run_owner not in _LIVE_IDENTITIES
        if not _pid_alive(pid):
            return True
    return age > SERVER_LEASE_SECONDS

