"""bchat's own overhead in front of an OpenAI-compatible upstream.

Starts `bchat worker` (the embedded model behind an OpenAI-compatible API) and bchat's web app
under gunicorn pointed at it (BCHAT_WORKER_URL), then runs the same load twice: 1 and 4
concurrent chats of N tokens through bchat's websocket, and the same chats straight at the
worker with the `openai` client. Prints aggregate tok/s and worst time-to-first-token of each,
and their ratios. Greedy decoding, so both paths generate the same tokens.

    .venv/bin/python bench/upstream_overhead.py [--model PATH] [--tokens 128] [--rounds 2]
    .venv/bin/python bench/upstream_overhead.py --upstream http://127.0.0.1:8080/v1 --upstream-model M
        (any other OpenAI-compatible server instead of bchat's worker)
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

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


def run_concurrently(n: int, one) -> tuple[float, float, int]:
    """Run ``one(i)`` in n threads at once; returns (aggregate tok/s, worst ttft s, tokens)."""
    results: list[tuple[float, float, int]] = []
    barrier = threading.Barrier(n)

    def task(i: int) -> None:
        barrier.wait()
        results.append(one(i))

    started = time.perf_counter()
    threads = [threading.Thread(target=task, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ended = time.perf_counter()
    tokens = sum(r[2] for r in results)
    return tokens / (ended - started), max(r[0] for r in results), tokens


def direct(base_url: str, model: str, tokens: int):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def one(_i: int):
        sent = time.perf_counter()
        first = None
        n = 0
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], stream=True,
            max_tokens=tokens, temperature=0, stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return (first - sent, time.perf_counter(), n)

    return one


def through_bchat(base: str, model: str, tokens: int):
    from helpers import HttpSession, timed_reply

    def one(_i: int):
        ws = HttpSession(base).ws(timeout=600)
        sent, first, end, message = timed_reply(
            ws, PROMPT, model=model, options={"temperature": 0, "max_tokens": tokens}
        )
        ws.close()
        return (first - sent, end, message["usage"]["completion_tokens"])

    return one


def main() -> None:
    from conftest import migrate
    from helpers import free_port, wait_for_http

    from webapp.config import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream", help="an OpenAI-compatible base URL instead of bchat worker")
    parser.add_argument("--upstream-model")
    args = parser.parse_args()

    procs = []
    env = {**os.environ, "BCHAT_MODEL_PATH": args.model}
    try:
        if args.upstream:
            upstream, model = args.upstream, args.upstream_model
            env["BCHAT_OPENAI_BASE_URL"] = upstream
            env["BCHAT_MODEL_PATH"] = "/nonexistent"  # only the upstream's models
        else:
            port = free_port()
            procs.append(subprocess.Popen([str(ROOT / ".venv/bin/bchat"), "worker", "--port", str(port)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for_http(f"http://127.0.0.1:{port}/health", procs[-1])
            upstream, model = f"http://127.0.0.1:{port}/v1", Path(args.model).stem
            env["BCHAT_WORKER_URL"] = f"http://127.0.0.1:{port}"
        url = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
        migrate(url)
        web_port = free_port()
        env.update(BCHAT_DATABASE_URL=url, BCHAT_SECRET_KEY="bench")
        procs.append(subprocess.Popen(
            [str(ROOT / ".venv/bin/gunicorn"), "-k", "gthread", "--threads", "16", "-w", "1",
             "--no-control-socket", "-b", f"127.0.0.1:{web_port}", "webapp:create_app()"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{web_port}"
        wait_for_http(base + "/healthz", procs[-1])

        paths = {"direct": direct(upstream, model, args.tokens),
                 "bchat": through_bchat(base, model, args.tokens)}
        for path in paths.values():  # warm up both (model load, prompt cache)
            path(0)
        figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for n in (1, 4):
                for name, path in paths.items():  # interleaved: same machine state for both
                    tps, ttft, _tokens = run_concurrently(n, path)
                    figures.setdefault((name, n), []).append((tps, ttft))
        print(f"upstream {upstream} model {model}, {args.tokens} tokens a chat, greedy, "
              f"median of {args.rounds} rounds")
        print(f"{'chats':>5} {'path':<8}{'aggregate tok/s':>17}{'worst first token':>19}")
        for n in (1, 4):
            row = {}
            for name in paths:
                tps = statistics.median(f[0] for f in figures[(name, n)])
                ttft = statistics.median(f[1] for f in figures[(name, n)])
                row[name] = (tps, ttft)
                print(f"{n:>5} {name:<8}{tps:>17.1f}{ttft * 1000:>16.0f} ms")
            overhead = 1 - row["bchat"][0] / row["direct"][0]
            extra = (row["bchat"][1] - row["direct"][1]) * 1000
            print(f"{'':>5} bchat/direct throughput {row['bchat'][0] / row['direct'][0]:.3f} "
                  f"(overhead {overhead * 100:.1f}%), first-token difference {extra:+.0f} ms")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
