"""The embedded llama.cpp engine on a real (tiny) GGUF: streaming, queueing, stop, trimming."""

from __future__ import annotations

import threading
import time

import pytest

from webapp.catalogue import ModelCatalogue
from webapp.engines.base import (
    ContextTooLong,
    EngineError,
    Finished,
    Queued,
    Token,
    UnknownModel,
    timed,
)
from webapp.engines.llamacpp import LlamaCppEngine
from webapp.options import GenerationOptions

GREEDY = GenerationOptions(temperature=0.0, max_tokens=24)


@pytest.fixture
def engine(tiny_model):
    eng = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=4096, n_threads=1)
    yield eng
    eng.close()


def run(engine, messages, options=GREEDY, cancel=None, model="tiny-chat"):
    chunks = list(timed(engine.stream(model, messages, options, cancel or threading.Event())))
    text = "".join(c.text for c in chunks if isinstance(c, Token))
    finished = [c for c in chunks if isinstance(c, Finished)]
    assert len(finished) == 1 and chunks[-1] is finished[0], "exactly one Finished, last"
    return text, finished[0], chunks


def test_catalogue_reads_facts_from_the_gguf_header(tiny_model):
    (model,) = list(ModelCatalogue(tiny_model))
    assert model.id == "tiny-chat"
    assert model.architecture == "llama"
    assert model.name == "bchat-tiny-test"
    assert model.quantization == "F32"
    assert model.context_length == 4096
    assert model.has_chat_template
    assert model.file_size == tiny_model.stat().st_size
    # ~800 x 64 embeddings and output, two blocks of attention and FFN
    assert 100_000 < model.parameters < 200_000
    assert 31 < model.bits_per_weight < 34  # F32 plus header


def test_streams_tokens_and_reports_usage(engine):
    text, done, chunks = run(engine, [{"role": "user", "content": "hello there"}])
    tokens = [c for c in chunks if isinstance(c, Token)]
    assert len(tokens) > 1 and text.strip()
    assert done.finish_reason == "length"  # the tiny model never picks its end token
    assert done.completion_tokens == GREEDY.max_tokens
    assert done.prompt_tokens > 5
    assert done.tokens_per_second and done.tokens_per_second > 0


def test_greedy_generation_is_deterministic(engine):
    messages = [{"role": "user", "content": "the same prompt"}]
    assert run(engine, messages)[0] == run(engine, messages)[0]


def test_follow_up_reuses_the_cached_prefix(engine):
    first = [{"role": "user", "content": "a first question about the moon " * 20}]
    run(engine, first)
    text, _done, _ = run(engine, first)
    follow = first + [{"role": "assistant", "content": text},
                      {"role": "user", "content": "and the sun?"}]
    _text, done, _ = run(engine, follow)
    assert done.prompt_tokens > 100
    assert "prompt_ms" in done.meta


def test_stop_between_tokens_ends_with_stopped(engine):
    cancel = threading.Event()
    stream = engine.stream(
        "tiny-chat", [{"role": "user", "content": "go"}],
        GenerationOptions(temperature=0.0, max_tokens=3000), cancel,
    )
    seen = 0
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if isinstance(chunk, Token):
            seen += 1
            if seen == 5:
                cancel.set()
    done = chunks[-1]
    assert isinstance(done, Finished) and done.finish_reason == "stopped"
    # Stopped before its limit: how many tokens past the fifth depends on how soon this thread
    # runs again beside the decoding one (on a busy machine, dozens), so no tighter bound.
    assert 5 <= done.completion_tokens < 3000


def test_requests_are_served_in_arrival_order_and_told_they_wait(engine):
    engine.worker("tiny-chat").wait_loaded(30)
    busy = threading.Event()
    first = engine.stream("tiny-chat", [{"role": "user", "content": "first"}],
                          GenerationOptions(temperature=0.0, max_tokens=4000), busy)
    assert isinstance(next(first), Token)  # the model is now busy with the first request
    # Two more arrive, in this order, while it is busy.
    waiting = [
        engine.stream("tiny-chat", [{"role": "user", "content": f"request {i}"}],
                      GenerationOptions(temperature=0.0, max_tokens=50), threading.Event())
        for i in (1, 2)
    ]
    first_token_at: dict[int, float] = {}
    results: dict[int, list] = {}
    told = {1: threading.Event(), 2: threading.Event()}  # each has been told its place

    def consume(i: int) -> None:
        chunks = []
        for chunk in waiting[i - 1]:
            if isinstance(chunk, Token) and i not in first_token_at:
                first_token_at[i] = time.perf_counter()
            chunks.append(chunk)
            if isinstance(chunk, Queued):
                told[i].set()
        results[i] = chunks

    threads = [threading.Thread(target=consume, args=(i,)) for i in (2, 1)]  # reversed on purpose
    for t in threads:
        t.start()
    assert all(event.wait(30) for event in told.values()), "both were told they wait"
    busy.set()
    rest = list(first)
    for t in threads:
        t.join(60)
    assert rest[-1].finish_reason == "stopped"
    assert first_token_at[1] < first_token_at[2], "served in arrival order"
    assert [c.position for c in results[1] if isinstance(c, Queued)] == [1]
    assert [c.position for c in results[2] if isinstance(c, Queued)] == [2, 1], "told, then moved up"
    assert all(results[i][-1].completion_tokens == 50 for i in (1, 2))


