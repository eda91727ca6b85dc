"""The run service: starts, watches, stops and settles the runs of one app instance.

Every way a reply starts (a chat message, regenerate, continue, compare, a ``/v1`` call) takes
the same steps: options and engine, a place in the limits, the rows (unless a ``/v1`` call is
not stored), then ``_launch``. Sockets (and the ``/v1`` adapter) *watch* runs: a watcher gets
the text from an offset, then the live tokens, then the final frame. A run whose last watcher
left is stopped after ``BCHAT_RUN_GRACE_SECONDS``; an explicit stop ends it at once. A reply
written by another process is followed from its row as the keeper there flushes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from ..chats import MISSING, ChatService, check_message_id
from ..engines import EngineRegistry
from ..engines.base import EngineError, Finished, Queued, Token, takes_images, timed
from ..engines.structured import answer_grammar, build_grammar, call_parts, split_reply
from ..errors import AppError, Invalid
from ..limits import COMPARE_MAX, Lease, Limits
from ..models import Message, Provenance, new_public_id
from ..options import GenerationOptions, settings_options
from ..security import short
from ..tools.registry import MAX_CALLS_PER_STEP, ToolContext, result_message
from ..validation import INT64
from .keeper import HOST, Keeper
from .listen import ReplyListener
from .rows import RunRows
from .run import (
    Follower,
    Run,
    Watcher,
    error_frame,
    final_frame,
    started_frame,
    step_frame,
    token_frame,
    tool_call_frame,
    tool_result_frame,
)

log = logging.getLogger(__name__)

REMOTE_POLL_SECONDS = 0.25  # how often a watcher on another process re-reads the row
# With PostgreSQL's notifications (listen.py) a watcher reads when woken; this only catches one
# lost with a dropped connection.
NOTIFIED_POLL_SECONDS = 2.0


def _one_fit(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """One history for models compared: fitted to the smallest context, shown images only
    when all of them take images (else the first that does not is named in the refusal)."""
    fit = dict(min(fits, key=lambda f: f["context"]))
    blind = next((f for f in fits if not f["vision"]), None)
    fit.update(vision=blind is None, model=blind["model"] if blind else fit["model"])
    # the types every one of them reads (None: any), named after the first that narrows them
    narrow = [f for f in fits if f["image_types"] is not None]
    if narrow and not blind:
        fit.update(image_types=tuple(t for t in narrow[0]["image_types"]
                                     if all(t in f["image_types"] for f in narrow)),
                   model=narrow[0]["model"])
    return fit


def unrun_calls(reply: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tool calls a reply cut off (stopped, interrupted) made and never saw the results
    of: those it kept in its meta, or its text when that is nothing but calls."""
    if reply.get("status") not in ("stopped", "interrupted"):
        return None
    calls = (reply.get("meta") or {}).get("tool_calls")
    if not calls:
        _, _, calls = split_reply(reply.get("content") or "", tools=True)
    return calls or None


