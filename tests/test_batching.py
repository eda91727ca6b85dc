"""Continuous batching on the real llama.cpp path (tiny generated GGUF, 4 slots).

Determinism: each sequence has its own KV cells (kv_unified off) and greedy sampling; with the
tiny F32 model's random weights no two top logits are close, so a request's text is the same
whether it runs alone or beside others (other batch layouts could flip near-ties on real
models, which is why these tests use this model and greedy decoding).
"""

from __future__ import annotations

import threading
import time

import pytest

from webapp.catalogue import ModelCatalogue
from webapp.engines.base import ContextTooLong, EngineError, Finished, Queued, Token
from webapp.engines.llamacpp import LlamaCppEngine
from webapp.options import GenerationOptions

PROMPTS = [f"request {i} about the {w}" for i, w in enumerate(
    ["sea", "moon", "tree", "fire", "cat", "code"])]


def greedy(n: int = 40) -> GenerationOptions:
    return GenerationOptions(temperature=0.0, max_tokens=n)


@pytest.fixture
def engine(tiny_model):
    eng = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=1024, n_threads=1, parallel=4)
    eng.worker("tiny-chat").wait_loaded(30)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def solo_texts(tiny_model):
    """Each prompt run alone, one at a time, on the plain (unbatched) worker."""
    eng = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=1024, n_threads=1, parallel=1)
    try:
        return {p: collect(eng.stream("tiny-chat", [{"role": "user", "content": p}], greedy(),
                                      threading.Event()))[0] for p in PROMPTS}
    finally:
        eng.close()


def collect(stream):
    chunks = list(stream)
    text = "".join(c.text for c in chunks if isinstance(c, Token))
    return text, chunks[-1], [c.position for c in chunks if isinstance(c, Queued)]


