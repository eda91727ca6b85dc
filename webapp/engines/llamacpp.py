"""The embedded llama.cpp engine: GGUF files run in this process through llama-cpp-python.

A ``Llama`` object is not thread-safe (two threads at once abort the process) and calling it
from changing threads costs ~40% speed, so each loaded model is owned by one long-lived
inference thread (``ModelWorker``). Requests reach it through a FIFO queue; tokens come back
through a per-request queue; stop is a ``threading.Event`` checked between tokens, and during
prompt evaluation through llama.cpp's abort callback.
"""

from __future__ import annotations

import codecs
import logging
import queue
import re
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..model_files import ModelCatalogue, ModelFile
from ..options import GenerationOptions
from .base import (
    Chunk,
    ContextTooLong,
    EngineError,
    Finished,
    Idle,
    ModelInfo,
    Queued,
    Token,
    UnknownModel,
)

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # tokens the presence/frequency penalties look back over

# Smallest reply room worth generating into when a long prompt barely fits.
MIN_REPLY_TOKENS = 16


@dataclass
class _Request:
    messages: list[dict[str, str]]
    options: GenerationOptions
    cancel: threading.Event
    out: queue.Queue = field(default_factory=queue.Queue)
    position: int = 0  # last place in the queue the request was told
    # Fitted on the request's own thread before it is queued (ModelWorker.submit).
    prompt: list[int] = field(default_factory=list)
    dropped: int = 0  # oldest messages left out to fit the context
    max_tokens: int = 0  # the reply room left


_DONE = object()  # end-of-stream marker on a request's out queue

LOAD_POLL_SECONDS = 0.1  # how often a request waiting for its model to load looks at its stop


def as_engine_error(exc: BaseException, what: str) -> EngineError:
    """``exc`` as the EngineError a chat fails with (a template that raises, text that cannot
    be encoded…): its type and a bounded piece of its message."""
    if isinstance(exc, EngineError):
        return exc
    return EngineError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")


def ended(last: Chunk | EngineError) -> Iterator[Chunk]:
    """A stream that never reached the inference thread: one Finished, or one failure."""
    if isinstance(last, EngineError):
        raise last
    yield last


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def fallback_template(setting: str | None) -> str | None:
    """BCHAT_CHAT_TEMPLATE: "chatml", or a file holding a Jinja chat template."""
    if not setting:
        return None
    if setting == "chatml":
        return CHATML_TEMPLATE
    from pathlib import Path

    return Path(setting).read_text()


def start_grammar(vocab, grammar: str):
    """A grammar sampler for ``grammar`` (GBNF, root rule "root"); EngineError when llama.cpp
    cannot compile it (it returns NULL and logs why), failing that request only."""
    from llama_cpp import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise EngineError("llama.cpp could not compile the grammar for this response format",
                          code="bad_grammar")
    return sampler


def penalties_sampler(options: GenerationOptions):
    """OpenAI's presence and frequency penalties, over the last PENALTY_LAST_N tokens."""
    from llama_cpp import llama_cpp

    # The binding declares an older five-argument form (n_vocab first) while newer llama.cpp
    # takes four: both integers get the same value, so either reading means "last 64 tokens".
    return llama_cpp.llama_sampler_init_penalties(
        PENALTY_LAST_N, PENALTY_LAST_N, 1.0, options.frequency_penalty, options.presence_penalty
    )


class TokenCache:
    """Token lists of texts seen lately, least recently used first out, bounded by characters.

    Shared by the request threads that fit histories: the next turn of a conversation finds
    its earlier messages here and tokenizes only the new one."""

    def __init__(self, max_chars: int = 2_000_000) -> None:
        self.max_chars = max_chars
        # Tokens as array("i"): 4 bytes each, where a list of ints takes ~36.
        self._entries: OrderedDict[str, array] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, text: str) -> array | None:
        with self._lock:
            tokens = self._entries.get(text)
            if tokens is not None:
                self._entries.move_to_end(text)
            return tokens

    def put(self, text: str, tokens: array) -> None:
        if len(text) > self.max_chars // 8:
            return  # one huge text would push out everything else
        with self._lock:
            if text in self._entries:
                return
            self._entries[text] = tokens
            self._chars += len(text)
            while self._chars > self.max_chars:
                old, _ = self._entries.popitem(last=False)
                self._chars -= len(old)


