"""Continuous batching for the embedded engine: one inference thread decodes every active chat
of a model together, the way llama.cpp's ``parallel`` example and llama-server's slots do.

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

import codecs
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from .base import EngineError, Finished, Token
from .llamacpp import _DONE, ModelWorker, PromptBuilder, _Request, penalties_sampler, start_grammar
from .structured import StopMatcher

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


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this slot holds
    request: _Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    sampler: Any = None
    grammar: Any = None  # this request's grammar sampler, checked lazily (see _sample_constrained)
    last_token: int | None = None
    n_generated: int = 0
    max_tokens: int = 0
    prompt_tokens: int = 0
    started: float = 0.0
    first_at: float | None = None
    last_at: float | None = None
    decoder: Any = None
    stop: StopMatcher | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    logits_index: int = -1  # where this slot's logits are in the current batch, or -1


# llama_token_data as numpy sees it: the candidates array is built from the logits in one go.
_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]


class BatchedModelWorker(ModelWorker):
    """A ModelWorker whose inference thread runs up to ``parallel`` requests at once."""

    grammar_token_seconds = GRAMMAR_TOKEN_SECONDS

    def __init__(self, model, *, parallel: int, **settings) -> None:
        self.parallel = self.slots = parallel
        self._slots: list[_Slot] = []
        super().__init__(model, **settings)

    # -- called from request threads -------------------------------------------------------
    def _busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    def activity(self) -> dict[str, Any]:
        with self._lock:
            running = self._busy_slots()
            return {"running": running > 0, "active": running, "waiting": len(self._waiting),
                    "slots": self.parallel}

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
        # Set before _loaded: request threads fit their histories with the builder (submit).
        self._llama, self._builder, self._ctx, self._batch = llama, builder, ctx, batch
        self._loaded.set()
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        import numpy as np

        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._slots = [_Slot(seq_id=i) for i in range(self.parallel)]
        try:
            while True:
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
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)

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
                request.out.put(Finished("stopped", 0, 0, None))
                request.out.put(_DONE)
                continue
            try:
                self._start(request, free)
            except Exception as exc:  # a template that raises, text that cannot be encoded…
                for slot in self._slots:
                    if slot.request is request:
                        self._release(slot)
                request.out.put(_as_engine_error(exc, "the model could not read this conversation"))
                request.out.put(_DONE)

    def _start(self, request: _Request, free: list[_Slot]) -> None:
        from llama_cpp import llama_cpp

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
        keep = min(shared(slot), len(prompt) - 1)  # re-decode at least one token for logits
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
        slot.cached = prompt[:keep]
        slot.pending = prompt[keep:]
        slot.request = request
        slot.grammar = self._grammar(opts)
        slot.sampler = self._sampler(opts)
        slot.last_token = None
        slot.n_generated = 0
        slot.max_tokens = max_tokens
        slot.prompt_tokens = len(prompt)
        slot.started = time.perf_counter()
        slot.first_at = slot.last_at = None
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.stop = StopMatcher(opts.stop)
        slot.meta = {"n_ctx": self.n_ctx, "parallel": self.parallel, "prompt_cached": keep}
        if dropped:
            slot.meta["trimmed_messages"] = dropped
        with self._lock:
            self._tell_positions()

    def _grammar(self, opts):
        """This request's own grammar sampler (or None), so a schema or tool call constrains
        this slot only, never another chat in the batch."""
        return start_grammar(self._vocab, opts.grammar) if opts.grammar else None

    def _sampler(self, opts):
        """This request's own sampler chain (penalties, then greedy or top-k/top-p/min-p/temp)."""
        from llama_cpp import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            if opts.presence_penalty or opts.frequency_penalty:
                llama_cpp.llama_sampler_chain_add(chain, penalties_sampler(opts))
        except BaseException:
            llama_cpp.llama_sampler_free(chain)
            raise
        if opts.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        seed = opts.seed if opts.seed is not None else int(time.time_ns() & 0xFFFFFFFF)
        for sampler in (
            llama_cpp.llama_sampler_init_top_k(40),
            llama_cpp.llama_sampler_init_top_p(opts.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(0.05, 1),
            llama_cpp.llama_sampler_init_temp(opts.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

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
            if slot.last_token is not None:  # generating: its next token
                n = self._add(batch, n, slot, slot.last_token, logits=True)
                slot.last_token = None
        budget = min(PROMPT_CHUNK, N_BATCH - n)
        for slot in self._slots:  # prompt chunks, oldest request first (slot order is fine)
            if slot.request is None or not slot.pending or budget <= 0:
                continue
            chunk, slot.pending = slot.pending[:budget], slot.pending[budget:]
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

    def _sample(self, slot: _Slot, now: float) -> None:
        from llama_cpp import llama_cpp

        if slot.grammar is not None:
            began = time.perf_counter()
            token = self._sample_constrained(slot)
            spent = time.perf_counter() - began
            if spent > self.grammar_token_seconds:
                raise EngineError(
                    f"the response format's grammar took {spent:.1f} s to choose one token (the "
                    f"limit is {self.grammar_token_seconds:g} s, as every other chat waits for "
                    f"it): simplify the schema", code="grammar_too_slow")
        else:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.logits_index)
        if slot.first_at is None:
            slot.first_at = now
            slot.meta["prompt_ms"] = round((now - slot.started) * 1000, 1)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        slot.n_generated += 1
        slot.last_at = now
        text, stopped = slot.stop.feed(slot.decoder.decode(self._llama.detokenize([token])))
        if text:
            slot.request.out.put(Token(text))
        if stopped:
            slot.meta["stop_string"] = True
            self._finish(slot, "stop")
        elif slot.n_generated >= slot.max_tokens:
            self._finish(slot, "length")
        elif len(slot.cached) + 1 >= self.n_ctx:
            slot.meta["context_full"] = True
            self._finish(slot, "length")
        else:
            slot.last_token = token

    def _sample_constrained(self, slot: _Slot) -> int:
        """Sample under a grammar the way llama.cpp's own sampler does: pick a token without
        it, then ask the grammar about that one token, and only when it refuses, mask the whole
        vocabulary and pick again. Masking every candidate (49k for SmolLM2) costs ~8 ms a
        token, as much as the decode itself; most picks are allowed as they are."""
        import ctypes

        import numpy as np
        from llama_cpp import llama_cpp

        n_vocab = self._n_vocab
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._ctx, slot.logits_index), shape=(n_vocab,))

        def pick(*samplers) -> int:
            data = np.empty(n_vocab, dtype=_TOKEN_DATA)
            data["id"] = self._token_ids
            data["logit"] = logits
            data["p"] = 0.0
            candidates = llama_cpp.llama_token_data_array(
                data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                size=n_vocab, selected=-1, sorted=False)
            for sampler in samplers:
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if candidates.selected < 0:
                raise EngineError("the sampler chose no token", code="model_failed")
            return int(candidates.data[candidates.selected].id)

        token = pick(slot.sampler)
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        single = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(single))
        if one[0].logit == float("-inf"):  # not allowed here: choose among what is
            token = pick(slot.grammar, slot.sampler)
        llama_cpp.llama_sampler_accept(slot.grammar, token)
        llama_cpp.llama_sampler_accept(slot.sampler, token)
        return token

    def _add(self, batch, n: int, slot: _Slot, token: int, *, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = len(slot.cached)
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
        tail = slot.decoder.decode(b"", final=True)
        if slot.stop is not None:
            if slot.meta.get("stop_string"):
                tail = ""  # the reply ended at the stop string: nothing after it is sent
            else:
                tail, hit = slot.stop.feed(tail)
                tail += "" if hit else slot.stop.flush()
            slot.stop = None
        if tail:
            request.out.put(Token(tail))
        if reason == "stopped":
            # Its cells go at once; what it was in the middle of is of no use to a next turn.
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, 0, -1)
            slot.cached = []
        tps = None
        if slot.n_generated > 1 and slot.first_at and slot.last_at and slot.last_at > slot.first_at:
            tps = round((slot.n_generated - 1) / (slot.last_at - slot.first_at), 2)
        request.out.put(Finished(finish_reason=reason, prompt_tokens=slot.prompt_tokens,
                                 completion_tokens=slot.n_generated, tokens_per_second=tps,
                                 meta=slot.meta))
        request.out.put(_DONE)
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

    def _fail_slot(self, slot: _Slot, exc: BaseException) -> None:
        request = slot.request
        self._release(slot)
        if request is not None:
            request.out.put(_as_engine_error(exc, "the model failed while replying"))
            request.out.put(_DONE)
        with self._lock:
            self._tell_positions()

    def _decode_failed(self, result: int) -> None:
        from llama_cpp import llama_cpp

        log.error("llama_decode returned %d on %s; failing the running chats", result, self.model.id)
        for slot in self._slots:
            if slot.request is not None:
                slot.request.out.put(EngineError(f"llama.cpp failed to decode (code {result})"))
                slot.request.out.put(_DONE)
                self._free_samplers(slot)
                slot.request = None
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, 0, -1)
            slot.cached, slot.pending, slot.last_token = [], [], None



def _as_engine_error(exc: BaseException, what: str) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    return EngineError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
