"""Fitting a history to the context (PromptBuilder.fit): the same answers as trimming one turn
at a time, for any history, in a handful of renders, on the request's thread.

The reference is the old algorithm, kept here: drop the oldest turn, render and tokenize the
whole prompt with llama.cpp, try again. It is exact but quadratic (800 messages took 84 s),
so it judges small histories; 10,000 messages are checked by what a fit must be."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp.catalogue import ModelCatalogue
from webapp.engines.base import ContextTooLong, Finished, Token
from webapp.engines.inference import MIN_REPLY_TOKENS, PromptBuilder, cut_points
from webapp.engines.llamacpp import LlamaCppEngine
from webapp.options import GenerationOptions


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request, tiny_model, bundled_model):
    """(llama, builder) for the tiny SentencePiece model and the bundled BPE one."""
    from llama_cpp import Llama

    path = tiny_model if request.param == "tiny" else bundled_model
    llama = Llama(str(path), n_ctx=32, verbose=False)
    return llama, PromptBuilder(llama)


def reference_fit(builder, llama, messages, system, n_ctx, max_tokens):
    """The old PromptBuilder.fit, tokenizing every try whole with llama.cpp."""
    def tokens(ms):
        return llama.tokenize(builder.text(ms).encode("utf-8"), add_bos=False, special=True)

    head = [{"role": "system", "content": system}] if system else []
    if not system and messages and messages[0]["role"] == "system":
        head, messages = messages[:1], messages[1:]
    reserve = min(max_tokens, max(n_ctx // 4, MIN_REPLY_TOKENS))
    turns = list(messages)
    keep = 2 if len(turns) > 1 and turns[-1]["role"] == "assistant" else 1
    dropped = 0
    while True:
        prompt = tokens(head + turns)
        if len(prompt) + reserve <= n_ctx:
            break
        if len(turns) <= keep:
            if len(prompt) + MIN_REPLY_TOKENS <= n_ctx:
                break
            raise ContextTooLong("too long")
        turns.pop(0)
        dropped += 1
        while len(turns) > keep and turns[0]["role"] != "user":
            turns.pop(0)
            dropped += 1
    return prompt, dropped, min(max_tokens, n_ctx - len(prompt))


def outcome(fit, *args):
    try:
        return fit(*args)
    except ContextTooLong:
        return "context_too_long"


# Pieces that stress the piecewise tokenizer: special tokens inside content, whitespace runs
# on either side of them, bytes outside ASCII, the unknown token's text.
PIECES = ["sea", " water", "hello world", "\n", "  ", "<|im_end|>", "<|im_start|>", "<unk>",
          "<s>", "é", "日本語", "🙂", "the cat sat", "x" * 40]
message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "user", "system"]),
    "content": st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(message, max_size=40),
       system=st.sampled_from([None, "", "you are a test", "be brief " * 12]),
       n_ctx=st.sampled_from([48, 96, 128, 200, 320]),
       max_tokens=st.sampled_from([1, 8, 32, 500]))
def test_fit_answers_what_trimming_one_turn_at_a_time_did(model, messages, system, n_ctx,
                                                          max_tokens):
    llama, builder = model
    want = outcome(reference_fit, builder, llama, messages, system, n_ctx, max_tokens)
    got = outcome(builder.fit, messages, system, n_ctx, max_tokens)
    assert got == want


@pytest.mark.parametrize("roles, keep, cuts", [
    ([], 1, [0]),
    (["user"], 1, [0]),
    (["user", "assistant", "user"], 1, [0, 2]),
    (["assistant", "assistant", "user", "assistant", "user"], 1, [0, 2, 4]),
    (["user", "assistant", "user", "assistant"], 2, [0, 2]),
    (["user", "system", "assistant", "user", "assistant", "user"], 1, [0, 3, 5]),
    (["assistant", "assistant", "assistant"], 1, [0, 2]),
])
def test_cut_points_follow_the_turns(roles, keep, cuts):
    assert cut_points(roles, keep) == cuts


def test_prompts_tokenize_piecewise_as_llama_cpp_does(model):
    llama, builder = model
    texts = [
        "".join(PIECES),
        "<|im_start|>user\n  <|im_end|>\n<|im_start|>assistant\n<s> é <unk>",
        "no special tokens at all, just words " * 20,
        "<|im_end|><|im_end|>\n\n<|im_start|>",
        builder.text([{"role": "user", "content": p} for p in PIECES]),
    ]
    for text in texts:
        expected = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert builder.tokenize(text) == expected, text
        assert builder.tokenize(text) == expected, "the same from the cache"


def chat(n: int, words: int = 2) -> list[dict[str, str]]:
    text = " ".join(["water"] * words)
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{text} {i}"}
            for i in range(n)]


def test_ten_thousand_messages_fit_exactly(model):
    """The kept turns fit with the reply room; one more turn (the cut before) would not."""
    _llama, builder = model
    n_ctx, max_tokens = 4096, 512
    reserve = min(max_tokens, max(n_ctx // 4, MIN_REPLY_TOKENS))
    for history, system in ((chat(10_000) + [{"role": "user", "content": "newest"}], "sys"),
                            (chat(10_000), None)):  # ends with a reply being continued
        tokens, dropped, allowed = builder.fit(history, system, n_ctx, max_tokens)
        kept = history[dropped:]
        head = [{"role": "system", "content": system}] if system else []
        assert tokens == builder.tokens(head + kept)
        assert len(tokens) + reserve <= n_ctx and allowed == max_tokens
        assert kept[0]["role"] == "user" and kept[-1] == history[-1]
        assert 100 < len(kept) < 1000
        cuts = cut_points([m["role"] for m in history], 2 if history[-1]["role"] == "assistant" else 1)
        before = cuts[cuts.index(dropped) - 1]
        assert len(builder.tokens(head + history[before:])) + reserve > n_ctx


def test_ten_thousand_messages_whose_newest_cannot_fit_fail_clearly(model):
    _llama, builder = model
    history = chat(10_000) + [{"role": "user", "content": "water " * 5000}]
    with pytest.raises(ContextTooLong, match="context holds 4096 tokens"):
        builder.fit(history, None, 4096, 512)


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "batched"])
def test_histories_are_fitted_on_the_senders_thread(tiny_model, parallel, monkeypatch):
    """Never on the inference thread, whose every moment is other chats' tokens."""
    threads: list[str] = []
    fit = PromptBuilder.fit

    def watched(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(PromptBuilder, "fit", watched)
    engine = LlamaCppEngine(ModelCatalogue(tiny_model), n_ctx=256, n_threads=1, parallel=parallel)
    try:
        history = chat(2_000) + [{"role": "user", "content": "newest"}]
        chunks = list(engine.stream("tiny-chat", history,
                                    GenerationOptions(temperature=0.0, max_tokens=8),
                                    threading.Event()))
        done = chunks[-1]
        assert isinstance(done, Finished) and done.completion_tokens == 8
        assert any(isinstance(c, Token) for c in chunks)
        assert 1_900 < done.meta["trimmed_messages"] < 2_000
        assert threads == [threading.current_thread().name]
    finally:
        engine.close()


# -- through the server: /v1 and the chat socket ------------------------------------------------

BOOK = [{"role": "system", "content": "Book"},
        {"role": "user", "content": "What is the best book"}] * 1000  # llama.cpp's own case


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "batched"])
def test_v1_two_thousand_messages_answer_at_once_and_another_chat_goes_on(
        make_app, make_live_server, parallel):
    import openai

    server = make_live_server(make_app(PARALLEL=parallel, MAX_QUEUED_PER_VISITOR=8,
                                       RATE_LIMIT="1000/minute"))
    visitor = server.session()
    visitor.visit()
    status, key = visitor.json("POST", "/api/keys", {"name": "tests"})
    assert status == 201
    # Generous timeouts: a busy machine is slow, but a fit of minutes (as before) is not that.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key["token"], max_retries=0,
                           timeout=120)
    other = iter(client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "go"}], max_tokens=200,
        temperature=0, stream=True))
    next(other)  # the other chat has started

    # The newest message fits: 200, with the oldest turns left out (and said so).
    reply = client.chat.completions.create(model="tiny-chat", messages=BOOK, max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    assert reply.usage.prompt_tokens <= 4096 - 4
    conversation = reply.model_extra["bchat"]["conversation_id"]
    stored = visitor.json("GET", f"/api/conversations/{conversation}")[1]["messages"]
    assert len(stored) == 2001 and stored[-1]["status"] == "complete"
    assert 1000 < stored[-1]["meta"]["trimmed_messages"] < 2000
    assert stored[-1]["meta"]["trimmed_through"] in ("Book", "What is the best book")

    # Not even the newest message fits: 400 context_length_exceeded, as OpenAI answers.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-chat", max_tokens=4,
            messages=BOOK[:-1] + [{"role": "user", "content": "water " * 5000}])
    assert err.value.status_code == 400
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]
    for streamed in (True, False):  # a stream is refused before it starts, the same way
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tiny-chat", max_tokens=4, stream=streamed,
                messages=[{"role": "user", "content": "water " * 5000}])
        assert err.value.body["code"] == "context_length_exceeded"

    # The other chat went on to its end.
    finish = None
    for chunk in other:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
    assert finish == "length"
    # Nothing is left streaming: every reply ended, the refused ones failed.
    statuses = []
    for summary in visitor.json("GET", "/api/conversations")[1]["conversations"]:
        messages = visitor.json("GET", f"/api/conversations/{summary['id']}")[1]["messages"]
        statuses.append(messages[-1]["status"])
        if messages[-1]["status"] == "failed":
            assert messages[-1]["meta"]["error"]["code"] == "context_too_long"
    assert sorted(statuses) == ["complete", "complete", "failed", "failed", "failed"]


