"""What the embedded engine's parts share: a request and its way back, the samplers, the reply's
text (UTF-8 across tokens, stop strings) and the prompt (the model's chat template, fitted to
the context).

The engine (llamacpp.py) and its inference thread (batched.py) both import from here; nothing
here owns a model or a thread.
"""

from __future__ import annotations

import codecs
import queue
import re
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..options import GenerationOptions
from .base import Chunk, ContextTooLong, EngineError, Idle
from .structured import StopMatcher

PENALTY_LAST_N = 64  # tokens the presence/frequency penalties look back over
TOP_K = 40  # the sampler chain of llama.cpp's defaults, as llama-server applies them
MIN_P = 0.05

# Smallest reply room worth generating into when a long prompt barely fits.
MIN_REPLY_TOKENS = 16


@dataclass
class Request:
    messages: list[dict[str, str]]
    options: GenerationOptions
    cancel: threading.Event
    out: queue.Queue = field(default_factory=queue.Queue)
    position: int = 0  # last place in the queue the request was told
    # Fitted on the request's own thread before it is queued (ModelWorker.submit).
    prompt: list[int] = field(default_factory=list)
    dropped: int = 0  # oldest messages left out to fit the context
    max_tokens: int = 0  # the reply room left
    # Its images as the model's projector took them (vision.Picture, which own the native
    # chunks) and their image chunks by the vision.placeholder ids the prompt holds for them.
    pictures: list[Any] = field(default_factory=list)
    image_chunks: dict[int, Any] = field(default_factory=dict)


DONE = object()  # end-of-stream marker on a request's out queue


def drain(request: Request, heartbeat: float | None) -> Iterator[Chunk]:
    """The request's chunks as the inference thread puts them, with an Idle every
    ``heartbeat`` seconds of silence; whoever stops reading cancels the request."""
    try:
        while True:
            try:
                item = request.out.get(timeout=heartbeat)
            except queue.Empty:
                yield Idle()
                continue
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # The consumer went away (or finished): make sure the thread stops working for it.
        request.cancel.set()


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


def check_logit_bias(opts: GenerationOptions, n_vocab: int) -> None:
    """A logit_bias id outside the model's vocabulary is the request's fault, found before
    any of it reaches llama.cpp (which would read past its logits)."""
    unknown = [key for key in opts.logit_bias or () if int(key) >= n_vocab]
    if unknown:
        raise EngineError(f"logit_bias: token {unknown[0]} is not in this model's vocabulary "
                          f"of {n_vocab} tokens", code="bad_logit_bias")


def logit_bias_sampler(opts: GenerationOptions, n_vocab: int):
    """OpenAI's logit_bias (ids checked by check_logit_bias): -100 bans a token outright,
    as OpenAI documents, rather than leaving it a logit 100 lower."""
    from llama_cpp import llama_cpp

    items = [llama_cpp.llama_logit_bias(int(key), -float("inf") if bias <= -100 else bias)
             for key, bias in opts.logit_bias.items()]
    # llama.cpp copies the array into the sampler.
    return llama_cpp.llama_sampler_init_logit_bias(
        n_vocab, len(items), (llama_cpp.llama_logit_bias * len(items))(*items))


def sampler_chain(opts: GenerationOptions, n_vocab: int):
    """A request's own sampler chain (logit bias, penalties, then greedy or
    top-k/top-p/min-p/temp), so its options never touch another chat's."""
    from llama_cpp import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        if opts.logit_bias:
            llama_cpp.llama_sampler_chain_add(chain, logit_bias_sampler(opts, n_vocab))
        if opts.presence_penalty or opts.frequency_penalty:
            llama_cpp.llama_sampler_chain_add(chain, penalties_sampler(opts))
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
    if opts.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    seed = opts.sampler_seed if opts.seed is not None else int(time.time_ns() & 0xFFFFFFFF)
    for sampler in (
        llama_cpp.llama_sampler_init_top_k(TOP_K),
        llama_cpp.llama_sampler_init_top_p(opts.top_p, 1),
        llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
        llama_cpp.llama_sampler_init_temp(opts.temperature),
        llama_cpp.llama_sampler_init_dist(seed),
    ):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    return chain


def logprob_entries(survivors, selected: int, top: int, piece) -> dict[str, Any]:
    """OpenAI's logprobs entry of the token ``selected`` among ``survivors`` (llama.cpp's
    candidates, ids and logits, after the request's sampler chain: the distribution it was
    drawn from, as llama-server's post-sampling probabilities), with the ``top`` likeliest.
    ``piece(id)``: a token's bytes. A banned token (logit -inf) is never listed."""
    import numpy as np

    logits = survivors["logit"].astype(np.float64)
    finite = np.isfinite(logits)
    high = logits[finite].max()
    logprobs = logits - (high + np.log(np.exp(logits[finite] - high).sum()))

    def entry(index: int) -> dict[str, Any]:
        data = piece(int(survivors["id"][index]))
        return {"token": data.decode("utf-8", "replace"), "logprob": float(min(0.0, logprobs[index])),
                "bytes": list(data)}

    ranked: list[int] = []
    if top:
        count = min(top, int(finite.sum()))
        best = np.argpartition(-logprobs, count - 1)[:count]
        ranked = sorted(best.tolist(), key=lambda i: -logprobs[i])
    return {**entry(selected), "top_logprobs": [entry(i) for i in ranked]}