class RunService:
    """Starts, watches, stops and persists the runs of one app instance."""

    def __init__(self, chats: ChatService, engines: EngineRegistry, config: dict,
                 limits: Limits | None = None, tools: Any = None) -> None:
        self.chats = chats
        self.tools = tools  # a tools.registry.ToolRegistry: the chat's tool loop (never /v1's)
        self.tool_steps = int(config.get("TOOL_STEPS", 5))
        self._aliases: dict[str, Run] = {}  # a looping run's earlier replies -> the run
        self.engines = engines
        self.config = config
        self.limits = limits if limits is not None else Limits(config)
        # Asked before any reply starts, with (owner, replies needed, their models): raises to
        # refuse it (accounts.py sets it to the quota and model check when accounts are on).
        self.admission: Callable[[str, int, list[str]], int | None] | None = None
        self.grace = float(config.get("RUN_GRACE_SECONDS", 30))
        self.identity = f"{HOST}|{os.getpid()}|{secrets.token_hex(4)}"
        self.runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._followers: dict[tuple[int, str], Follower] = {}  # (id(watcher), message id)
        self.rows = RunRows(chats.db)
        self.keeper = Keeper(self.rows, self.live_runs, self.identity, self.grace)
        self.listener = (ReplyListener(chats.db.url, self._wake_followers)
                         if chats.db.engine.dialect.name == "postgresql" else None)
        # A server stopped with SIGTERM (gunicorn, or bchat serve) keeps its partial replies.
        ref = weakref.ref(self)
        atexit.register(lambda: (svc := ref()) and svc.shutdown())

    # -- starting ---------------------------------------------------------------------------
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
        enabled = self.tools.enabled(base.get("chat_tools")) if self.tools is not None else []
        if enabled:
            # The frame's own options are checked alone: tools come from the settings only.
            GenerationOptions.parse(options or {}, self.config)
            raw["tools"] = self.tools.specs(enabled)
            raw["tool_choice"] = base.get("chat_tool_choice") or "auto"
        parsed = GenerationOptions.parse(raw, self.config, allow_tools=bool(enabled))
        try:
            chosen, engine = self.engines.resolve(model or base.get("model"))
        except AppError:
            if model or not base.get("model") or not self.engines.default_model:
                raise
            # The conversation's model is gone from this server: use the default one.
            chosen, engine = self.engines.resolve(None)
        return parsed, chosen, engine, new_settings

    def _files_fit(self, model: str, options: GenerationOptions) -> dict[str, Any]:
        """What a branch's files are fitted to (attachments.with_files): the context the
        model runs with here (BCHAT_N_CTX, or the model's own when smaller), the reply's,
        whether the model is shown images (its facts' ``vision``: engines.takes_images), and
        which kinds when not every kind (its facts' ``image_types``: an embedded model's)."""
        facts = next((m.facts for m in self.engines.models() if m.id == model), {})
        known = [n for n in (facts.get("context_length"), self.config.get("N_CTX", 4096))
                 if isinstance(n, int) and n > 0]
        return {"context": min(known) if known else 4096,
                "max_tokens": options.max_tokens or self.config.get("MAX_TOKENS", 512),
                "vision": takes_images(facts), "model": model,
                "image_types": tuple(facts["image_types"]) if facts.get("image_types") else None}

    @staticmethod
    def _provenance(engine: Any, model: str, options: GenerationOptions) -> Provenance:
        return Provenance(engine="server", backend=getattr(engine, "name", None), model=model,
                          meta={"options": options.to_dict()})

    def start(
        self, owner: str, conversation_id: str | None, content: Any, *, model: Any = None,
        options: Any = None, ip: str | None = None, watcher: Watcher | None = None,
        parent_id: Any = MISSING, settings: Any = None, attachments: Any = None,
    ) -> Run:
        """A new user message (after the current leaf, or under ``parent_id``: an edit is a
        new message beside the one edited; ``attachments``: the files sent with it) and its
        reply."""
        return self._turn(owner, conversation_id, content, [model], options=options, ip=ip,
                          watcher=watcher, parent_id=parent_id, settings=settings,
                          attachments=attachments)[0]

    def compare(self, owner: str, conversation_id: str | None, content: Any, targets: Any, *,
                options: Any = None, ip: str | None = None, watcher: Watcher | None = None,
                parent_id: Any = MISSING, settings: Any = None,
                attachments: Any = None) -> list[Run]:
        """One prompt, several server models at once: sibling replies, each its own run (the
        batched worker decodes them together). Browser targets are the page's own."""
        if not isinstance(targets, list) or not 1 <= len(targets) <= COMPARE_MAX or not all(
                isinstance(t, dict) and isinstance(t.get("model"), str) for t in targets):
            raise Invalid("bad_targets", f"targets is a list of 1 to {COMPARE_MAX} "
                          '{"model": ID} objects (server models)')
        return self._turn(owner, conversation_id, content, [t["model"] for t in targets],
                          options=options, ip=ip, watcher=watcher, parent_id=parent_id,
                          settings=settings, kind="compare", attachments=attachments)

    def _turn(self, owner: str, conversation_id: str | None, content: Any, models: list[Any], *,
              options: Any, ip: str | None, watcher: Watcher | None, parent_id: Any,
              settings: Any, kind: str | None = None, attachments: Any = None) -> list[Run]:
        """A user message and a reply per model, its rows stored in one transaction."""
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise Invalid("bad_frame", "conversation_id must be a string or null")
        prepared = [self._prepare(owner, conversation_id, options, model, settings)
                    for model in models]
        self.chats.check_content(content)
        with self._admitted(owner, ip, len(prepared), [m for _, m, _, _ in prepared]) as lease:
            conv, user, replies, history = self.chats.begin_turn(
                owner, conversation_id, content,
                [self._provenance(engine, model, parsed) for parsed, model, engine, _ in prepared],
                run_owner=self.identity, parent_id=parent_id, settings=prepared[0][3],
                attachments=attachments,
                # the smallest context among the models compared: one history for all, with
                # images only when every one of them takes images
                **_one_fit([self._files_fit(model, parsed) for parsed, model, _, _ in prepared]),
            )
            parts = lease.split(len(prepared))  # each run gives back its own when it ends
        extra = {"kind": kind, "message_ids": [r["id"] for r in replies]} if kind else {}
        runs = []
        try:
            for (parsed, model, engine, _), reply, part in zip(prepared, replies, parts,
                                                               strict=True):
                runs.append(self._launch(owner, model, engine, parsed, history, watcher, part,
                                         conv=conv, reply=reply, user_message=user,
                                         chat_tools=True, **extra))
        finally:
            for part in parts[len(runs):]:  # the runs that did not start
                part.release()
        return runs

    def regenerate(self, owner: str, message_id: Any, *, model: Any = None, options: Any = None,
                   ip: str | None = None, watcher: Watcher | None = None) -> Run:
        """Another reply to the same user message, as a sibling of ``message_id``."""
        check_message_id(message_id)
        conversation_id, _ = self.rows.reply_state(owner, message_id)
        parsed, model, engine, _ = self._prepare(owner, conversation_id, options, model)
        with self._admitted(owner, ip, 1, [model]) as lease:
            conv, asked, reply, history = self.chats.begin_regenerate(
                owner, message_id, self._provenance(engine, model, parsed), run_owner=self.identity,
                **self._files_fit(model, parsed))
            return self._launch(owner, model, engine, parsed, history, watcher, lease,
                                conv=conv, reply=reply, user_message=asked, kind="regenerate",
                                regenerates=message_id, chat_tools=True)

    def continue_reply(self, owner: str, message_id: Any, *, options: Any = None,
                       ip: str | None = None, watcher: Watcher | None = None) -> Run:
        """More text in the same message, for a reply cut off by the token limit (or a stop,
        or an interruption), written by the model that wrote it when it is still here."""
        check_message_id(message_id)
        conversation_id, state = self.rows.reply_state(owner, message_id)
        served = state["engine"] == "server" and state["model"] in {m.id for m in self.engines.models()}
        same = state["model"] if served else None
        parsed, model, engine, _ = self._prepare(owner, conversation_id, options, same)
        with self._admitted(owner, ip, 1, [model]) as lease:
            conv, before, history = self.chats.begin_continue(owner, message_id,
                                                              run_owner=self.identity,
                                                              **self._files_fit(model, parsed))
            return self._launch(owner, model, engine, parsed, history, watcher, lease,
                                conv=conv, reply={**before, "status": "streaming"},
                                kind="continue", continues=before, chat_tools=True)

    @contextmanager
    def _admitted(self, owner: str, ip: str | None, needed: int = 1,
                  models: list[str] = ()) -> Iterator[Lease]:
        """Limits before any model call (webapp/limits.py): a lease for the block, the run's
        once it starts, given back if the block fails before."""
        cap = self.admission(owner, needed, models) if self.admission is not None else None
        lease = self.limits.take_replies(owner, ip, needed, quota=cap)
        try:
            yield lease
        except BaseException:
            lease.release()
            raise

    def _launch(self, owner: str, model: str, engine: Any, options: GenerationOptions,
                history: list[dict[str, Any]], watcher: Watcher | None, lease: Lease, *,
                conv: dict[str, Any] | None, reply: dict[str, Any] | None,
                user_message: dict[str, Any] | None = None, kind: str | None = None,
                continues: dict[str, Any] | None = None, chat_tools: bool = False,
                **extra: Any) -> Run:
        """The one way a run starts, once its rows are stored (``reply`` None: a /v1 call
        kept only in memory). The lease is the run's from here, whichever way it ends."""
        message_id = reply["id"] if reply else new_public_id()
        run = Run(message_id=message_id, conversation_id=conv["id"] if conv else "", owner=owner,
                  model=model, engine=engine, options=options, history=history, lease=lease,
                  started_frame=started_frame(message_id, model, conv, reply, user_message,
                                              kind, **extra),
                  stored=reply is not None, continues=continues,
                  files=((reply or {}).get("meta") or {}).get("files"))
        if chat_tools and options.tools and self.tools is not None:
            names = {t["function"]["name"] for t in options.tools}
            run.tools = [t for t in self.tools.available() if t.name in names]
            if continues is not None:  # a reply cut off in its tool calls: run them first
                run.pending_calls = unrun_calls(continues)
                if run.pending_calls:
                    run.history = history[:-1]
        if watcher is not None:
            # Before the model starts, so no token goes unseen; a continued reply's text so
            # far is already with the client that asked.
            run.attach(watcher, run.length)
        with self._lock:
            self.runs[run.message_id] = run
        self.keeper.wake()
        log.info("chat %s: reply %s with %s%s", short(run.conversation_id), short(message_id),
                 model, "" if run.stored else " (not stored)")
        try:
            threading.Thread(target=self._drive, args=(run,), name="bchat-run", daemon=True).start()
        except BaseException:  # no thread (e.g. the process is out of them): nothing runs it
            with self._lock:
                self.runs.pop(run.message_id, None)
            lease.release()
            raise
        return run

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
        _, state = self.rows.reply_state(owner, message_id)  # NotFound for someone else's
        if state["status"] == "streaming" and self.keeper.reap_stale([message_id]):
            _, state = self.rows.reply_state(owner, message_id)
        if state["status"] != "streaming":
            watcher.deliver(final_frame(state))
            return
        # Written by another process (or by a page: the browser engine): follow its row as
        # it is flushed. One follower per reply and watcher, a few per visitor: each is a
        # thread that reads the database four times a second.
        with self._lock:
            key = (id(watcher), message_id)
            follower = self._followers.get(key)
            if follower is not None and follower.restart(offset):
                return
            follower = self._followers[key] = Follower(owner, message_id, offset, watcher,
                                                       self.limits.take_follow(owner))
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
                _, state = self.rows.reply_state(owner, message_id)
                if state["status"] == "streaming" and self.keeper.reap_stale([message_id]):
                    continue
                content = state["content"]
                if len(content) > sent:
                    watcher.deliver(token_frame(message_id, sent, content[sent:]))
                    sent = len(content)
                if state["status"] != "streaming":
                    watcher.deliver(final_frame(state))
                    # A resume that came after this read gets its answer from one more turn.
                    if self._end_follower(follower):
                        return
                    continue
                notified = self.listener is not None and self.listener.listening.is_set()
                follower.wake.wait(NOTIFIED_POLL_SECONDS if notified else REMOTE_POLL_SECONDS)
                follower.wake.clear()  # before the read: a change after it wakes the next wait
        except AppError as exc:  # the conversation was deleted meanwhile
            watcher.deliver(error_frame(exc, message_id))
        except Exception:
            log.exception("following reply %s failed", short(message_id))
            watcher.deliver(error_frame(AppError("internal", "the server failed while "
                                                 "following the reply"), message_id))
        finally:
            self._end_follower(follower, force=True)

    def _wake_followers(self, message_id: str) -> None:
        """A NOTIFY: ``message_id``'s row changed; its followers read it now."""
        with self._lock:
            for follower in self._followers.values():
                if follower.message_id == message_id:
                    follower.wake.set()

    def _end_follower(self, follower: Follower, *, force: bool = False) -> bool:
        """Take ``follower`` out of the registry, unless a resume is waiting for it."""
        with self._lock:
            if not force and follower.pending is not None:
                return False
            follower.end()
            key = (id(follower.watcher), follower.message_id)
            if self._followers.get(key) is follower:
                del self._followers[key]
            follower.lease.release()
            return True

    def followers(self) -> int:
        """How many replies are being followed from the database."""
        return len(self._followers)

    def detach(self, watcher: Watcher, message_ids: list[str]) -> None:
        with self._lock:
            runs = [self.runs[m] for m in message_ids if m in self.runs]
            # A watcher that has gone: its followers end now, not at their next read.
            gone = [f for f in self._followers.values()
                    if f.watcher is watcher and (f.message_id in message_ids or not watcher.active)]
        for follower in gone:
            follower.end()
        for run in runs:
            run.detach(watcher)

    def stop(self, owner: str, message_id: Any, reason: str = "user") -> bool:
        check_message_id(message_id)
        with self._lock:
            run = self.runs.get(message_id) or self._aliases.get(message_id)
        if run is not None and run.owner == owner:
            run.stop(reason)
            return True
        return self.rows.request_stop(owner, message_id)  # another process writes it

    def live_runs(self) -> list[Run]:
        with self._lock:
            return list(self.runs.values())

    # -- the run itself -------------------------------------------------------------------
    def _drive(self, run: Run) -> None:
        try:
            self._generate(run)
        finally:
            with self._lock:
                self.runs.pop(run.message_id, None)
                for alias in [k for k, v in self._aliases.items() if v is run]:
                    del self._aliases[alias]
            run.lease.release()  # whichever way it ended: done, stopped, failed, crashed

    def _generate(self, run: Run) -> None:
        """The reply; with tools on, the loop: the model's tool calls are run and stored as a
        step (tools_step), and the model goes on in a new reply, until it answers in text or
        has taken BCHAT_TOOL_STEPS steps (then it must answer: tool_choice "none")."""
        if run.pending_calls:  # a continued reply that had called tools: run them first
            calls, run.pending_calls = run.pending_calls, None
            if not self._tool_step(run, calls, None, keep_provenance=True):
                return
        while True:
            finished, error = self._model_step(run)
            calls = self._tool_calls(run, finished, error)
            if not calls:
                break
            if not self._tool_step(run, calls, finished):
                return
        self._settle(run, finished, error)

    def _model_step(self, run: Run) -> tuple[Finished | None, EngineError | None]:
        finished: Finished | None = None
        error: EngineError | None = None
        try:
            for item in timed(run.engine.stream(run.model, run.history, run.options, run.cancel)):
                if isinstance(item, Token):
                    run.append(item.text, item.logprobs)
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
        return finished, error

    @staticmethod
    def _tool_calls(run: Run, finished: Finished | None, error: EngineError | None
                    ) -> list[dict[str, Any]] | None:
        """The calls a finished reply made, when its conversation has tools on."""
        if (not run.tools or error is not None or finished is None or run.stop_reason
                or run.options.tool_choice == "none"):  # past the step limit: text only
            return None
        if finished.finish_reason not in ("stop", "tool_calls"):
            return None  # cut off by the token limit: a call half written is text
        _, _, calls = split_reply(run.text, tools=True)
        return calls or finished.meta.get("tool_calls") or None

    def _tool_step(self, run: Run, calls: list[dict[str, Any]], finished: Finished | None, *,
                   keep_provenance: bool = False) -> bool:
        """Run ``calls`` (the first MAX_CALLS_PER_STEP; the others are answered that they were
        not run), store the step, and move the run to the next reply; False when the run has
        ended here (stopped, or its rows gone), settled."""
        message_id = run.message_id
        run.extra_meta = {"tool_calls": calls}  # a stop from here keeps them, for continue
        run.fresh_cancel()  # the model call's ended with its stream; a stop sets this one
        context = ToolContext(owner=run.owner, conversation_id=run.conversation_id,
                              db=self.chats.db)
        results = []
        for index, call in enumerate(calls):
            if run.stop_reason:
                break
            run.send(tool_call_frame(message_id, index, call))
            name, arguments = call_parts(call)
            if index >= MAX_CALLS_PER_STEP:  # an upstream's parallel calls: a few at a time
                text, meta = (f"Error: not run: at most {MAX_CALLS_PER_STEP} tool calls are "
                              "run at once.", {"ms": 0.0, "error": "too_many_calls"})
            elif run.tools is None or name not in {t.name for t in run.tools}:
                text, meta = (f"Error: the tool {str(name)[:64]!r} is not enabled in this "
                              "conversation.", {"ms": 0.0, "error": "unknown_tool"})
            else:
                outcome = self.tools.call(name, arguments, context, run.cancel)
                text, meta = outcome.text, outcome.meta()
            result = result_message(call, index, name, text, meta)
            results.append(result)
            run.send(tool_result_frame(message_id, index, call, result))
        if run.stop_reason:
            # Stopped among the calls: the reply keeps them (meta.tool_calls) and ends
            # "stopped"; continue runs them again.
            self._settle(run, None, None)
            return False
        content, _, _ = split_reply(run.text, tools=True)
        provenance = None
        if not keep_provenance:
            _, provenance = run.outcome(finished, None)
        run.steps += 1
        last = run.steps >= self.tool_steps
        options = replace(run.options, tool_choice="none" if last else "auto",
                          grammar=answer_grammar(run.options.response_format) if last else
                          build_grammar(run.options.response_format, run.options.tools, "auto"))
        try:
            stored = self.chats.store_tool_step(
                message_id, content, provenance, calls, results,
                self._provenance(run.engine, run.model, options), run_owner=self.identity,
                **self._files_fit(run.model, options))
        except Exception:
            log.exception("chat %s: could not store a tool step", short(run.conversation_id))
            run.settle(error_frame(AppError("internal", "the tool step could not be stored"),
                                   message_id))
            return False
        if stored is None:
            run.settle(error_frame(AppError("not_found", "the conversation was deleted while "
                                            "replying"), message_id))
            return False
        message, tools, following, history = stored
        run.options = options
        run.fresh_cancel()  # an engine sets the last one when its stream ends
        with self._lock:
            self.runs.pop(message_id, None)
            self._aliases[message_id] = run
            self.runs[following["id"]] = run
        run.next_step(following["id"], history, step_frame(message_id, message, tools, following))
        return True

    def _settle(self, run: Run, finished: Finished | None, error: EngineError | None) -> None:
        """The reply's final state, stored (or kept in memory for a /v1 call not stored),
        then the final frame to its watchers."""
        status, provenance = run.outcome(finished, error)
        if not run.stored:  # the same message a stored reply's final frame carries
            message = Message(public_id=run.message_id, role="assistant", content=run.text,
                              status=status)
            message.record(provenance)
            run.settle(final_frame(message.to_dict()))
            return
        try:
            stored = self.rows.finish(run.message_id, run.text, status, provenance)
        except Exception:
            # The row stays "streaming" with its last flush; the reaper interrupts it later.
            log.exception("chat %s: could not store the reply", short(run.conversation_id))
            run.settle(error_frame(AppError("internal", "the reply could not be stored"),
                                   run.message_id))
            return
        if stored is None:
            log.warning("chat %s: deleted during generation; reply dropped",
                        short(run.conversation_id))
            run.settle(error_frame(AppError("not_found", "the conversation was deleted while "
                                            "replying"), run.message_id))
            return
        log.info("chat %s: reply %s (%s tokens, %.1fs)", short(run.conversation_id), status,
                 provenance.completion_tokens, time.perf_counter() - run.started_at)
        run.settle(final_frame(stored))

    # -- runs for /v1: the client's whole message list, stored or not ------------------------
    def start_api(
        self, owner: str, messages: list[dict[str, Any]], *, model: Any, options: GenerationOptions,
        store: bool, ip: str | None = None, watcher: Watcher | None = None, n: int = 1,
    ) -> list[Run]:
        """``n`` replies to ``messages`` as an OpenAI client sent them (tool turns included),
        run side by side, each one of the owner's replies in flight; with a seed, reply ``i``
        takes seed + i, so the same seed gives the same ``n`` replies. With ``store`` the call
        becomes a conversation of ``owner`` (source "api") whose reply is the first (a
        conversation has one reply to a message; the others are kept only in memory); without,
        nothing is written and each final frame carries its reply."""
        model, engine = self.engines.resolve(model)
        seed = options.seed  # an int64: seed + i wraps round within it, as upstreams take it
        choices = [options if seed is None else
                   replace(options, seed=(seed + i - INT64[0]) % 2**64 + INT64[0])
                   for i in range(n)]
        with self._admitted(owner, ip, n, [model]) as lease:
            conv, reply = None, None
            if store:
                conv, reply = self.chats.begin_api_reply(
                    owner, messages, self._provenance(engine, model, options),
                    run_owner=self.identity)
            parts = lease.split(n)  # each run gives back its own when it ends
        runs: list[Run] = []
        try:
            for i, (parsed, part) in enumerate(zip(choices, parts, strict=True)):
                runs.append(self._launch(owner, model, engine, parsed, messages, watcher, part,
                                         conv=conv if i == 0 else None,
                                         reply=reply if i == 0 else None))
        except BaseException:
            for run in runs:  # the caller gets an error, so nobody will read these
                run.stop("disconnect")
            raise
        finally:
            for part in parts[len(runs):]:  # the runs that did not start
                part.release()
        return runs

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop every run and keep what it wrote, marked "interrupted"."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        runs = self.live_runs()
        for run in runs:
            run.stop("shutdown")
        deadline = time.monotonic() + timeout
        for run in runs:
            run.finished.wait(max(0.0, deadline - time.monotonic()))
        self.keeper.close([run for run in runs if not run.finished.is_set()])
        with self._lock:
            for follower in self._followers.values():
                follower.end()
        if self.listener is not None:
            self.listener.close()
