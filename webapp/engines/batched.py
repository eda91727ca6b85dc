"""The embedded engine's one decode path: an inference thread per model that decodes every
active chat of it together, the way llama.cpp's ``parallel`` example and llama-server's slots
do (BCHAT_PARALLEL=1 is one slot).

A ``Llama`` object is not thread-safe (two threads at once abort the process) and calling it
from changing threads costs ~40% speed, so each loaded model is owned by this one thread.
Requests reach it through a FIFO queue; tokens come back through a per-request queue; stop is
a ``threading.Event`` checked at every step.

One llama.cpp context holds ``parallel`` sequences (slots), each with its own KV cells
(``n_ctx`` tokens per slot: the context is split so one chat cannot starve the others). Each
step builds one ``llama_batch`` with the next token of every generating slot plus a chunk of a
newly arrived prompt, decodes it once, and samples each slot with its own sampler chain. A
finished, stopped or disconnected chat leaves its slot at the end of that step and the next
queued request takes it; requests beyond the slots wait in arrival order and are told their
place. A slot keeps its cache after a chat, and a request whose history starts the same way
(the next turn of that conversation) is placed in it and evaluates only the new tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..catalogue import ModelFile
from ..options import GenerationOptions
from .base import Chunk, EngineError, Finished, Queued, Token
from .inference import (
    DONE,
    PromptBuilder,
    ReplyText,
    Request,
    as_engine_error,
    check_logit_bias,
    drain,
    ended,
    logprob_entries,
    sampler_chain,
    start_grammar,
)

log = logging.getLogger(__name__)

PROMPT_CHUNK = 256  # prompt tokens per step: bounds how long the other chats wait for a step
N_BATCH = 512
# The longest one slot's grammar may take to choose one token before that chat fails with
# grammar_too_slow: every other chat in the batch waits for it. The schema limits keep a
# grammar's worst token near 0.3 s (SmolLM2's 49k vocabulary, bench/structured_speed.py).
GRAMMAR_TOKEN_SECONDS = 2.0
# A step (one token for every chat, plus at most PROMPT_CHUNK prompt tokens) longer than this
# is slow; a batch whose steps are all slow for the watchdog's time is reported by /healthz.
SLOW_STEP_SECONDS = 2.0
LOAD_POLL_SECONDS = 0.1  # how often a request waiting for its model to load looks at its stop


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this slot holds
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    # Positions minus cells so far: an image under M-RoPE advances fewer positions than the
    # cells it takes (vision.ImageChunk.n_pos); 0 otherwise. shifts: (cells, pos_shift) after
    # each image in the cache, to know the shift of a prefix kept for the next request.
    pos_shift: int = 0
    shifts: list[tuple[int, int]] = field(default_factory=list)
    sampler: Any = None
    grammar: Any = None  # this request's grammar sampler, checked lazily (see _sample_picked)
    last_token: int | None = None
    n_generated: int = 0
    max_tokens: int = 0
    prompt_tokens: int = 0
    started: float = 0.0  # when it took the slot: its prompt_ms counts from here
    first_token_at: float = 0.0  # when its first token was sampled: its decode_ms counts from here
    text: ReplyText | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    logits_index: int = -1  # where this slot's logits are in the current batch, or -1
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # entries not yet sent


# llama_token_data as numpy sees it: the candidates array is built from the logits in one go.
_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]


class ModelWorker:
    """One inference thread that owns one loaded model and runs up to ``parallel`` requests at
    once, in one ``llama_batch`` per step."""

    grammar_token_seconds = GRAMMAR_TOKEN_SECONDS

    def __init__(
        self, model: ModelFile, *, n_ctx: int, n_threads: int, n_gpu_layers: int,
        parallel: int = 1, chat_template: str | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.chat_template = chat_template
        self.n_ctx = min(n_ctx, model.context_length or n_ctx)
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self._slots: list[_Slot] = []
        self._requests: queue.Queue[Request | None] = queue.Queue()
        self._waiting: list[Request] = []  # submitted, not yet started; guarded by _lock
        self._lock = threading.Lock()
        self._turns = threading.Condition(self._lock)  # see submit
        self._tickets = self._turn = 0
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._beat = time.monotonic()  # last sign of progress of the inference thread
        self._slow_since: float | None = None  # when the steps of a busy batch became slow
        self._projector = None  # vision.Projector, when the model has one that loaded
        self._projector_error: str | None = None  # why the projector beside it did not load
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"llama:{model.id}", daemon=True)
        self._thread.start()

    # -- called from request threads -------------------------------------------------------
    def submit(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
        heartbeat: float | None = None,
    ) -> Iterator[Chunk]:
        request = Request(messages=messages, options=options, cancel=cancel)
        # Requests take their places in the queue in the order they came (tickets), not in the
        # order their fits happen to end: those that came while the model loaded are released
        # at once, and a short history must not overtake a long one that came first.
        with self._lock:
            ticket, self._tickets = self._tickets, self._tickets + 1
        # The history is fitted here, on the caller's thread, before the request is queued:
        # a long one costs its sender milliseconds and never holds up the other chats' tokens,
        # and one that cannot fit fails before it takes a place in the queue.
        outcome: Chunk | EngineError | None = None
        fitted = False
        try:
            while not self._loaded.wait(LOAD_POLL_SECONDS):
                if cancel.is_set():
                    outcome = Finished("stopped", 0, 0)
                    break
            else:
                self.wait_loaded()
                self._fit(request)
                fitted = True
        except Exception as exc:
            outcome = as_engine_error(exc, "the model could not read this conversation")
        finally:
            # Whatever happened, the turn passes on: a ticket never served would hold every
            # later request of this model.
            with self._turns:
                while self._turn != ticket:
                    self._turns.wait()
                if fitted:
                    self._waiting.append(request)
                    self._requests.put(request)
                    self._tell_positions()
                self._turn += 1
                self._turns.notify_all()
        return drain(request, heartbeat) if fitted else ended(outcome)

    def _fit(self, request: Request) -> None:
        from .structured import SchemaError, model_grammar, prompt_messages

        opts = request.options
        check_logit_bias(opts, self._n_vocab)
        try:  # the tool calls in the format this model's template writes them (Llama 3.x's…)
            grammar = model_grammar(opts, self._builder.tool_style)
        except SchemaError as exc:
            raise EngineError(str(exc), code="bad_grammar") from None
        if grammar != opts.grammar:
            request.options = opts = replace(opts, grammar=grammar)
        messages, media = self._images(request)
        messages, tools = prompt_messages(self._builder.tool_style, messages, opts.tools,
                                          opts.tool_choice)
        request.prompt, request.dropped, request.max_tokens = self._builder.fit(
            messages, opts.system, self.n_ctx, opts.max_tokens, tools, media
        )

    def _images(self, request: Request) -> tuple[list[dict[str, Any]], dict[str, list[int]] | None]:
        """The request's messages as text, and its images as the projector tokenizes them
        (decoded here, on the caller's thread, like the text: vision.Projector.picture)."""
        from .vision import prompt_media, split_images

        if not any(isinstance(m.get("content"), list) for m in request.messages):
            return request.messages, None
        messages, found = split_images(request.messages)
        if not found.markers:
            return messages, None
        if self._projector is None:
            why = (f"its image projector did not load ({self._projector_error})"
                   if self._projector_error else "it has no image projector")
            raise EngineError(f"{self.model.id} cannot be shown images: {why}",
                              code="images_not_supported")
        request.pictures = [self._projector.picture(data) for _, data in found.data]
        media, request.image_chunks = prompt_media(found.markers, request.pictures)
        return messages, media

    def _busy_slots(self) -> int:
        """How many requests are generating now (lock held)."""
        return sum(1 for s in self._slots if s.request is not None)

    def _tell_positions(self) -> None:
        """Tell each waiting request its place once every slot is taken (lock held)."""
        free = max(0, self.parallel - self._busy_slots())
        for index, waiting in enumerate(self._waiting):
            position = index - free + 1
            if position > 0 and position != waiting.position:
                waiting.position = position
                waiting.out.put(Queued(position=position))

    def activity(self) -> dict[str, Any]:
        with self._lock:
            running = self._busy_slots()
            return {"running": running > 0, "active": running, "waiting": len(self._waiting),
                    "slots": self.parallel}

    def busy(self) -> bool:
        with self._lock:
            return self._busy_slots() > 0

    def health(self, stuck_after: float) -> dict[str, Any] | None:
        """None when well; else what is wrong with the inference thread (for /healthz)."""
        if self._closed:
            return None
        if not self._thread.is_alive():
            return {"model": self.model.id, "problem": "dead",
                    "message": f"the inference thread of {self.model.id} has stopped"}
        idle = time.monotonic() - self._beat
        if self.busy() and idle > stuck_after:
            return {"model": self.model.id, "problem": "stuck",
                    "message": f"the inference thread of {self.model.id} has made no progress "
                               f"for {idle:.0f} s"}
        slow_since = self._slow_since
        if slow_since is not None and self.busy() and time.monotonic() - slow_since > stuck_after:
            return {"model": self.model.id, "problem": "slow",
                    "message": f"every step of {self.model.id}'s batch has been slow for "
                               f"{time.monotonic() - slow_since:.0f} s: its chats crawl"}
        return None

    def loaded(self) -> bool:
        return self._loaded.is_set() and not self._load_error

    def wait_loaded(self, timeout: float | None = None) -> None:
        self._loaded.wait(timeout)
        if self._load_error:
            raise EngineError(f"model {self.model.id} failed to load: {self._load_error}")

    def close(self) -> None:
        self._closed = True
        self._requests.put(None)

    # -- the inference thread --------------------------------------------------------------
    def _run(self) -> None:
        from llama_cpp import llama_cpp

        try:
            llama = self._load_small()
            builder = PromptBuilder(llama, self.chat_template)
            ctx, batch = self._new_context(llama)
        except BaseException as exc:
            self._load_failed(exc)
            return
        self._load_projector(llama)
        # Set before _loaded: request threads fit their histories with these (submit).
        self._llama, self._builder, self._ctx, self._batch = llama, builder, ctx, batch
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._loaded.set()
        import numpy as np

        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._slots = [_Slot(seq_id=i) for i in range(self.parallel)]
        try:
            while not self._closed:  # closed: the chats in flight end now, not when they finish
                try:
                    if not self._admit():
                        return  # closed
                    if any(s.request is not None for s in self._slots):
                        began = time.monotonic()
                        self._step()
                        if time.monotonic() - began <= SLOW_STEP_SECONDS:
                            self._slow_since = None
                        elif self._slow_since is None:
                            self._slow_since = began
                    else:
                        self._slow_since = None
                except Exception as exc:
                    # Whatever broke, it breaks the chats in flight, never the thread: every
                    # later chat to this model would hang.
                    log.exception("the batch of %s failed; failing its running chats", self.model.id)
                    for slot in self._slots:
                        if slot.request is not None:
                            self._fail_slot(slot, exc)
                self._beat = time.monotonic()
        finally:
            if self._closed:
                self._end_all(EngineError(f"model {self.model.id} was unloaded", code="model_unavailable"))
            else:  # something no handler catches killed the thread: its chats fail, never hang
                self._end_all(EngineError(f"the inference thread of {self.model.id} stopped",
                                          code="model_crashed"))
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
            if self._projector is not None:
                self._projector.close()

    def _load_small(self):
        """The model and its tokenizer through ``Llama``; its own context is kept tiny, since
        decoding happens in the multi-sequence context made by _new_context."""
        from llama_cpp import Llama

        started = time.perf_counter()
        llama = Llama(model_path=str(self.model.path), n_ctx=32, n_batch=32,
                      n_threads=self.n_threads, n_threads_batch=self.n_threads,
                      n_gpu_layers=self.n_gpu_layers, verbose=False)
        log.info("loaded %s for %d parallel chats of %d tokens (threads=%d) in %.2fs",
                 self.model.id, self.parallel, self.n_ctx, self.n_threads,
                 time.perf_counter() - started)
        return llama

    def _load_projector(self, llama) -> None:
        """The image projector beside the model (catalogue.projector_for), if any. One that
        does not load costs the model its images, not its text chats: they say why."""
        if not self.model.projector_path:
            return
        from .vision import Projector

        path = self.model.projector_path
        try:
            self._projector = Projector(path, llama.model, n_threads=self.n_threads,
                                        use_gpu=self.n_gpu_layers > 0)
        except Exception as exc:
            log.exception("could not load the image projector %s of %s", path.name, self.model.id)
            self._projector_error = str(exc)[:300]

    def _new_context(self, llama):
        from llama_cpp import llama_cpp

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.parallel
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = self.parallel
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.kv_unified = False  # each sequence owns n_ctx cells: no chat starves another
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(llama.model, params)
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        return ctx, batch

    def _end_all(self, error: EngineError) -> None:
        """The thread is leaving (closed): every chat it holds or that still waits ends with
        ``error``, so no reader waits for a token that will never come."""
        ending = [slot.request for slot in self._slots if slot.request is not None]
        while True:
            try:
                ending.append(self._requests.get_nowait())
            except queue.Empty:
                break
        for request in ending:
            if request is not None:
                request.out.put(error)
                request.out.put(DONE)

    def _load_failed(self, exc: BaseException) -> None:
        """Report the failure to every request from now on: never a dead, silent thread."""
        log.exception("could not load model %s", self.model.id, exc_info=exc)
        self._load_error = exc
        self._loaded.set()
        while True:
            request = self._requests.get()
            if request is None:
                return
            with self._lock:
                self._waiting.remove(request)
            request.out.put(EngineError(f"model {self.model.id} failed to load: {exc}"))
            request.out.put(DONE)

    # -- admission ---------------------------------------------------------------------------
    def _admit(self) -> bool:
        """Move waiting requests into free slots; block when there is nothing to do."""
        idle = all(s.request is None for s in self._slots)
        while True:
            free = [s for s in self._slots if s.request is None]
            if not free:
                return True
            try:
                request = self._requests.get(block=idle)
            except queue.Empty:
                return True
            if request is None:
                return False
            idle = False
            with self._lock:
                self._waiting.remove(request)
            if request.cancel.is_set():
                request.out.put(Finished("stopped", 0, 0))
                request.out.put(DONE)
                continue
            try:
                self._start(request, free)
            except Exception as exc:  # a template that raises, text that cannot be encoded…
                for slot in self._slots:
                    if slot.request is request:
                        self._release(slot)
                request.out.put(as_engine_error(exc, "the model could not read this conversation"))
                request.out.put(DONE)

    def _start(self, request: Request, free: list[_Slot]) -> None:
        from llama_cpp import llama_cpp

        from .vision import image_start

        opts = request.options
        prompt, dropped, max_tokens = request.prompt, request.dropped, request.max_tokens  # see submit
        # The free slot whose cache shares the longest start with this prompt.
        def shared(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.cached, prompt, strict=False):
                if a != b:
                    break
                n += 1
            return n

        slot = max(free, key=shared)
        if prompt and prompt[-1] < 0:  # no text after an image: no logits would ever come
            raise EngineError("the model's chat template ends the prompt with an image")
        # Re-decode at least one token for logits; an image the cache holds is kept whole
        # (its places' ids are its bytes': vision.placeholder) or evaluated again whole.
        keep = image_start(prompt, min(shared(slot), len(prompt) - 1))
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
        slot.cached = prompt[:keep]
        slot.pending = prompt[keep:]
        slot.shifts = [(end, shift) for end, shift in slot.shifts if end <= keep]
        slot.pos_shift = slot.shifts[-1][1] if slot.shifts else 0
        slot.request = request
        slot.grammar = self._grammar(opts)
        slot.sampler = sampler_chain(opts, self._n_vocab)
        slot.last_token = None
        slot.logprobs = []
        slot.n_generated = 0
        slot.max_tokens = max_tokens
        slot.prompt_tokens = len(prompt)
        slot.started = time.perf_counter()
        slot.text = ReplyText(opts.stop)
        slot.meta = {"n_ctx": self.n_ctx, "parallel": self.parallel, "prompt_cached": keep}
        if dropped:
            slot.meta["trimmed_messages"] = dropped
        with self._lock:
            self._tell_positions()

    def _grammar(self, opts):
        """This request's own grammar sampler (or None), so a schema or tool call constrains
        this slot only, never another chat in the batch."""
        return start_grammar(self._vocab, opts.grammar) if opts.grammar else None

    # -- one decode step ---------------------------------------------------------------------
    def _step(self) -> None:
        from llama_cpp import llama_cpp

        batch = self._batch
        n = 0
        for slot in self._slots:
            slot.logits_index = -1
            if slot.request is None:
                continue
            if slot.request.cancel.is_set():
                self._finish(slot, "stopped")
                continue
            if slot.pending and slot.pending[0] < 0:
                try:
                    self._evaluate_images(slot)
                except Exception as exc:  # this chat fails; the others in the batch go on
                    log.exception("an image failed for a chat on %s", self.model.id)
                    self._fail_slot(slot, exc)
                    continue
            if slot.last_token is not None:  # generating: its next token
                n = self._add(batch, n, slot, slot.last_token, logits=True)
                slot.last_token = None
        budget = min(PROMPT_CHUNK, N_BATCH - n)
        for slot in self._slots:  # prompt chunks, oldest request first (slot order is fine)
            if slot.request is None or not slot.pending or budget <= 0:
                continue
            # Text up to the next image: that is evaluated on its own, at the next step.
            text = next((i for i, token in enumerate(slot.pending) if token < 0),
                        len(slot.pending))
            take = min(budget, text)
            chunk, slot.pending = slot.pending[:take], slot.pending[take:]
            budget -= len(chunk)
            for i, token in enumerate(chunk):
                last = not slot.pending and i == len(chunk) - 1
                n = self._add(batch, n, slot, token, logits=last)
        if n == 0:
            return
        batch.n_tokens = n
        result = llama_cpp.llama_decode(self._ctx, batch)
        if result != 0:
            self._decode_failed(result)
            return
        now = time.perf_counter()
        for slot in self._slots:
            if slot.request is None or slot.logits_index < 0:
                continue
            try:
                self._sample(slot, now)
            except Exception as exc:  # this chat fails; the others in the batch go on
                if getattr(exc, "code", None) == "grammar_too_slow":
                    log.warning("%s on %s", exc, self.model.id)
                else:
                    log.exception("sampling failed for a chat on %s", self.model.id)
                self._fail_slot(slot, exc)

    def _evaluate_images(self, slot: _Slot) -> None:
        """The images at the head of the slot's prompt, into its sequence: encoded by the
        projector and decoded as embeddings in llama.cpp calls of their own, between steps
        (the text before them was decoded at an earlier step; a prompt ends in text, so the
        logits come from the batch as for any prompt). The other chats wait this long."""
        while slot.pending and slot.pending[0] < 0:
            chunk = slot.request.image_chunks[slot.pending[0]]
            position = len(slot.cached) + slot.pos_shift
            after = self._projector.evaluate(self._ctx, chunk, position, slot.seq_id, N_BATCH)
            slot.cached += slot.pending[:chunk.n_tokens]
            slot.pending = slot.pending[chunk.n_tokens:]
            slot.pos_shift += (after - position) - chunk.n_tokens
            slot.shifts.append((len(slot.cached), slot.pos_shift))

    def _sample(self, slot: _Slot, now: float) -> None:
        """Choose the slot's next token from this step's logits (``now``: when they came)."""
        from llama_cpp import llama_cpp

        entry = None
        if slot.grammar is not None:
            began = time.perf_counter()
            token, entry = self._sample_picked(slot)
            spent = time.perf_counter() - began
            if spent > self.grammar_token_seconds:
                raise EngineError(
                    f"the response format's grammar took {spent:.1f} s to choose one token (the "
                    f"limit is {self.grammar_token_seconds:g} s, as every other chat waits for "
                    f"it): simplify the schema", code="grammar_too_slow")
        elif slot.request.options.logprobs:
            token, entry = self._sample_picked(slot)
        else:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.logits_index)
        if "prompt_ms" not in slot.meta:
            slot.meta["prompt_ms"] = round((now - slot.started) * 1000, 1)
            slot.first_token_at = now
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        slot.n_generated += 1
        if entry is not None:
            slot.logprobs.append(entry)
        text = slot.text.feed(self._llama.detokenize([token]))
        if text:
            slot.request.out.put(Token(text, slot.logprobs or None))
            slot.logprobs = []
        if slot.text.stopped:
            slot.meta["stop_string"] = True
            self._finish(slot, "stop")
        elif slot.n_generated >= slot.max_tokens:
            self._finish(slot, "length")
        elif len(slot.cached) + 1 >= self.n_ctx:
            slot.meta["context_full"] = True
            self._finish(slot, "length")
        else:
            slot.last_token = token

    def _pick(self, slot: _Slot, *samplers):
        """The token ``samplers`` choose from the slot's logits and, for logprobs, what
        survives them (llama.cpp's candidates: ids, logits) and the index of that token."""
        import ctypes

        import numpy as np
        from llama_cpp import llama_cpp

        data = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        data["id"] = self._token_ids
        data["logit"] = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._ctx, slot.logits_index), shape=(self._n_vocab,))
        data["p"] = 0.0
        candidates = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=self._n_vocab, selected=-1, sorted=False)
        for sampler in samplers:
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        if candidates.selected < 0:
            raise EngineError("the sampler chose no token", code="model_failed")
        token = int(candidates.data[candidates.selected].id)
        if not slot.request.options.logprobs:
            return token, None, -1
        # The samplers sort and cut in place (or point into a buffer of their own).
        size = candidates.size * data.itemsize
        start = ctypes.addressof(candidates.data.contents)
        survivors = np.frombuffer(ctypes.string_at(start, size), dtype=_TOKEN_DATA)
        return token, survivors, candidates.selected

    def _sample_picked(self, slot: _Slot) -> tuple[int, dict[str, Any] | None]:
        """The token, and its logprobs entry where asked for, chosen outside
        llama_sampler_sample: the probabilities are read off the candidates the chain leaves.

        Under a grammar, as llama.cpp's own sampler does: pick a token without it, then ask the
        grammar about that one token, and only when it refuses, mask the whole vocabulary and
        pick again. Masking every candidate (49k for SmolLM2) costs ~8 ms a token, as much as
        the decode itself; most picks are allowed as they are."""
        import ctypes

        from llama_cpp import llama_cpp

        token, survivors, selected = self._pick(slot, slot.sampler)
        if slot.grammar is not None:
            one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            single = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
            llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(single))
            if one[0].logit == float("-inf"):  # not allowed here: choose among what is
                token, survivors, selected = self._pick(slot, slot.grammar, slot.sampler)
            llama_cpp.llama_sampler_accept(slot.grammar, token)
        llama_cpp.llama_sampler_accept(slot.sampler, token)
        opts = slot.request.options
        if survivors is None:
            return token, None
        piece = self._llama.detokenize
        return token, logprob_entries(survivors, selected, opts.top_logprobs or 0,
                                      lambda t: piece([t]))

    def _add(self, batch, n: int, slot: _Slot, token: int, *, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = len(slot.cached) + slot.pos_shift
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = slot.seq_id
        batch.logits[n] = 1 if logits else 0
        slot.cached.append(token)
        if logits:
            slot.logits_index = n
        return n + 1

    def _finish(self, slot: _Slot, reason: str) -> None:
        from llama_cpp import llama_cpp

        request = slot.request
        tail = slot.text.tail()
        if tail or (slot.logprobs and not slot.text.stopped):  # a stop string's are not sent
            request.out.put(Token(tail, slot.logprobs or None))
        if reason == "stopped":
            # Its cells go at once; what it was in the middle of is of no use to a next turn.
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, 0, -1)
            slot.cached, slot.shifts = [], []
        if slot.n_generated > 1:
            # Measured here, where the tokens are made: a reader (another process, a busy web
            # thread) gets them in bursts, so timing their arrival overstates the speed.
            slot.meta["decode_ms"] = round((time.perf_counter() - slot.first_token_at) * 1000, 1)
        request.out.put(Finished(finish_reason=reason, prompt_tokens=slot.prompt_tokens,
                                 completion_tokens=slot.n_generated, meta=slot.meta))
        request.out.put(DONE)
        self._free_samplers(slot)
        slot.request = None
        slot.pending = []
        slot.last_token = None

    @staticmethod
    def _free_samplers(slot: _Slot) -> None:
        from llama_cpp import llama_cpp

        for sampler in (slot.sampler, slot.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        slot.sampler = slot.grammar = None

    def _release(self, slot: _Slot) -> None:
        """Free a slot and forget its cache (its state is unknown after a failure)."""
        from llama_cpp import llama_cpp

        self._free_samplers(slot)
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, 0, -1)
        slot.request = None
        slot.cached, slot.pending, slot.last_token = [], [], None
        slot.shifts = []

    def _fail_slot(self, slot: _Slot, exc: BaseException) -> None:
        request = slot.request
        self._release(slot)
        if request is not None:
            request.out.put(as_engine_error(exc, "the model failed while replying"))
            request.out.put(DONE)
        with self._lock:
            self._tell_positions()

    def _decode_failed(self, result: int) -> None:
        from llama_cpp import llama_cpp

        log.error("llama_decode returned %d on %s; failing the running chats", result, self.model.id)
        for slot in self._slots:
            if slot.request is not None:
                slot.request.out.put(EngineError(f"llama.cpp failed to decode (code {result})"))
                slot.request.out.put(DONE)
                self._free_samplers(slot)
                slot.request = None
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, 0, -1)
            slot.cached, slot.pending, slot.last_token = [], [], None
            slot.shifts = []