class ReplyText:
    """A reply's token bytes as the text to send: UTF-8 decoded across tokens (a character
    split over two tokens waits for its second half) and cut at the first stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopMatcher(stops)
        self.stopped = False  # a stop string was reached: nothing more is sent

    def feed(self, piece: bytes) -> str:
        text, self.stopped = self._stop.feed(self._decoder.decode(piece))
        return text

    def tail(self) -> str:
        """What was held back, once the reply ends (nothing after a stop string)."""
        if self.stopped:
            return ""
        text, self.stopped = self._stop.feed(self._decoder.decode(b"", final=True))
        return text if self.stopped else text + self._stop.flush()


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

        def formatter(source: str) -> Jinja2ChatFormatter:
            return Jinja2ChatFormatter(
                template=source,
                eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id],
            )

        self._formatter = formatter(template)
        self._splitter = special_splitter(self._vocab)
        self._cache = TokenCache()
        # Whether a template renders tools itself (structured.template_tool_style). Some GGUFs
        # (Hermes 3, Command R) carry a second template for requests with tools,
        # tokenizer.chat_template.tool_use, which llama.cpp renders those with: so does bchat.
        from .structured import template_tool_style

        self._tool_formatter, self.tool_style = self._formatter, None
        tool_use = llama.metadata.get("tokenizer.chat_template.tool_use")
        for source in ([tool_use] if tool_use and tool_use != template else []) + [template]:
            try:
                candidate = self._formatter if source is template else formatter(source)
            except Exception:  # a tool-use template that does not compile: the default does all
                continue
            style = template_tool_style(source, lambda messages, tools, f=candidate:
                                        f(messages=messages, tools=tools).prompt)
            if style:
                self._tool_formatter, self.tool_style = candidate, style
                break

    def text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt, formatted by the model's template (with ``tools`` in its render context,
        as transformers and llama.cpp's --jinja pass them, for a template with a tools section).
        A trailing assistant message is a reply being continued: the prompt opens the assistant
        turn and ends with its text, so the model writes on from there instead of starting a
        new turn."""
        prefix = ""
        if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
            prefix = messages[-1]["content"]
            messages = messages[:-1]
        # The tool-use template for tools or tool turns, as llama.cpp picks it (when it has one).
        turns = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        formatter = self._tool_formatter if turns else self._formatter
        # Today's date, as llama.cpp passes it: Llama 3.1's template writes "Today Date: 26 Jul
        # 2024" into every prompt without one.
        try:
            return formatter(messages=messages, tools=tools,
                             date_string=time.strftime("%d %b %Y")).prompt + prefix
        except ValueError as exc:
            # The template's own raise_exception() (llama-cpp-python raises it as ValueError):
            # it refuses this conversation's shape ("roles must alternate…"), the caller's to
            # fix, so a 400 as llama-server answers, not the model failing.
            raise EngineError(f"the model's chat template refuses this conversation: "
                              f"{str(exc)[:300]}", code="template_refused") from exc

    def tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               media: dict[str, list[int]] | None = None) -> list[int]:
        """The prompt's tokens (the template writes BOS itself when the model wants one);
        ``media``: marker → the tokens an image stands for (vision.split_images)."""
        text = self.text(messages, tools)
        if not media:
            return self.tokenize(text)
        # Cut at the markers, as libmtmd's tokenizer does: the text between is tokenized
        # piece by piece, each image is its own tokens.
        tokens: list[int] = []
        start = 0
        for match in re.finditer("|".join(re.escape(m) for m in media), text):
            tokens += self.tokenize(text[start:match.start()])
            tokens += media[match.group(0)]
            start = match.end()
        return tokens + self.tokenize(text[start:])

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
        self, messages: list[dict[str, Any]], system: str | None, n_ctx: int, max_tokens: int,
        tools: list[dict[str, Any]] | None = None, media: dict[str, list[int]] | None = None,
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
        search = FitSearch(self, head, turns, cuts, n_ctx - reserve, tools, media)
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

    def __init__(self, builder: PromptBuilder, head, turns, cuts: list[int], limit: int,
                 tools: list[dict[str, Any]] | None = None,
                 media: dict[str, list[int]] | None = None) -> None:
        self.builder, self.head, self.turns, self.cuts, self.limit = builder, head, turns, cuts, limit
        self.tools, self.media = tools, media
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
            tokens = self._exact[j] = self.builder.tokens(self.head + self.turns[self.cuts[j]:],
                                                          self.tools, self.media)
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
