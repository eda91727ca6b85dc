"""Tokens/s of a 128-token reply through bchat's websocket vs llama-cpp-python directly.

Same model file, same thread count, same prompt, greedy decoding. Prints a table of medians:
bchat with the model in its runner process (the default) and in the web process
(BCHAT_MODEL_RUNNER=inline), so the cost of the process hop shows in tok/s and first token.

    .venv/bin/python bench/chat_speed.py [--model PATH] [--threads N] [--runs 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


def start_bchat(model_path: str, threads: int, extra_env: dict | None = None):
    """`bchat serve` in its own process, as a user runs it; returns (process, base URL)."""
    import socket
    import subprocess

    from conftest import migrate

    tmp = tempfile.mkdtemp()
    url = f"sqlite:///{tmp}/bench.sqlite3"
    migrate(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_MODEL_PATH": model_path,
           "BCHAT_SECRET_KEY": "bench", "BCHAT_N_THREADS": str(threads), "BCHAT_N_CTX": "2048",
           "BCHAT_PRELOAD_MODELS": "1", **(extra_env or {})}
    proc = subprocess.Popen([str(ROOT / ".venv/bin/bchat"), "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    from helpers import HttpSession

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if HttpSession(base).request("GET", "/healthz")[0] == 200:
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("bchat did not start")


def through_bchat(model_path: str, threads: int, tokens: int, runs: int,
                  runner: str = "process") -> list[dict]:
    from helpers import HttpSession, timed_reply

    proc, base = start_bchat(model_path, threads, {"BCHAT_MODEL_RUNNER": runner})
    results = []
    try:
        ws = HttpSession(base).ws()
        for _ in range(runs + 1):  # the first run warms up
            sent, first, end, message = timed_reply(
                ws, PROMPT, options={"temperature": 0, "max_tokens": tokens}
            )
            n = message["usage"]["completion_tokens"]
            results.append({"tokens": n, "ttft_s": first - sent,
                            "tok_s": (n - 1) / (end - first) if n > 1 else 0.0,
                            "reported_tok_s": message["tokens_per_second"]})
        ws.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return results[1:]


def direct(model_path: str, threads: int, tokens: int, runs: int) -> list[dict]:
    from llama_cpp import Llama

    llama = Llama(model_path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                  verbose=False)
    results = []
    for _ in range(runs + 1):
        llama.reset()  # bchat re-uses the prefix cache across turns, but each run here is fresh
        sent = time.perf_counter()
        first = None
        n = 0
        for chunk in llama.create_chat_completion(
            [{"role": "user", "content": PROMPT}], temperature=0, max_tokens=tokens, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        results.append({"tokens": n, "ttft_s": first - sent,
                        "tok_s": (n - 1) / (end - first) if n > 1 else 0.0})
    return results[1:]


def main() -> None:
    from webapp.config import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    d = direct(args.model, args.threads, args.tokens, args.runs)
    b = through_bchat(args.model, args.threads, args.tokens, args.runs, "process")
    i = through_bchat(args.model, args.threads, args.tokens, args.runs, "inline")

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print(f"model {Path(args.model).name}, {args.threads} threads, max {args.tokens} tokens, "
          f"median of {args.runs} runs, greedy")
    print(f"{'path':<28}{'tokens':>8}{'tok/s':>10}{'first token':>14}")
    print(f"{'llama-cpp-python direct':<28}{med(d, 'tokens'):>8.0f}{med(d, 'tok_s'):>10.1f}"
          f"{med(d, 'ttft_s') * 1000:>11.0f} ms")
    print(f"{'bchat websocket, runner':<28}{med(b, 'tokens'):>8.0f}{med(b, 'tok_s'):>10.1f}"
          f"{med(b, 'ttft_s') * 1000:>11.0f} ms")
    print(f"{'bchat websocket, inline':<28}{med(i, 'tokens'):>8.0f}{med(i, 'tok_s'):>10.1f}"
          f"{med(i, 'ttft_s') * 1000:>11.0f} ms")
    print(f"bchat (runner) / direct tok/s ratio: {med(b, 'tok_s') / med(d, 'tok_s'):.3f}  "
          f"(bchat's own reported decode rate: {med(b, 'reported_tok_s'):.1f} tok/s)")
    print(f"process hop: first token {(med(b, 'ttft_s') - med(i, 'ttft_s')) * 1000:+.1f} ms, "
          f"tok/s x{med(b, 'tok_s') / med(i, 'tok_s'):.3f} (runner vs inline)")


if __name__ == "__main__":
    main()
