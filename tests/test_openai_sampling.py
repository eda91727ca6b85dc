"""What ``/v1`` lets a program do to the sampling itself, through the official ``openai``
client against a live server on the tiny model: ``logit_bias``."""

from __future__ import annotations

import openai
import pytest
from llama_cpp import Llama

from tests.test_openai_api import api  # noqa: F401 (the live server and client fixture)

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
