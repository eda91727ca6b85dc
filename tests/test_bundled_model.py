"""The real bundled SmolLM2-135M-Instruct through the embedded engine (slower: ~100 MB model)."""

from __future__ import annotations

import threading

import pytest

from webapp.catalogue import ModelCatalogue
from webapp.engines.base import Finished, Token, timed
from webapp.engines.llamacpp import LlamaCppEngine
from webapp.options import GenerationOptions

pytestmark = pytest.mark.slow


def test_smollm2_answers_a_question(bundled_model):
    catalogue = ModelCatalogue(bundled_model)
    (model,) = list(catalogue)
    assert model.quantization == "Q4_1" and model.has_chat_template
    engine = LlamaCppEngine(catalogue, n_ctx=2048, n_threads=1)
    try:
        chunks = list(timed(engine.stream(
            model.id,
            [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            GenerationOptions(temperature=0.0, max_tokens=64),
            threading.Event(),
        )))
    finally:
        engine.close()
    text = "".join(c.text for c in chunks if isinstance(c, Token))
    done = chunks[-1]
    assert isinstance(done, Finished)
    assert done.finish_reason in ("stop", "length")
    assert text.strip(), "a real reply"
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert done.completion_tokens > 0 and done.tokens_per_second > 0