def run_together(engine, prompts, options=None, cancels=None):
    results: dict[int, tuple] = {}
    # A definite arrival order from events, not sleeps: engine.stream() returns once its
    # request is queued, and request i is sent only after request i - 1 is in the queue.
    queued = [threading.Event() for _ in prompts]

    def one(i: int) -> None:
        if i:
            assert queued[i - 1].wait(60)
        cancel = cancels[i] if cancels else threading.Event()
        stream = engine.stream(
            "tiny-chat", [{"role": "user", "content": prompts[i]}], options or greedy(), cancel)
        queued[i].set()
        results[i] = collect(stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_concurrent_requests_complete_with_their_solo_text(engine, solo_texts, n):
    results = run_together(engine, PROMPTS[:n])
    for i in range(n):
        text, done, _queued = results[i]
        assert isinstance(done, Finished) and done.finish_reason == "length"
        assert done.completion_tokens == 40
        assert text == solo_texts[PROMPTS[i]], f"request {i} differs from its solo run"


def test_requests_beyond_the_slots_wait_in_order_and_are_told(engine):
    # Four long replies hold the four slots until the test lets them go (an event, not a
    # race against how fast the model writes); two more arrive, in this order, meanwhile.
    holds = [threading.Event() for _ in range(4)]
    holders = [engine.stream("tiny-chat", [{"role": "user", "content": PROMPTS[i]}],
                             greedy(4000), holds[i]) for i in range(4)]
    for stream in holders:
        assert isinstance(next(stream), Token), "the first four get a slot at once"
    waiting = [engine.stream("tiny-chat", [{"role": "user", "content": PROMPTS[i]}],
                             greedy(300), threading.Event()) for i in (4, 5)]
    results: dict[int, tuple] = {}
    readers = [threading.Thread(target=lambda j=j: results.__setitem__(j, collect(waiting[j])))
               for j in (0, 1)]
    for t in readers:
        t.start()
    for hold, stream in zip(holds, holders, strict=True):
        hold.set()
        assert collect(stream)[1].finish_reason == "stopped"
    for t in readers:
        t.join(60)
    assert results[0][2][0] == 1 and results[1][2][0] == 2
    assert results[1][2] == sorted(results[1][2], reverse=True), "positions only move up"
    assert all(results[j][1].completion_tokens == 300 for j in (0, 1))


def test_stopping_one_sequence_leaves_the_others_untouched(engine, solo_texts):
    cancels = [threading.Event() for _ in range(3)]
    stream = engine.stream("tiny-chat", [{"role": "user", "content": "to be stopped"}],
                           greedy(2000), cancels[0])
    others: dict[int, tuple] = {}

    def other(i: int) -> None:
        others[i] = collect(engine.stream(
            "tiny-chat", [{"role": "user", "content": PROMPTS[i]}], greedy(), cancels[i]))

    threads = [threading.Thread(target=other, args=(i,)) for i in (1, 2)]
    seen = 0
    for chunk in stream:
        if isinstance(chunk, Token):
            seen += 1
            if seen == 3:
                for t in threads:
                    t.start()
            if seen == 8:
                cancels[0].set()
        last = chunk
    for t in threads:
        t.join(30)
    assert isinstance(last, Finished) and last.finish_reason == "stopped"
    assert last.completion_tokens < 2000  # stopped before its limit (how soon depends on the reader)
    for i in (1, 2):
        assert others[i][0] == solo_texts[PROMPTS[i]] and others[i][1].finish_reason == "length"


def test_a_consumer_that_goes_away_frees_its_slot(engine, solo_texts):
    cancel = threading.Event()
    stream = engine.stream("tiny-chat", [{"role": "user", "content": "abandoned"}],
                           greedy(4000), cancel)
    next(stream)
    stream.close()  # the websocket relay went away: generator closed
    assert cancel.is_set()
    # The inference thread frees the slot at its next step (between two tokens).
    deadline = time.monotonic() + 60
    while engine.activity()["tiny-chat"]["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.activity()["tiny-chat"]["active"] == 0
    # all four slots serve new requests, with their solo texts
    results = run_together(engine, PROMPTS[:4])
    assert all(results[i][0] == solo_texts[PROMPTS[i]] for i in range(4))
    assert all(results[i][2] == [] for i in range(4)), "no one had to wait for the abandoned slot"


def test_a_long_prompt_is_evaluated_in_chunks_without_freezing_the_others(engine):
    received: list[str] = []  # who got each token, in the order they came
    lock = threading.Lock()
    short_began, stop_short = threading.Event(), threading.Event()

    def stream(label: str, content: str, n: int, cancel: threading.Event) -> None:
        for chunk in engine.stream("tiny-chat", [{"role": "user", "content": content}],
                                   greedy(n), cancel):
            if isinstance(chunk, Token):
                with lock:
                    received.append(label)
                short_began.set()

    short = threading.Thread(target=stream, args=("short", "hello", 900, stop_short))
    short.start()
    assert short_began.wait(60)
    with lock:
        received.append("submitted")
    long_prompt = "water fire tree moon " * 60  # 721 tokens: three chunks of 256
    stream("long", long_prompt, 5, threading.Event())
    stop_short.set()  # the short chat's part is over: end it now rather than wait out 900 tokens
    short.join(60)
    after = received[received.index("submitted"):]
    during = after[:after.index("long")]
    # the short chat got a token in each step that read a chunk of the long prompt
    assert during.count("short") >= 2, received[:10]


def test_slot_context_is_enforced_per_chat(tiny_model):
    engine = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=128, n_threads=1, parallel=4)
    try:
        with pytest.raises(ContextTooLong, match="context holds 128 tokens"):
            collect(engine.stream("tiny-chat", [{"role": "user", "content": "water " * 400}],
                                  greedy(), threading.Event()))
        history = []
        for i in range(10):
            history += [{"role": "user", "content": f"question {i} about the sea"},
                        {"role": "assistant", "content": f"answer {i} about water"}]
        history.append({"role": "user", "content": "newest"})
        _text, done, _ = collect(engine.stream("tiny-chat", history, greedy(16), threading.Event()))
        assert done.meta["trimmed_messages"] >= 2
        assert done.prompt_tokens + done.completion_tokens <= 128
        # a reply asked to outgrow its slot's context ends at its edge, cleanly
        _text, done, _ = collect(engine.stream("tiny-chat", [{"role": "user", "content": "go"}],
                                               greedy(4000), threading.Event()))
        assert done.finish_reason == "length"
        assert done.prompt_tokens + done.completion_tokens == 128
    finally:
        engine.close()


def test_follow_up_turn_reuses_its_slots_cache(engine):
    first = [{"role": "user", "content": "tell me about the sea " * 30}]
    text, done, _ = collect(engine.stream("tiny-chat", first, greedy(20), threading.Event()))
    follow = first + [{"role": "assistant", "content": text},
                      {"role": "user", "content": "and the moon?"}]
    _text, again, _ = collect(engine.stream("tiny-chat", follow, greedy(20), threading.Event()))
    assert again.meta["prompt_cached"] >= done.prompt_tokens - 1
    assert again.meta["prompt_cached"] < again.prompt_tokens


def test_queued_frames_reach_the_browser_through_the_socket(make_app, make_live_server):
    # No keepalive pings: these test clients do not read (so do not answer pings) while
    # waiting on one another, and a loaded machine can make that wait long.
    server = make_live_server(make_app(PARALLEL=2, WS_PING_INTERVAL=0))
    clients = [server.session().ws() for _ in range(3)]
    for i, ws in enumerate(clients):
        ws.chat(f"chat {i}", options={"temperature": 0, "max_tokens": 3000 if i < 2 else 10})
        ws.until("started")
    frame, frames = clients[2].until("token")
    queued = [f["position"] for f in frames if f["type"] == "queued"]
    assert queued == [1]
    for ws in clients[:2]:
        ws.send({"type": "stop"})
    for ws in clients:
        done, _ = ws.until("done")
        assert done["message"]["meta"]["parallel"] == 2
        ws.close()


def test_closing_the_engine_ends_every_reader_instead_of_leaving_it_waiting(tiny_model):
    """A reply in a slot and one queued behind it, when the model is closed (app teardown, a
    model unloaded): both readers get an error at once; before, they waited forever (and the
    interpreter could not exit)."""
    engine = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=4096, n_threads=1, parallel=1)
    running = engine.stream("tiny-chat", [{"role": "user", "content": "long"}], greedy(4000),
                            threading.Event())
    assert isinstance(next(c for c in running if isinstance(c, Token)), Token)
    waiting = engine.stream("tiny-chat", [{"role": "user", "content": "queued"}], greedy(),
                            threading.Event())
    assert isinstance(next(waiting), Queued)
    outcomes: dict[str, str] = {}

    def read(name: str, stream) -> None:
        try:
            for _ in stream:
                pass
            outcomes[name] = "ended"
        except EngineError as exc:
            outcomes[name] = exc.code

    readers = [threading.Thread(target=read, args=item, daemon=True)
               for item in (("running", running), ("waiting", waiting))]
    for t in readers:
        t.start()
    engine.close()
    for t in readers:
        t.join(60)
    assert outcomes == {"running": "model_unavailable", "waiting": "model_unavailable"}
