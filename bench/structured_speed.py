"""Tokens/s of grammar-constrained vs free-text decoding on the embedded engine (SmolLM2).

1. End to end: the engine in process (no HTTP), the same prompt, one request at a time,
   through the batched worker with 4 slots and with 1 (a grammar sampler checked beside the
   slot's chain). Decode tok/s per mode, and the prompt's tokens: a tool call's prompt carries
   the tool list (in the model's own template where it has a tools section, else bchat's
   instructions), so its extra tokens over free text are what tools cost before decoding.
2. Where the time goes: the same sampler chains driven by hand, timing llama_decode and
   llama_sampler_sample apart, per token. Sampling runs on one thread, so its cost (the
   grammar checks every candidate of the 49k vocabulary) stays meaningful on a busy machine,
   where the end-to-end figures swing with whatever else runs.

3. With --checks (no decoding): how long the schema checks and the grammar's compilation take
   for an ordinary schema, for the worst ones that pass the limits (README, Security) and for
   the three that crashed, exhausted or stalled the server (issue 20), and the worst time one
   token's grammar step takes for each that passes (the whole vocabulary masked, as when the
   model's own pick is refused), on the model's vocabulary.

    .venv/bin/python bench/structured_speed.py [--model PATH] [--threads N] [--tokens 128] [--runs 2]
    .venv/bin/python bench/structured_speed.py --prompts [--model PATH]
    .venv/bin/python bench/structured_speed.py --checks [--model PATH]
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


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def main() -> int:
    from webapp.catalogue import ModelCatalogue
    from webapp.config import bundled_model_path
    from webapp.engines.base import Finished, timed
    from webapp.engines.llamacpp import LlamaCppEngine
    from webapp.options import GenerationOptions

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--checks", action="store_true", help="only time checks and grammars")
    parser.add_argument("--prompts", action="store_true",
                        help="only count the prompt tokens of each mode (no decoding)")
    args = parser.parse_args()
    if args.checks:
        checks(args)
        return 0
    modes = {
        "free text": {},
        "json_schema": {"response_format": {"type": "json_schema",
                                            "json_schema": {"name": "people", "schema": SCHEMA}}},
        "json_object": {"response_format": {"type": "json_object"}},
        "tool call": {"tools": TOOLS, "tool_choice": "required"},
    }
    if args.prompts:
        args.runs, args.tokens = 1, 1
    print(f"model {Path(args.model).name}, {args.threads} threads, {args.tokens} tokens, "
          f"median of {args.runs}")
    for parallel in (4,) if args.prompts else (4, 1):
        engine = LlamaCppEngine(ModelCatalogue(args.model), n_ctx=2048, n_threads=args.threads,
                                parallel=parallel, preload=True)
        model = engine.models()[0].id
        speeds: dict[str, list[float]] = {name: [] for name in modes}
        prompts: dict[str, int] = {}
        for run in range(args.runs):  # modes interleaved, so a busy moment hits them alike
            for name, extra in modes.items():
                options = GenerationOptions.parse({"max_tokens": args.tokens, "temperature": 0.7,
                                                   "seed": run, **extra}, allow_tools=True)
                for item in timed(engine.stream(model, [{"role": "user", "content": PROMPT}],
                                                options, threading.Event())):
                    if isinstance(item, Finished):
                        speeds[name].append(item.tokens_per_second or 0.0)
                        prompts[name] = item.prompt_tokens
        results = {name: statistics.median(values) for name, values in speeds.items()}
        engine.close()
        worker = f"{parallel} slot(s)"
        base = results["free text"]
        for name, speed in results.items():
            if args.prompts:
                print(f"{name:12s} prompt {prompts[name]} tokens "
                      f"(+{prompts[name] - prompts['free text']} over free text)")
                continue
            print(f"{worker:22s} {name:12s} {speed:7.1f} tok/s  ({speed / base:.2f}x free text)"
                  f"  prompt {prompts[name]} tokens (+{prompts[name] - prompts['free text']})")
    if not args.prompts:
        breakdown(args, modes)
    return 0


def breakdown(args, modes) -> None:
    from llama_cpp import Llama, llama_cpp

    from webapp.engines.inference import PromptBuilder, start_grammar
    from webapp.options import GenerationOptions

    llama = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads,
                  n_threads_batch=args.threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    prompt = PromptBuilder(llama).tokens([{"role": "user", "content": PROMPT}])
    totals = {name: [0.0, 0.0, 0] for name in modes}  # decode s, sample s, tokens
    for run in range(args.runs):
        for name, extra in modes.items():
            grammar = GenerationOptions.parse(extra, allow_tools=True).grammar
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


def _overlapping(n: int) -> dict:
    return {"anyOf": [{"type": "object", "required": ["x"],
                       "properties": {"x": {"type": "string", "maxLength": 60 + i}}}
                      for i in range(n)]}


# (name, schema, a text that follows it, to walk the grammar token by token)
CHECK_CASES = [
    ("ordinary (the README's person)", {
        "type": "object", "required": ["name", "age"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 40},
                       "age": {"type": "integer", "minimum": 0, "maximum": 130}}},
     '{"name": "Ada Lovelace", "age": 36}'),
    ("this bench's people schema", SCHEMA,
     '{"people": [{"name": "Bo", "age": 7, "mood": "calm", "story": "a dog"}]}'),
    ("worst passing: maxLength 1000", {"type": "string", "maxLength": 1000}, '"' + "ab " * 300),
    ("worst passing: pattern a{0,1000}", {"type": "string", "pattern": "^a{0,1000}$"},
     '"' + "a" * 900),
    ("worst passing: pattern read 16 ways", {"type": "string", "pattern": "^.{0,15}.{0,15}$"},
     '"' + "abcdefghijklmnopqrstuvwxyz"),
    ("worst passing: pattern (a|a|…16)*", {"type": "string", "pattern": "^(" + "|".join(
        "a" * 16) + ")*$"}, '"' + "a" * 200),
    ("worst passing: 16 overlapping anyOf", _overlapping(16), '{"x": "' + "ab " * 20),
    ("worst passing: 100x100 arrays of strings", {
        "type": "array", "maxItems": 100, "items": {
            "type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 100}}},
     '[["' + "ab " * 30 + '", "x"], ["y'),
    ("refused: pattern a{0,100000}", {"type": "string", "pattern": "^a{0,100000}$"}, ""),
    ("refused: maxLength 1e9", {"type": "string", "maxLength": 1_000_000_000}, ""),
    ("refused: nested repetition", {"type": "string", "pattern": "^((a{0,50}){0,50}){0,50}$"},
     ""),
    ("refused: 17 overlapping anyOf", _overlapping(17), ""),
]


def checks(args) -> None:
    import ctypes

    import numpy as np
    from llama_cpp import llama_cpp

    from webapp.errors import Invalid
    from webapp.options import GenerationOptions

    GenerationOptions.parse({"response_format": {"type": "json_object"}})  # imports, once
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    print(f"vocabulary of {Path(args.model).name}: {n_vocab} tokens; times: best of 5 for the "
          f"checks, the worst token for the grammar")
    for name, schema, text in CHECK_CASES:
        raw = {"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": schema}}}
        spent, verdict = [], ""
        for _ in range(5):
            began = time.perf_counter()
            try:
                grammar = GenerationOptions.parse(raw).grammar
                verdict = f"passes, grammar {len(grammar):,} chars"
            except Invalid as exc:
                grammar, verdict = None, f"refused: {exc.message[:90]}"
            spent.append(time.perf_counter() - began)
        line = f"  {name:42s} checks+compile {min(spent) * 1000:7.2f} ms  {verdict}"
        if grammar:
            began = time.perf_counter()
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            line += f"; with vocab {(time.perf_counter() - began) * 1000:.2f} ms"
            tokens = (llama_cpp.llama_token * (len(text) + 8))()
            n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), tokens,
                                         len(text) + 8, False, False)
            data = np.empty(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            worst = 0.0
            for token in tokens[:n]:
                data["id"], data["logit"], data["p"] = np.arange(n_vocab), 0.0, 0.0
                candidates = llama_cpp.llama_token_data_array(
                    data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                    size=n_vocab, selected=-1, sorted=False)
                began = time.perf_counter()
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
                allowed = data["logit"][data["id"] == token][0] != -np.inf
                if allowed:
                    llama_cpp.llama_sampler_accept(sampler, token)
                worst = max(worst, time.perf_counter() - began)
                if not allowed:
                    break
            llama_cpp.llama_sampler_free(sampler)
            line += f"; worst token {worst * 1000:.1f} ms over {n}"
        print(line)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    sys.exit(main())