def test_a_request_cancelled_while_queued_never_runs(engine):
    engine.worker("tiny-chat").wait_loaded(30)
    first_cancel, second_cancel = threading.Event(), threading.Event()
    first = engine.stream("tiny-chat", [{"role": "user", "content": "one"}],
                          GenerationOptions(temperature=0.0, max_tokens=2000), first_cancel)
    next(first)  # the first is generating
    second = engine.stream("tiny-chat", [{"role": "user", "content": "two"}], GREEDY, second_cancel)
    second_cancel.set()
    first_cancel.set()
    list(first)
    chunks = list(second)
    assert isinstance(chunks[-1], Finished)
    assert chunks[-1].finish_reason == "stopped" and chunks[-1].completion_tokens == 0


def test_long_history_drops_oldest_turns_keeps_system(tiny_model):
    engine = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=256, n_threads=1)
    try:
        history = []
        for i in range(12):
            history.append({"role": "user", "content": f"question number {i} about the sea"})
            history.append({"role": "assistant", "content": f"answer number {i} about water"})
        history.append({"role": "user", "content": "the newest question"})
        options = GenerationOptions(system="you are a test", temperature=0.0, max_tokens=32)
        _text, done, _ = run(engine, history, options)
        assert done.meta["trimmed_messages"] >= 2
        assert done.prompt_tokens + done.completion_tokens <= 256

        # Check what was kept, with the worker's own prompt builder.
        from webapp.engines.inference import PromptBuilder

        worker = engine.worker("tiny-chat")
        from llama_cpp import Llama

        llama = Llama(str(tiny_model), n_ctx=256, verbose=False)
        builder = PromptBuilder(llama)
        tokens, dropped, max_tokens = builder.fit(history, "you are a test", worker.n_ctx, 32)
        prompt = llama.detokenize(tokens, special=True).decode()
        assert prompt.startswith("<|im_start|>system\nyou are a test")
        assert "the newest question" in prompt
        assert "question number 0 " not in prompt
        assert dropped == done.meta["trimmed_messages"] and max_tokens == 32
    finally:
        engine.close()


def test_a_single_message_too_long_for_the_context_is_a_clear_error(tiny_model):
    engine = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=128, n_threads=1)
    try:
        with pytest.raises(ContextTooLong, match="context holds 128 tokens"):
            run(engine, [{"role": "user", "content": "water " * 400}])
        # ...and the worker is fine afterwards
        text, done, _ = run(engine, [{"role": "user", "content": "short"}])
        assert done.finish_reason == "length" and text
    finally:
        engine.close()


def test_unknown_model_is_refused(engine):
    with pytest.raises(UnknownModel):
        engine.stream("nope", [], GREEDY, threading.Event())


def test_model_without_chat_template_gives_a_clear_error(tmp_path):
    from tiny_model import write_tiny_model

    path = write_tiny_model(tmp_path / "base.gguf", chat_template=None)
    engine = LlamaCppEngine(ModelCatalogue(path), n_ctx=512, n_threads=1)
    try:
        with pytest.raises(EngineError, match="no chat template"):
            run(engine, [{"role": "user", "content": "hi"}], model="base")
    finally:
        engine.close()


def test_the_reply_is_timed_above_the_engine(engine):
    """The engine reports counts and its prompt time; timed() measures the rest, once."""
    chunks = list(engine.stream("tiny-chat", [{"role": "user", "content": "time me"}], GREEDY,
                                threading.Event()))
    assert chunks[-1].tokens_per_second is None, "the engine does not time itself"
    _text, done, _ = run(engine, [{"role": "user", "content": "time me"}])
    timing = done.timing
    assert timing.prompt_ms == done.meta["prompt_ms"] > 0
    assert timing.first_token_ms >= timing.prompt_ms
    assert timing.queued_ms == round(timing.first_token_ms - timing.prompt_ms, 1)
    assert timing.tokens_per_second == done.tokens_per_second > 0
    # Decode speed is the engine's own figure: the reader may get the tokens in a burst.
    assert timing.tokens_per_second == round((done.completion_tokens - 1)
                                             / (done.meta["decode_ms"] / 1000), 2)


def test_tokens_read_in_a_burst_keep_the_speed_they_were_written_at():
    """A runner process's tokens can reach a busy web thread all at once: the speed must be the
    one the engine measured (it once read 147,682 tok/s for the tiny model)."""
    from webapp.engines.base import Token, timed

    burst = [Token("a"), Token("b"), Token("c"),
             Finished("length", prompt_tokens=3, completion_tokens=3, meta={"decode_ms": 20.0})]
    done = list(timed(iter(burst)))[-1]
    assert done.tokens_per_second == 100.0
