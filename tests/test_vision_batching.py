"""Images in the batched embedded engine, on the real llama.cpp path: the tiny model and a tiny
random-weight projector beside it (tiny_model.write_tiny_projector), run by libmtmd.

An image request's chunks go into its own slot's sequence, so beside other chats (text or
images) each reply is the one it gets alone (greedy, the tiny F32 model: see test_batching's
note on determinism); the image's content reaches the model (another image, another reply);
and a slot's cache holds an image whole: the same image again is reused with all that
follows it, another one after the same text is evaluated from its start.
"""

from __future__ import annotations

import threading

import pytest
from test_batching import collect
from test_images import png
from tiny_model import write_tiny_projector

from webapp import images
from webapp.catalogue import ModelCatalogue
from webapp.engines.base import Finished
from webapp.engines.llamacpp import LlamaCppEngine
from webapp.options import GenerationOptions

IMAGE_TOKENS = 16  # write_tiny_projector: (32 / 8)² embeddings an image
RED, BLUE = png(20, 12, (200, 40, 40)), png(12, 20, (30, 60, 220))


def greedy() -> GenerationOptions:
    return GenerationOptions(temperature=0.0, max_tokens=24)


def text(words: str) -> list[dict]:
    return [{"role": "user", "content": words}]


def picture(words: str, data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": words},
                                         images.part("image/png", data)]}]


REQUESTS = [text("tell me about the sea"), picture("what is it", RED),
            picture("what is it", BLUE), text("and the moon")]


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    where = tmp_path_factory.mktemp("vision")
    # a link, as people link big model files into a models folder: the projector is the one
    # beside the link, not beside the file it points to
    (where / "tiny-chat.gguf").symlink_to(tiny_model)
    write_tiny_projector(where / "mmproj-tiny-chat.gguf")
    return where


def engine_for(folder, parallel: int) -> LlamaCppEngine:
    eng = LlamaCppEngine(ModelCatalogue(folder), n_ctx=1024, n_threads=1, parallel=parallel)
    eng.worker("tiny-chat").wait_loaded(30)
    return eng


@pytest.fixture(scope="module")
def solo(folder):
    """Each request alone, one at a time, on one slot."""
    eng = engine_for(folder, 1)
    try:
        return [collect(eng.stream("tiny-chat", messages, greedy(), threading.Event()))
                for messages in REQUESTS]
    finally:
        eng.close()


def before_image(folder) -> int:
    """The tokens of REQUESTS' image prompts before the image."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(folder / "tiny-chat.gguf"), vocab_only=True, verbose=False)
    return len(vocab.tokenize(b"<|im_start|>user\nwhat is it\n", add_bos=False, special=True))


def test_images_reach_the_model_and_count_in_the_prompt(folder, solo):
    (sea, sea_done, _), (red, red_done, _), (blue, blue_done, _), _ = solo
    assert all(isinstance(d, Finished) and d.finish_reason == "length"
               for d in (sea_done, red_done, blue_done))
    assert red_done.prompt_tokens == blue_done.prompt_tokens  # 16 image tokens each, any size
    assert red != blue  # the pixels reach the model, not only the image's places
    # on the one slot, blue came after red: the text before the image was reused, not red
    assert blue_done.meta["prompt_cached"] == before_image(folder)


def test_image_chats_beside_others_get_their_solo_replies(folder, solo):
    eng = engine_for(folder, 4)
    try:
        results: dict[int, tuple] = {}
        queued = [threading.Event() for _ in REQUESTS]

        def one(i: int) -> None:
            if i:
                assert queued[i - 1].wait(60)
            stream = eng.stream("tiny-chat", REQUESTS[i], greedy(), threading.Event())
            queued[i].set()
            results[i] = collect(stream)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[i][0] for i in range(len(REQUESTS))] == [s[0] for s in solo]

        # the same image question again: its slot's cache serves all of it, the image too
        # (one token is decoded again for its logits), and the reply is the same
        again, done, _ = collect(eng.stream("tiny-chat", REQUESTS[1], greedy(), threading.Event()))
        assert again == solo[1][0]
        assert done.meta["prompt_cached"] == done.prompt_tokens - 1
        # the next turn of that conversation: its first prompt, image and all, is reused (the
        # tiny model's gibberish reply tokenizes otherwise when written back, so not that)
        turn = REQUESTS[1] + [{"role": "assistant", "content": again},
                              {"role": "user", "content": "and its colour?"}]
        _, later, _ = collect(eng.stream("tiny-chat", turn, greedy(), threading.Event()))
        assert later.meta["prompt_cached"] >= done.prompt_tokens
    finally:
        eng.close()
