"""What ``/v1`` lets a program do to the sampling itself and read back from it, through the
official ``openai`` client against a live server: ``logit_bias``, ``logprobs`` and
``top_logprobs`` (the tiny model, in the web process, in a runner process and behind a
``bchat worker`` upstream, and SmolLM2)."""

from __future__ import annotations

import math

import openai
import pytest
from llama_cpp import Llama
from test_openai_api import LOOSE, api  # noqa: F401 (the live server and client fixture)
from test_openai_upstreams import through_main_app, worker  # noqa: F401 (a bchat worker)

HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def vocab(tiny_model):
    """The tiny model's vocabulary, to name tokens by id as OpenAI's logit_bias does."""
    return Llama(model_path=str(tiny_model), vocab_only=True, verbose=False)


def greedy(client, max_tokens: int, **extra) -> str:
    reply = client.chat.completions.create(model="tiny-chat", messages=HI, temperature=0,
                                           max_tokens=max_tokens, **extra)
    return reply.choices[0].message.content or ""


def test_logit_bias_bans_and_forces_tokens(api, vocab):  # noqa: F811
    *_, client = api
    first = greedy(client, 1)
    assert first, "the greedy reply should start with a token that has text"
    # Every token that reads as the greedy first token, banned: the first token changes.
    same = [t for t in range(vocab.n_vocab())
            if vocab.detokenize([t]).decode("utf-8", "replace") == first]
    assert 0 < len(same) <= 300
    banned = greedy(client, 1, logit_bias={str(t): -100 for t in same})
    assert banned != first
    # +100 on one token makes it the reply's every token, streamed as well.
    token = vocab.tokenize(b"hello", add_bos=False)[0]
    piece = vocab.detokenize([token]).decode()
    assert greedy(client, 3, logit_bias={str(token): 100}) == piece * 3
    stream = client.chat.completions.create(model="tiny-chat", messages=HI, temperature=0.9,
                                            seed=3, max_tokens=3, stream=True,
                                            logit_bias={str(token): 100})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == piece * 3


@pytest.mark.parametrize("bias", [
    {"99999999": 1},  # beyond the tiny vocabulary: refused before llama.cpp sees it
    {"-1": 1}, {"x": 1}, {"5": 101}, {"5": "high"}, {str(i): 1 for i in range(301)}, [5],
])
def test_bad_logit_bias_is_400_invalid_value(api, bias):  # noqa: F811
    *_, client = api
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2,
                                           stream=stream, logit_bias=bias)
        assert err.value.body["code"] == "invalid_value", err.value.body
        assert "logit_bias" in err.value.body["message"]
        assert err.value.body["param"] == "logit_bias", err.value.body


def test_top_logprobs_without_logprobs_is_400_as_openai_answers(api):  # noqa: F811
    *_, client = api
    for logprobs in (None, False):
        extra = {} if logprobs is None else {"logprobs": logprobs}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2,
                                           top_logprobs=2, **extra)
        assert (err.value.body["code"], err.value.body["param"]) == ("invalid_value",
                                                                      "top_logprobs")


def test_a_stored_call_records_its_logit_bias_and_logprobs(api):  # noqa: F811
    _server, visitor, _key, client = api
    client.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2, logprobs=True,
                                   top_logprobs=3, logit_bias={"7": -100, "0012": 5})
    conversation = visitor.json("GET", "/api/conversations")[1]["conversations"][0]
    stored = visitor.json("GET", f"/api/conversations/{conversation['id']}")[1]["messages"]
    options = stored[-1]["meta"]["options"]
    assert options["logit_bias"] == {"7": -100, "12": 5}
    assert (options["logprobs"], options["top_logprobs"]) == (True, 3)


def client_of(server) -> openai.OpenAI:
    return server.openai_client()


def check_logprobs(entries, content: str, top: int, greedy: bool) -> None:
    """Entries that spell the reply, each a log-probability of the distribution sampled."""
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content
    for e in entries:
        assert e.logprob <= 0 and e.token == bytes(e.bytes).decode("utf-8", "replace")
        alternatives = [a.logprob for a in e.top_logprobs]
        assert 0 < len(alternatives) <= top and alternatives == sorted(alternatives, reverse=True)
        assert all(a <= 0 for a in alternatives) and sum(map(math.exp, alternatives)) < 1.0001
        if greedy:  # the token written is the likeliest
            assert e.top_logprobs[0].token == e.token
            assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        elif e.token in [a.token for a in e.top_logprobs]:
            assert e.logprob in alternatives


@pytest.mark.parametrize("runner", ["inline", "process"])
def test_logprobs_streamed_and_not_agree_and_match_the_tokens(make_app, make_live_server, runner):
    client = client_of(make_live_server(make_app(MODEL_RUNNER=runner, **LOOSE)))
    ask = dict(model="tiny-chat", messages=HI, max_tokens=6, logprobs=True, top_logprobs=5)
    reply = client.chat.completions.create(temperature=0, **ask)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens > 0
    check_logprobs(entries, reply.choices[0].message.content, 5, greedy=True)
    streamed = []
    for chunk in client.chat.completions.create(temperature=0, stream=True, **ask):
        for choice in chunk.choices:
            streamed += choice.logprobs.content if choice.logprobs else []
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    # Not bit for bit: the second reads its prompt from the cache, in batches of other sizes.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    sampled = client.chat.completions.create(temperature=1.0, seed=5, **ask)
    check_logprobs(sampled.choices[0].logprobs.content, sampled.choices[0].message.content, 5,
                   greedy=False)
    # Under a grammar: the distribution the grammar left, which its every token is drawn from.
    shaped = client.chat.completions.create(temperature=0.5, seed=2,
                                            response_format={"type": "json_object"}, **ask)
    check_logprobs(shaped.choices[0].logprobs.content, shaped.choices[0].message.content, 5,
                   greedy=False)
    plain = client.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as err:  # checked where the model is, too
        client.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2,
                                       logit_bias={"99999999": -100})
    assert err.value.body["code"] == "invalid_value"


def test_logprobs_on_smollm2(make_app, make_live_server, bundled_model):
    client = client_of(make_live_server(make_app(MODEL_PATH=str(bundled_model), **LOOSE)))
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    check_logprobs(entries, reply.choices[0].message.content, 3, greedy=True)
    # A trained model is sure of most of its greedy tokens.
    assert max(e.logprob for e in entries) > -0.1


def test_logprobs_and_logit_bias_pass_through_to_an_upstream(make_app, make_live_server,
                                                            worker, tiny_model, vocab):  # noqa: F811
    client = through_main_app(make_app, make_live_server, tiny_model, worker.url + "/v1",
                              OPENAI_MODELS=["tiny-chat"])
    ask = dict(model="tiny-chat", messages=HI, max_tokens=4, temperature=0, logprobs=True,
               top_logprobs=2)
    reply = client.chat.completions.create(**ask)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    check_logprobs(entries, reply.choices[0].message.content, 2, greedy=True)
    streamed = [e for chunk in client.chat.completions.create(stream=True, **ask)
                for choice in chunk.choices for e in (choice.logprobs.content
                                                      if choice.logprobs else [])]
    assert [e.token for e in streamed] == [e.token for e in entries]
    token = vocab.tokenize(b"hello", add_bos=False)[0]
    forced = client.chat.completions.create(model="tiny-chat", messages=HI, max_tokens=2,
                                            logit_bias={str(token): 100})
    assert forced.choices[0].message.content == vocab.detokenize([token]).decode() * 2