def test_socket_says_context_too_long_and_the_reply_ends_failed(make_app, make_live_server):
    server = make_live_server(make_app())
    ws = server.session().ws()
    ws.chat("water " * 5000, options={"max_tokens": 8})
    frame, frames = ws.until("error", "done")
    assert frame["type"] == "error" and frame["code"] == "context_too_long"
    assert "context holds 4096 tokens" in frame["message"]
    started = next(f for f in frames if f["type"] == "started")
    # the same conversation goes on with a message that fits
    ws.chat("a short one", conversation_id=started["conversation_id"], options={"max_tokens": 4})
    done, _ = ws.until("done")
    assert done["message"]["status"] == "complete"
    ws.close()


def test_the_reply_says_which_message_the_models_view_began_after():
    """meta.trimmed_through quotes the newest message left out (the page shows it)."""
    from webapp.runs.run import last_left_out

    history = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}  with   spaces"}
        for i in range(10)]
    plain = GenerationOptions()
    # the history's own system message is kept as the head, so two dropped = turns 0 and 1
    assert last_left_out(history, plain, 2) == "turn 1 with spaces"
    # with a system prompt in the options, the fit counts from the history's first message
    assert last_left_out(history, GenerationOptions(system="Other"), 2) == "turn 0 with spaces"
    long = [{"role": "user", "content": "x" * 500}, {"role": "user", "content": "newest"}]
    assert last_left_out(long, plain, 1) == "x" * 80 + "…"
