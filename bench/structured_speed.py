"""Tokens/s of grammar-constrained vs free-text decoding on the embedded engine (SmolLM2).

1. End to end: the engine in process (no HTTP), the same prompt, one request at a time,
   through both workers: the batched one (a grammar sampler at the head of the slot's chain)
   and the one-at-a-time one (Llama.generate with a LlamaGrammar). Decode tok/s per mode.
2. Where the time goes: the same sampler chains driven by hand, timing llama_decode and
   llama_sampler_sample apart, per token. Sampling runs on one thread, so its cost (the
   grammar checks every candidate of the 49k vocabulary) stays meaningful on a busy machine,
   where the end-to-end figures swing with whatever else runs.

    .venv/bin/python bench/structured_speed.py [--model PATH] [--threads N] [--tokens 128] [--runs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
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
    breakdown(args, modes)
    return 0


def breakdown(args, modes) -> None:
    from llama_cpp import Llama, llama_cpp

    from webapp.engines.base import GenerationOptions
    from webapp.engines.llamacpp import PromptBuilder, start_grammar

    llama = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads,
                  n_threads_batch=args.threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    prompt = PromptBuilder(llama).tokens([{"role": "user", "content": PROMPT}])
    totals = {name: [0.0, 0.0, 0] for name in modes}  # decode s, sample s, tokens
    for run in range(args.runs):
        for name, extra in modes.items():
            grammar = GenerationOptions.parse(extra).grammar
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params())
            if grammar:
                llama_cpp.llama_sampler_chain_add(chain, start_grammar(vocab, grammar))
            for sampler in (llama_cpp.llama_sampler_init_top_k(40),
                            llama_cpp.llama_sampler_init_top_p(0.95, 1),
                            llama_cpp.llama_sampler_init_min_p(0.05, 1),
                            llama_cpp.llama_sampler_init_temp(0.7),
                            llama_cpp.llama_sampler_init_dist(run)):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
            llama.reset()
            llama.eval(prompt)
            for _ in range(args.tokens):
                began = time.perf_counter()
                token = llama_cpp.llama_sampler_sample(chain, llama._ctx.ctx, -1)
                sampled = time.perf_counter()
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                llama.eval([token])
                totals[name][0] += time.perf_counter() - sampled
                totals[name][1] += sampled - began
                totals[name][2] += 1
            llama_cpp.llama_sampler_free(chain)
    print("per token (same chains driven by hand):")
    for name, (decode, sample, n) in totals.items():
        print(f"  {name:12s} decode {decode / n * 1000:6.2f} ms   sample {sample / n * 1000:6.2f} ms"
              f"   ({n} tokens; sampling {sample / (decode + sample):.0%} of the time)")


if __name__ == "__main__":
    sys.exit(main())
