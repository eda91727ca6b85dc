"""A class at once: page and API latency and server-chat tok/s, the model inline vs in its runner.

The README's gunicorn command on the bundled model, then for ``--seconds``: ``--students``
visitors each loading the page's API calls in a loop (models, conversations, a new chat's
rows: what 30 browser-engine users cost the web process), while ``--chats`` websocket
visitors stream 128-token server replies back to back. Run once per setup:

- before:  the model in the web process on every core (bchat's earlier defaults)
- after:   the model in its runner process, niced, one thread fewer than the cores (today's)

and, with ``--busy``, each again beside one CPU-bound process (another tenant, a test run):
the case where llama.cpp's spinning threads stalled (16 tokens in 50 s instead of 0.2 s).

    .venv/bin/python bench/class_load.py [--students 30] [--chats 4] [--seconds 20] [--busy]

Prints p50/p99 of the API calls, how many failed, and the server chats' aggregate tok/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


SETUPS = {  # name -> environment
    "before": {"BCHAT_MODEL_RUNNER": "inline", "BCHAT_N_THREADS": str(os.cpu_count() or 1)},
    "after": {"BCHAT_MODEL_RUNNER": "process"},
}


def start(setup: dict[str, str]) -> tuple[subprocess.Popen, str]:
    from conftest import migrate
    from helpers import free_port, wait_for_http

    tmp = tempfile.mkdtemp()
    url = f"sqlite:///{tmp}/class.sqlite3"
    migrate(url)
    port = free_port()
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_SECRET_KEY": "bench",
           "BCHAT_BROWSER_FORMAT": "original",
           "BCHAT_INSTANCE_PATH": tmp, "BCHAT_RATE_LIMIT": "100000/minute",
           "BCHAT_MAX_QUEUED_PER_VISITOR": "100", "BCHAT_PRELOAD_MODELS": "1",
           # the whole class comes from 127.0.0.1: no cap per address
           "BCHAT_MAX_REPLIES_PER_ADDRESS": "0", "BCHAT_SOCKET_SHARE_PER_ADDRESS": "1", **setup}
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn"), "-c", "python:webapp.gunicorn_conf", "-k", "gthread",
         "--threads", "48", "-w", "1", "--no-control-socket", "-b", f"127.0.0.1:{port}",
         "webapp:create_app()"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/healthz", proc)
    return proc, base


def student(base: str, until: float, latencies: list[float], failures: list[str]) -> None:
    from helpers import HttpSession

    visitor = HttpSession(base)
    visitor.visit()
    while time.monotonic() < until:
        for method, path, body in (("GET", "/api/models", None), ("GET", "/api/conversations", None),
                                   ("POST", "/api/conversations", {"title": "homework"})):
            sent = time.perf_counter()
            try:
                status, _h, _b = visitor.request(method, path, body)
            except OSError as exc:
                failures.append(type(exc).__name__)
                continue
            latencies.append(time.perf_counter() - sent)
            if status >= 400:
                failures.append(str(status))


def chatter(base: str, until: float, tokens: list[int], failures: list[str]) -> None:
    from helpers import HttpSession

    ws = HttpSession(base).ws(timeout=120)
    while time.monotonic() < until:
        ws.chat("Write a long story about a dragon who bakes bread.",
                options={"temperature": 0, "max_tokens": 128})
        final, _frames = ws.until("done", "error")
        if final["type"] == "error":
            failures.append(final.get("code", "error"))
        else:
            tokens.append(final["message"]["usage"]["completion_tokens"])
    ws.close()


def run(setup: str, students: int, chats: int, seconds: float, busy: bool) -> dict:
    proc, base = start(SETUPS[setup])
    stop_spin = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop_spin,)) if busy else None
    try:
        # warm up: the model answers once before the clock starts
        chatter(base, time.monotonic(), [], [])
        if spinner:
            spinner.start()
        latencies: list[float] = []
        failures: list[str] = []
        tokens: list[int] = []
        began = time.monotonic()
        until = began + seconds
        threads = [threading.Thread(target=student, args=(base, until, latencies, failures))
                   for _ in range(students)]
        threads += [threading.Thread(target=chatter, args=(base, until, tokens, failures))
                    for _ in range(chats)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
    finally:
        stop_spin.set()
        if spinner:
            spinner.join()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    latencies.sort()
    return {"calls": len(latencies), "failures": len(failures),
            "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
            "tok_s": sum(tokens) / elapsed, "replies": len(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--chats", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--busy", action="store_true", help="also run each beside a CPU-bound process")
    args = parser.parse_args()
    setups = [("before", False), ("after", False)]
    if args.busy:
        setups += [("before", True), ("after", True)]
    print(f"{args.students} students (API loop) + {args.chats} server chats (128 tokens each, back "
          f"to back), {args.seconds:.0f} s, {os.cpu_count()} cores, the bundled model")
    print(f"{'setup':<10}{'neighbour':<11}{'calls':>7}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'replies':>9}{'tok/s':>8}")
    for setup, busy in setups:
        r = run(setup, args.students, args.chats, args.seconds, busy)
        print(f"{setup:<10}{'1 busy' if busy else '-':<11}"
              f"{r['calls']:>7}{r['failures']:>8}{r['p50']:>9.0f}{r['p99']:>9.0f}{r['replies']:>9}"
              f"{r['tok_s']:>8.1f}")


if __name__ == "__main__":
    main()
