"""How long fitting a long history to the context takes (PromptBuilder.fit), on the tiny test
model and the bundled SmolLM2: 10,000 short messages and a few other shapes, cold (nothing
tokenized before) and warm (the same history again, as the next turn of a chat finds it).

The target is under 50 ms for 10,000 short messages. Fitting runs on the request's thread, so
these figures are what a sender waits, never what other chats wait.

    .venv/bin/python bench/fit_speed.py [--messages 10000] [--n-ctx 4096] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def history(n: int, words: int = 2) -> list[dict[str, str]]:
    text = " ".join(["water"] * words)
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{text} {i}"}
            for i in range(n)]


BOOK = [{"role": "system", "content": "Book"},
        {"role": "user", "content": "What is the best book"}] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from llama_cpp import Llama
    from tiny_model import write_tiny_model

    from webapp.config import bundled_model_path
    from webapp.engines.inference import PromptBuilder

    tiny = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny-chat.gguf")
    shapes = [(f"{args.messages} short", history(args.messages)),
              ("2,000 of llama.cpp's test_context_size_exceeded", BOOK),
              ("800 short (84 s before)", history(800)),
              ("200 of ~100 words", history(200, 100))]
    print(f"n_ctx {args.n_ctx}, max_tokens 512; milliseconds, best of {args.runs}")
    for path in (tiny, bundled_model_path()):
        llama = Llama(str(path), n_ctx=32, verbose=False)
        print(f"\n{path.name}")
        for label, messages in shapes:
            cold, warm = [], []
            for _ in range(args.runs):
                builder = PromptBuilder(llama)  # an empty token cache
                started = time.perf_counter()
                tokens, dropped, _ = builder.fit(messages, None, args.n_ctx, 512)
                cold.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                builder.fit(messages, None, args.n_ctx, 512)
                warm.append((time.perf_counter() - started) * 1000)
            print(f"  {label:55} cold {min(cold):7.1f} (median {statistics.median(cold):7.1f})"
                  f"  warm {min(warm):6.1f}  kept {len(messages) - dropped:5} "
                  f"messages, {len(tokens)} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
