"""Tokens/s of grammar-constrained vs free-text decoding on the embedded engine (SmolLM2).

Runs the engine in process (no HTTP), the same prompt, one request at a time, through both
workers: the batched one (a grammar sampler at the head of the slot's chain) and the
one-at-a-time one (Llama.generate with a LlamaGrammar). Prints decode tok/s per mode.

    .venv/bin/python bench/structured_speed.py [--model PATH] [--threads N] [--tokens 128] [--runs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Describe three people and their pets in detail."
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                            "maximum": 120},
                       "mood": {"enum": ["happy", "sad", "calm"]},
                       "story": {"type": "string"}},
        "required": ["name", "age", "mood", "story"]}}},
    "required": ["people"],
}


def main() -> int:
    from webapp.config import bundled_model_path
    from webapp.engines.base import Finished, GenerationOptions
    from webapp.engines.llamacpp import LlamaCppEngine
    from webapp.model_files import ModelCatalogue

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    modes = {
        "free text": {},
        "json_schema": {"response_format": {"type": "json_schema",
                                            "json_schema": {"name": "people", "schema": SCHEMA}}},
        "json_object": {"response_format": {"type": "json_object"}},
    }
    print(f"model {Path(args.model).name}, {args.threads} threads, {args.tokens} tokens, "
          f"median of {args.runs}")
    for parallel in (4, 1):
        engine = LlamaCppEngine(ModelCatalogue(args.model), n_ctx=2048, n_threads=args.threads,
                                parallel=parallel, preload=True)
        model = engine.models()[0].id
        speeds: dict[str, list[float]] = {name: [] for name in modes}
        for run in range(args.runs):  # modes interleaved, so a busy moment hits them alike
            for name, extra in modes.items():
                options = GenerationOptions.parse({"max_tokens": args.tokens, "temperature": 0.7,
                                                   "seed": run, **extra})
                for item in engine.stream(model, [{"role": "user", "content": PROMPT}], options,
                                          threading.Event()):
                    if isinstance(item, Finished):
                        speeds[name].append(item.tokens_per_second or 0.0)
        results = {name: statistics.median(values) for name, values in speeds.items()}
        engine.close()
        worker = "batched worker" if parallel > 1 else "one-at-a-time worker"
        base = results["free text"]
        for name, speed in results.items():
            print(f"{worker:22s} {name:12s} {speed:7.1f} tok/s  ({speed / base:.2f}x free text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