def special_splitter(vocab) -> re.Pattern[str] | None:
    """A pattern finding the special tokens a prompt can be cut before without changing how
    it tokenizes: llama.cpp splits text at special tokens first and tokenizes the pieces
    between them one by one, so pieces that start at one tokenize alone the same. Left out:
    tokens that strip whitespace to their left (the cut would keep it)."""
    from llama_cpp import llama_cpp

    special = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
               | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
    texts = set()
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & special and not attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP:
            text = (llama_cpp.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")
            if len(text) > 1:  # a one-character "special" token would cut everywhere
                texts.add(text)
    if not texts:
        return None
    # Longest first, as llama.cpp matches them.
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


class PromptBuilder:
    """Formats messages with the model's own chat template and fits them into the context.

    Safe to use from any thread while the inference thread decodes: it renders in Python and
    tokenizes with the model's vocabulary only (llama_tokenize reads the vocabulary, never the
    context), the way llama-server tokenizes in its HTTP threads."""

    def __init__(self, llama, fallback: str | None = None) -> None:
        from llama_cpp import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llama.metadata.get("tokenizer.chat_template") or fallback
        if not template:
            raise EngineError(
                "this model has no chat template in its GGUF metadata, so it cannot chat "
                "(a base model? BCHAT_CHAT_TEMPLATE can supply one)",
                code="no_chat_template",
            )
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        self._llama = llama  # holds the model (and so its vocabulary) alive
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        self._splitter = special_splitter(self._vocab)
        self._cache = TokenCache()

    def text(self, messages: list[dict[str, str]]) -> str:
        """The prompt, formatted by the model's template. A trailing assistant message is a
        reply being continued: the prompt opens the assistant turn and ends with its text, so
        the model writes on from there instead of starting a new turn."""
        prefix = ""
        if messages and messages[-1]["role"] == "assistant":
            prefix = messages[-1]["content"]
            messages = messages[:-1]
        return self._formatter(messages=messages).prompt + prefix

    def tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's tokens (the template writes BOS itself when the model wants one)."""
        return self.tokenize(self.text(messages))

    def tokenize(self, text: str) -> list[int]:
        """``text`` tokenized as llama.cpp does with special tokens parsed, piece by piece.

        llama.cpp's own special-token pass is quadratic in the number of special tokens (a
        prompt of 800 short messages takes ~90 ms, 8,000 over 10 s), so the text is cut before
        each special token, the pieces are tokenized alone (the same tokens: see
        special_splitter) and remembered: a message seen before costs a dictionary look-up."""
        tokens: list[int] = []
        start = 0
        if self._splitter is not None:
            for match in self._splitter.finditer(text):
                if match.start() > start:
                    tokens += self._piece(text[start:match.start()])
                    start = match.start()
        if start < len(text):
            tokens += self._piece(text[start:])
        return tokens

    def _piece(self, text: str) -> array:
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = array("i", self._llama_tokenize(text.encode("utf-8")))
            self._cache.put(text, tokens)
        return tokens

    def _llama_tokenize(self, data: bytes) -> list[int]:
        from llama_cpp import llama_cpp

        size = len(data) + 8  # a token covers at least one byte; a space may be prefixed
        while True:
            buffer = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, size, False, True)
            if n >= 0:
                return buffer[:n]
            if -n <= size:
                raise EngineError("llama.cpp could not tokenize this conversation")
            size = -n

    def fit(
        self, messages: list[dict[str, str]], system: str | None, n_ctx: int, max_tokens: int
    ) -> tuple[list[int], int, int]:
        """Drop the oldest turns until prompt + reply room fits ``n_ctx``.

        Returns (prompt tokens, number of messages dropped, max_tokens actually allowed). The
        system prompt and the newest message are never dropped; if those alone do not fit,
        raises ContextTooLong. Turns are dropped whole (the kept ones start at a user message);
        a reply being continued stays with the newest message.

        The answer is the first cut of that sequence whose prompt fits: found by search, not
        one cut at a time, so a history of 10,000 messages renders a handful of times, never
        more than what fits plus a little (see FitSearch)."""
        head = [{"role": "system", "content": system}] if system else []
        if not system and messages and messages[0]["role"] == "system":
            head, messages = messages[:1], messages[1:]
        reserve = min(max_tokens, max(n_ctx // 4, MIN_REPLY_TOKENS))
        turns = list(messages)
        # The newest message, and a reply being continued after it, are never dropped.
        keep = 2 if len(turns) > 1 and turns[-1]["role"] == "assistant" else 1
        cuts = cut_points([t["role"] for t in turns], keep)
        search = FitSearch(self, head, turns, cuts, n_ctx - reserve)
        best = search.first_fitting()
        if best is None:
            best = len(cuts) - 1
            tokens = search.exact(best)
            if len(tokens) + MIN_REPLY_TOKENS > n_ctx:
                raise ContextTooLong(
                    f"the message is {len(tokens)} tokens with its template; this model's "
                    f"context holds {n_ctx} tokens including the reply. Shorten the message."
                )
            # else the newest message fits, with a shorter reply than asked
        tokens = search.exact(best)
        return tokens, cuts[best], min(max_tokens, n_ctx - len(tokens))


def cut_points(roles: list[str], keep: int) -> list[int]:
    """How many of the oldest turns each try drops, in the order trimming tries them: one more
    turn each time, then on to the next user message, never into the last ``keep`` turns."""
    n = len(roles)
    cuts = [0]
    cut = 0
    while n - cut > keep:
        cut += 1
        while n - cut > keep and roles[cut] != "user":
            cut += 1
        cuts.append(cut)
    return cuts


class FitSearch:
    """The first of the cuts whose prompt has at most ``limit`` tokens.

    A prompt's length only grows with the turns it keeps, so the first fitting cut is found by
    bisection. An exact length costs a render and the tokens of every kept turn (llama.cpp's
    BPE tokenizers take ~1 µs a character), so the tries are guided by an estimate: the
    characters a cut keeps, each turn counted TURN_CHARS longer for its template, times the
    tokens per character the exact lengths seen so far show. It lands on the answer in two or
    three tries; if it does not, the search steps back from the newest turns, doubling, then
    bisects, so it never tokenizes much more than what fits."""

    GUIDED_TRIES = 4
    TURN_CHARS = 16

    def __init__(self, builder: PromptBuilder, head, turns, cuts: list[int], limit: int) -> None:
        self.builder, self.head, self.turns, self.cuts, self.limit = builder, head, turns, cuts, limit
        self._exact: dict[int, list[int]] = {}
        # after[i]: the weighted characters of turns[i:].
        after = [0] * (len(turns) + 1)
        for i in range(len(turns) - 1, -1, -1):
            after[i] = after[i + 1] + len(turns[i]["content"]) + self.TURN_CHARS
        self._after = after
        self._head_chars = sum(len(m["content"]) + self.TURN_CHARS for m in head)

    def exact(self, j: int) -> list[int]:
        tokens = self._exact.get(j)
        if tokens is None:
            tokens = self._exact[j] = self.builder.tokens(self.head + self.turns[self.cuts[j]:])
        return tokens

    def fits(self, j: int) -> bool:
        return len(self.exact(j)) <= self.limit

    def _chars(self, j: int) -> int:
        return self._after[self.cuts[j]]

    def _guess(self, lo: int, hi: int, per_char: float) -> int:
        """The first cut in (lo, hi] the estimate says fits."""
        base, low, high = len(self.exact(hi)) - per_char * self._chars(hi), lo + 1, hi
        while low < high:
            mid = (low + high) // 2
            if base + per_char * self._chars(mid) <= self.limit:
                high = mid
            else:
                low = mid + 1
        return low

    def first_fitting(self) -> int | None:
        last = len(self.cuts) - 1
        if not self.fits(last):
            return None  # nor does any cut keeping more
        # Each turn is taken to add at least a token, so guided tries keep at most `limit`.
        n = len(self.turns)
        floor = next(j for j, cut in enumerate(self.cuts) if n - cut <= self.limit)
        lo, hi = -1, last
        per_char = len(self.exact(last)) / max(1, self._head_chars + self._chars(last))
        tries = 0
        while hi - lo > 1:
            if tries < self.GUIDED_TRIES:
                probe = min(max(self._guess(lo, hi, per_char), lo + 1, floor), hi - 1)
            elif lo < 0:
                probe = max(0, hi - 2 * (last - hi + 1))  # step back from the newest, doubling
            else:
                probe = (lo + hi) // 2
            tries += 1
            if self.fits(probe):
                hi = probe
            else:
                lo = probe
            # Tokens per character between the nearest exact lengths on either side.
            near = lo if lo >= 0 else last
            if near != hi and self._chars(near) != self._chars(hi):
                slope = ((len(self.exact(near)) - len(self.exact(hi)))
                         / (self._chars(near) - self._chars(hi)))
                if slope > 0:
                    per_char = slope
        return hi


class ModelWorker:
    """One inference thread that owns one loaded ``Llama`` and serves requests in order."""

    slots = 1  # requests generating at once

    def __init__(
        self, model: ModelFile, *, n_ctx: int, n_threads: int, n_gpu_layers: int,
        chat_template: str | None = None,
    ) -> None:
        self.model = model
        self.chat_template = chat_template
        self.n_ctx = min(n_ctx, model.context_length or n_ctx)
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._waiting: list[_Request] = []  # submitted, not yet started; guarded by _lock
        self._lock = threading.Lock()
        self._turns = threading.Condition(self._lock)  # see submit
        self._tickets = self._turn = 0
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._current_cancel: threading.Event | None = None
        self._beat = time.monotonic()  # last sign of progress of the inference thread
        self._slow_since: float | None = None  # when the steps of a busy batch became slow
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"llama:{model.id}", daemon=True
        )
        self._thread.start()

    # -- called from request threads -------------------------------------------------------
    def submit(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
        heartbeat: float | None = None,
    ) -> Iterator[Chunk]:
        request = _Request(messages=messages, options=options, cancel=cancel)
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
                    outcome = Finished("stopped", 0, 0, None)
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
        return self._drain(request, heartbeat) if fitted else ended(outcome)

    def _fit(self, request: _Request) -> None:
        from .structured import render_messages

        opts = request.options
        messages = render_messages(request.messages, opts.tools, opts.tool_choice)
        request.prompt, request.dropped, request.max_tokens = self._builder.fit(
            messages, opts.system, self.n_ctx, opts.max_tokens
        )

    def _busy_slots(self) -> int:
        """How many requests are generating now (lock held)."""
        return 1 if self._current_cancel is not None else 0

    def _tell_positions(self) -> None:
        """Tell each waiting request its place once every slot is taken (lock held)."""
        free = max(0, self.slots - self._busy_slots())
        for index, waiting in enumerate(self._waiting):
            position = index - free + 1
            if position > 0 and position != waiting.position:
                waiting.position = position
                waiting.out.put(Queued(position=position))

    def _drain(self, request: _Request, heartbeat: float | None) -> Iterator[Chunk]:
        try:
            while True:
                try:
                    item = request.out.get(timeout=heartbeat)
                except queue.Empty:
                    yield Idle()
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The consumer went away (or finished): make sure the thread stops working for it.
            request.cancel.set()

    def activity(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self._current_cancel is not None, "waiting": len(self._waiting)}

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

    def wait_loaded(self, timeout: float | None = None) -> None:
        self._loaded.wait(timeout)
        if self._load_error:
            raise EngineError(f"model {self.model.id} failed to load: {self._load_error}")

    def close(self) -> None:
        self._closed = True
        self._requests.put(None)

    # -- the inference thread --------------------------------------------------------------
    def _load(self):
        from llama_cpp import Llama, llama_cpp

        started = time.perf_counter()
        llama = Llama(
            model_path=str(self.model.path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            verbose=False,
        )
        # Lets a stop interrupt a long prompt evaluation: llama_decode then returns 2.
        # Kept on self: ctypes does not keep the callback object alive for C.
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
        llama_cpp.llama_set_abort_callback(llama._ctx.ctx, self._abort_cb, None)
        log.info(
            "loaded %s (n_ctx=%d, threads=%d, gpu_layers=%d) in %.2fs",
            self.model.id, self.n_ctx, self.n_threads, self.n_gpu_layers,
            time.perf_counter() - started,
        )
        return llama

    def _should_abort(self, _data) -> bool:
        cancel = self._current_cancel
        return bool(cancel is not None and cancel.is_set())

    def _run(self) -> None:
        try:
            llama = self._load()
            self._builder = PromptBuilder(llama, self.chat_template)
        except BaseException as exc:
            self._load_failed(exc)
            return
        self._loaded.set()
        while True:
            request = self._requests.get()
            if request is None:
                return
            with self._lock:
                self._waiting.remove(request)
                self._current_cancel = request.cancel
                self._tell_positions()
            self._beat = time.monotonic()
            try:
                if request.cancel.is_set():
                    request.out.put(Finished("stopped", 0, 0, None))
                else:
                    self._generate(llama, request)
            except EngineError as exc:
                request.out.put(exc)
            except Exception as exc:
                log.exception("generation failed on %s", self.model.id)
                request.out.put(EngineError(f"the model failed: {exc}"))
            finally:
                with self._lock:
                    self._current_cancel = None
                request.out.put(_DONE)

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
            request.out.put(_DONE)

    def _generate(self, llama, request: _Request) -> None:
        from llama_cpp import LlamaGrammar, llama_cpp

        from .structured import StopMatcher

        opts = request.options
        prompt, dropped, max_tokens = request.prompt, request.dropped, request.max_tokens
        if opts.seed is not None:
            llama.set_seed(opts.seed)
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        grammar = None
        if opts.grammar:
            # Compiled once here to see that it compiles: Llama.generate adds a NULL sampler
            # to its chain without looking, which would crash the process.
            llama_cpp.llama_sampler_free(start_grammar(vocab, opts.grammar))
            grammar = LlamaGrammar.from_string(opts.grammar)
        stop = StopMatcher(opts.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        meta: dict[str, Any] = {"n_ctx": self.n_ctx}
        if dropped:
            meta["trimmed_messages"] = dropped
        started = time.perf_counter()
        first_at = last_at = None
        n_generated = 0
        finish = "length"
        tokens = llama.generate(
            prompt,
            temp=opts.temperature,
            top_p=opts.top_p,
            top_k=40,
            min_p=0.05,
            repeat_penalty=1.0,
            frequency_penalty=opts.frequency_penalty,
            presence_penalty=opts.presence_penalty,
            grammar=grammar,
            reset=True,  # reuses the longest cached prefix (earlier turns of this chat)
        )
        try:
            for token in tokens:
                now = time.perf_counter()
                self._beat = time.monotonic()
                if first_at is None:
                    first_at = now
                    meta["prompt_ms"] = round((now - started) * 1000, 1)
                if request.cancel.is_set():
                    finish = "stopped"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                n_generated += 1
                last_at = now
                text, hit = stop.feed(decoder.decode(llama.detokenize([token])))
                if text:
                    request.out.put(Token(text))
                if hit:
                    finish = "stop"
                    meta["stop_string"] = True
                    break
                if n_generated >= max_tokens:
                    finish = "length"
                    break
        except RuntimeError as exc:
            if request.cancel.is_set() and "returned 2" in str(exc):
                finish = "stopped"  # aborted during prompt evaluation
            else:
                raise EngineError(f"llama.cpp failed: {exc}") from exc
        finally:
            tokens.close()
        tail = ""
        if not meta.get("stop_string"):  # else the reply ended at the stop string
            tail, hit = stop.feed(decoder.decode(b"", final=True))
            tail += "" if hit else stop.flush()
        if tail:
            request.out.put(Token(tail))
        tps = None
        if n_generated > 1 and first_at is not None and last_at and last_at > first_at:
            tps = round((n_generated - 1) / (last_at - first_at), 2)
        request.out.put(
            Finished(
                finish_reason=finish,
                prompt_tokens=len(prompt),
                completion_tokens=n_generated,
                tokens_per_second=tps,
                meta=meta,
            )
        )


class LlamaCppEngine:
    """All GGUF files of the catalogue, each loaded once, on first use or at start."""

    name = "llamacpp"

    def __init__(
        self,
        catalogue: ModelCatalogue,
        *,
        n_ctx: int,
        n_threads: int,
        n_gpu_layers: int = 0,
        preload: bool = False,
        parallel: int = 1,
        chat_template: str | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.parallel = parallel
        self._settings = dict(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                              chat_template=fallback_template(chat_template))
        self._workers: dict[str, ModelWorker] = {}
        self._lock = threading.Lock()
        if preload:
            for model in catalogue:
                self.worker(model.id).wait_loaded()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=m.id, engine=self.name, facts=m.facts()) for m in self.catalogue]

    def activity(self) -> dict[str, dict[str, Any]]:
        """Per loaded model: is it generating, and how many requests wait for it."""
        with self._lock:
            workers = dict(self._workers)
        return {mid: w.activity() for mid, w in workers.items()}

    def health(self, stuck_after: float) -> list[dict[str, Any]]:
        with self._lock:
            workers = list(self._workers.values())
        return [problem for w in workers if (problem := w.health(stuck_after))]

    def loaded_models(self) -> list[str]:
        with self._lock:
            return [mid for mid, w in self._workers.items() if w._loaded.is_set() and not w._load_error]

    def worker(self, model_id: str) -> ModelWorker:
        with self._lock:
            worker = self._workers.get(model_id)
            if worker is None:
                model = self.catalogue.get(model_id)
                if model is None:
                    raise UnknownModel(f"no model named {model_id!r}")
                if self.parallel > 1:
                    from .batched import BatchedModelWorker

                    worker = BatchedModelWorker(model, parallel=self.parallel, **self._settings)
                else:
                    worker = ModelWorker(model, **self._settings)
                self._workers[model_id] = worker
            return worker

    def stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
        heartbeat: float | None = None,
    ) -> Iterator[Chunk]:
        return self.worker(model).submit(messages, options, cancel, heartbeat)

    def close(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.close()
            self._workers.clear()
