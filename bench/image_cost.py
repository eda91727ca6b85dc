"""What an image costs the embedded engine, and the chats beside it.

No vision model may be downloaded here, so the projector is random weights in a real shape:
by default a ViT-B/16 at 224 pixels (768 wide, 12 layers: 196 image tokens, CLIP ViT-B's
size) into the bundled SmolLM2-135M (576-wide embeddings), written with
tests/tiny_model.write_tiny_projector. The numbers are llama.cpp's own work (decode the PNG,
encode it, decode its embeddings into the context), not its answers, which are noise.

It prints: the first image's prompt time (the reply's prompt_ms), the same question again
(served from the slot's cache), and, with a text chat streaming in another slot, the longest
wait between two of that chat's tokens while the image is evaluated, against its usual one.

    .venv/bin/python bench/image_cost.py               # ViT-B/16-224 shaped
    .venv/bin/python bench/image_cost.py --tiny        # the tests' tiny projector (16 tokens)

On the 2-core machine of 2026-12-07 (CPU build, 1 thread, other work beside it), ViT-B/16-224
shaped: 233 prompt tokens (196 of them the image), prompt_ms 1088 the first time, 22 the same
question again (232 cached); a new image beside a chat streaming at a median 13 ms a token
held that chat's longest gap to 829 ms. The tiny projector: prompt_ms 100, then 10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny projector")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bchat-image-cost-") as where:
        measure(Path(where), args)


def measure(folder: Path, args: argparse.Namespace) -> None:
    from test_images import png
    from tiny_model import write_tiny_projector

    from webapp import images
    from webapp.catalogue import ModelCatalogue
    from webapp.config import bundled_model_path
    from webapp.engines.base import Finished, Token
    from webapp.engines.llamacpp import LlamaCppEngine
    from webapp.options import GenerationOptions

    model = bundled_model_path()
    (folder / "smol.gguf").symlink_to(model)
    shape = (dict(dim=32, layers=2, heads=4, ff=64, image_size=32, patch=8) if args.tiny else
             dict(dim=768, layers=12, heads=12, ff=3072, image_size=224, patch=16))
    began = time.perf_counter()
    write_tiny_projector(folder / "mmproj-smol.gguf", text_dim=576, **shape)
    print(f"projector {shape}: written in {time.perf_counter() - began:.1f} s, "
          f"{(folder / 'mmproj-smol.gguf').stat().st_size / 1e6:.0f} MB")

    engine = LlamaCppEngine(ModelCatalogue(folder), n_ctx=2048, n_threads=args.threads,
                            parallel=2)
    engine.worker("smol").wait_loaded(120)
    question = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        images.part("image/png", png(640, 480, (40, 120, 200)))]}]
    options = GenerationOptions(temperature=0.0, max_tokens=4)

    def ask() -> Finished:
        return [c for c in engine.stream("smol", question, options, threading.Event())
                if isinstance(c, Finished)][-1]

    first = ask()
    print(f"image question: {first.prompt_tokens} prompt tokens, prompt_ms "
          f"{first.meta['prompt_ms']} (image encoded, its embeddings and the text decoded: the "
          "PNG was decoded on the request's thread before)")
    again = ask()
    print(f"same question again: prompt_cached {again.meta['prompt_cached']}, "
          f"prompt_ms {again.meta['prompt_ms']}")

    # A text chat streaming in the other slot while a new image is evaluated.
    gaps: list[float] = []
    streaming = threading.Event()

    def talk() -> None:
        last = None
        story = [{"role": "user", "content": "Write a long story about a lighthouse."}]
        for chunk in engine.stream("smol", story, GenerationOptions(temperature=0.0,
                                                                   max_tokens=160),
                                   threading.Event()):
            if isinstance(chunk, Token):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if len(gaps) == 20:
                    streaming.set()

    talker = threading.Thread(target=talk)
    talker.start()
    streaming.wait(120)
    question[0]["content"][1] = images.part("image/png", png(480, 640, (200, 60, 30)))
    other = ask()
    talker.join(300)
    engine.close()
    print(f"new image beside a streaming chat: its prompt_ms {other.meta['prompt_ms']}; the "
          f"text chat's gaps between tokens: median {statistics.median(gaps) * 1000:.0f} ms, "
          f"longest {max(gaps) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
