"""A class at once: N browser-engine visitors and M server chats on the README's gunicorn command.

Each visitor does what the page does for a browser-engine turn, over and over in its own
conversation: post the message, open the conversation (the window the page opens, api.js
MESSAGE_WINDOW), write the reply in the browser (``--think`` seconds: the model runs in the
visitor's tab, not on the server), post the reply (its streaming row, then the settled one, as
engines/browser.js does), and list the conversations (the sidebar's first page). Meanwhile
``--chats`` websocket visitors stream 128-token server replies back to back.

The server is the README's gunicorn line (marked <!-- gunicorn-command -->) with ``-w`` set
to ``--workers``, once per database (SQLite, then a throwaway PostgreSQL cluster, tests/pg.py)
and per setup:

- after:   the model in its runner process, niced, one thread fewer than the cores (today's)
- before:  the model in the web process on every core (bchat's earlier defaults)

and, with ``--busy``, each again beside one CPU-bound process (another tenant, a test run).

The visitors are spread over ``--client-processes`` processes, and each keeps its connection
open through a burst of requests, as a browser tab does (``--client keepalive``, the default).
``--client urllib`` is the earlier generator: every visitor a thread of one process, a new
connection per request; there the generator's own GIL queue is part of every latency.

    .venv/bin/python bench/class_load.py [--students 100] [--chats 4] [--workers 4]
        [--seconds 30] [--think 2] [--databases sqlite,postgresql] [--setups after] [--busy]
        [--client keepalive|urllib] [--client-processes 4] [--model PATH]

Prints, per run: requests, errors, p50/p95/p99 of every request as the visitor saw it, the p99
of each step, the p99 of the app's own time (its Server-Timing header: the rest is waiting for
a core, a thread or a connection), and the server chats' replies, aggregate tok/s and worst
time to the first token.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

STEPS = ("post", "open", "reply", "settle", "list")


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


SETUPS = {  # name -> environment
    "before": {"BCHAT_MODEL_RUNNER": "inline", "BCHAT_N_THREADS": str(os.cpu_count() or 1)},
    "after": {"BCHAT_MODEL_RUNNER": "process"},
}


def readme_command(workers: int, port: int) -> list[str]:
    """The README's gunicorn line, with ``-w`` and the bound port replaced."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- gunicorn-command -->\s*```\w*\n(.+?)\n```", text, re.S)
    assert match, "README.md marks its gunicorn command with <!-- gunicorn-command -->"
    command = shlex.split(match.group(1).replace("\\\n", " "))
    command[command.index("-w") + 1] = str(workers)
    command[command.index("-b") + 1] = f"127.0.0.1:{port}"
    command[0] = str(ROOT / command[0])
    return command


@contextmanager
def database(kind: str):
    """A fresh, migrated database URL of ``kind``."""
    from conftest import migrate

    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/class.sqlite3"
            migrate(url)
            yield url
        return
    from pg import PostgresCluster

    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database()
        migrate(url)
        yield url
    finally:
        cluster.stop()


def start(url: str, setup: dict[str, str], workers: int, model: str | None) -> tuple[subprocess.Popen, str]:
    from helpers import free_port, wait_for_http

    tmp = tempfile.mkdtemp()
    port = free_port()
    env = {**os.environ, "BCHAT_DATABASE_URL": url, "BCHAT_SECRET_KEY": "bench",
           "BCHAT_BROWSER_FORMAT": "original",
           "BCHAT_INSTANCE_PATH": tmp, "BCHAT_RATE_LIMIT": "100000/minute",
           "BCHAT_MAX_QUEUED_PER_VISITOR": "100", "BCHAT_PRELOAD_MODELS": "1",
           # the whole class comes from 127.0.0.1: no cap per address
           "BCHAT_MAX_REPLIES_PER_ADDRESS": "0", "BCHAT_SOCKET_SHARE_PER_ADDRESS": "1", **setup}
    if model:
        env["BCHAT_MODEL_PATH"] = model
    proc = subprocess.Popen(readme_command(workers, port), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(base + "/healthz", proc, timeout=120)
    return proc, base


SERVER_TIMING = re.compile(r"app;dur=([0-9.]+)")


class KeepAliveVisitor:
    """A browser tab's HTTP: one connection kept open through a burst of requests, the
    session cookie sent back. ``fresh()`` drops the connection before the next burst, as the
    server's keep-alive (gunicorn's 2 s) would while the visitor thinks."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.conn: http.client.HTTPConnection | None = None
        self.cookie = ""

    def fresh(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except OSError:
            self.fresh()
            raise
        for value in response.headers.get_all("Set-Cookie") or []:
            if value.startswith("bchat="):
                self.cookie = value.split(";", 1)[0]
        if response.will_close:
            self.fresh()
        return response.status, dict(response.headers), raw

    def visit(self) -> None:
        status, _headers, _raw = self.request("GET", "/")
        assert status == 200


class UrllibVisitor:
    """The earlier generator's visitor (tests/helpers.py): a new connection per request."""

    def __init__(self, base: str) -> None:
        from helpers import HttpSession

        self.session = HttpSession(base)

    def fresh(self) -> None:
        pass

    def request(self, method: str, path: str, body=None):
        return self.session.request(method, path, body)

    def visit(self) -> None:
        self.session.visit()


CLIENTS = {"keepalive": KeepAliveVisitor, "urllib": UrllibVisitor}


class Tally:
    """Latencies by step, the app's own time and the failures, shared by the visitors' threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.app_times: list[float] = []
        self.failures: list[str] = []
        self.sent = 0

    def call(self, visitor, step: str, method: str, path: str, body=None):
        """One request, timed; the JSON answer, or None when it failed (counted)."""
        sent = time.perf_counter()
        with self.lock:
            self.sent += 1
        try:
            status, headers, raw = visitor.request(method, path, body)
        except OSError as exc:
            with self.lock:
                self.failures.append(f"{step}: {type(exc).__name__}")
            return None
        took = time.perf_counter() - sent
        app_time = SERVER_TIMING.search(headers.get("Server-Timing", ""))
        with self.lock:
            self.latencies[step].append(took)
            if app_time:
                self.app_times.append(float(app_time.group(1)) / 1000)
            if status >= 400:
                self.failures.append(f"{step}: {status}")
                return None
        return json.loads(raw) if raw else {}


def student(base: str, until: float, think: float, tally: Tally, model: str, client: str) -> None:
    """A browser-engine visitor's turns, in one conversation, until the clock runs out."""
    visitor = CLIENTS[client](base)
    visitor.visit()
    time.sleep(random.uniform(0, think))  # the class does not press Enter in step
    visitor.fresh()
    created = tally.call(visitor, "post", "POST", "/api/conversations", {"title": "homework"})
    if created is None:
        return
    path = f"/api/conversations/{created['id']}"
    turn = 0
    while time.monotonic() < until:
        turn += 1
        user = tally.call(visitor, "post", "POST", f"{path}/messages",
                          {"role": "user", "content": f"question {turn}: why is the sky blue?"})
        if user is None or tally.call(visitor, "open", "GET", f"{path}?limit=50") is None:
            continue
        time.sleep(think)  # the model writes the reply in the visitor's browser
        visitor.fresh()
        reply = tally.call(visitor, "reply", "POST", f"{path}/messages", {
            "role": "assistant", "content": "", "status": "streaming", "parent_id": user["id"],
            "provenance": {"engine": "browser", "model": model, "backend": "wasm-mt"}})
        if reply is not None:
            tally.call(visitor, "settle", "PATCH", f"{path}/messages/{reply['id']}", {
                "content": "Rayleigh scattering: shorter wavelengths scatter more. " * 8,
                "status": "complete",
                "provenance": {"completion_tokens": 96, "tokens_per_second": 20.0}})
        tally.call(visitor, "list", "GET", "/api/conversations?limit=50")
        visitor.fresh()


def classroom(base: str, until: float, args, model: str, count: int, results) -> None:
    """One client process's share of the class: ``count`` visitors as threads; its tally goes
    back through ``results``."""
    tally = Tally()
    threads = [threading.Thread(target=student, args=(base, until, args.think, tally, model, args.client))
               for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"latencies": dict(tally.latencies), "app_times": tally.app_times,
                 "failures": tally.failures, "sent": tally.sent})


def chatter(base: str, until: float, tokens: list[int], first_tokens: list[float],
            failures: list[str]) -> None:
    """A server chat: 128-token replies back to back; the wait for each one's first token."""
    from helpers import HttpSession

    ws = HttpSession(base).ws(timeout=300)
    try:
        while time.monotonic() < until:
            sent = time.perf_counter()
            ws.chat("Write a long story about a dragon who bakes bread.",
                    options={"temperature": 0, "max_tokens": 128})
            first = None
            while True:
                frame = ws.recv()
                if frame["type"] == "token" and first is None:
                    first = time.perf_counter() - sent
                if frame["type"] in ("done", "error"):
                    break
            if frame["type"] == "error":
                failures.append(f"chat: {frame.get('code', 'error')}")
                continue
            tokens.append(frame["message"]["usage"]["completion_tokens"])
            if first is not None:
                first_tokens.append(first)
    finally:
        ws.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000 if ordered else float("nan")


def run(url: str, setup: str, args, busy: bool) -> dict:
    proc, base = start(url, SETUPS[setup], args.workers, args.model)
    stop_spin = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop_spin,)) if busy else None
    try:
        # warm up: the model answers once before the clock starts
        chatter(base, time.monotonic(), [], [], [])
        from helpers import HttpSession

        model = HttpSession(base).json("GET", "/api/models")[1]["default"] or "model"
        if spinner:
            spinner.start()
        tally = Tally()
        tokens: list[int] = []
        first_tokens: list[float] = []
        chat_failures: list[str] = []
        began = time.monotonic()
        until = began + args.seconds
        processes = max(1, args.client_processes if args.client == "keepalive" else 1)
        shares = [args.students // processes + (i < args.students % processes) for i in range(processes)]
        results = multiprocessing.Queue()
        clients = [multiprocessing.Process(target=classroom, args=(base, until, args, model, n, results))
                   for n in shares if n]
        threads = [threading.Thread(target=chatter, args=(base, until, tokens, first_tokens, chat_failures))
                   for _ in range(args.chats)]
        for c in clients:
            c.start()
        for t in threads:
            t.start()
        for _ in clients:
            part = results.get()
            for step, values in part["latencies"].items():
                tally.latencies[step].extend(values)
            tally.app_times.extend(part["app_times"])
            tally.failures.extend(part["failures"])
            tally.sent += part["sent"]
        for c in clients:
            c.join()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
    finally:
        stop_spin.set()
        if spinner:
            spinner.join()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    every = [x for step in STEPS for x in tally.latencies[step]]
    return {"requests": tally.sent,
            "errors": len(tally.failures) + len(chat_failures),
            "failures": sorted(set(tally.failures + chat_failures))[:5],
            "p50": percentile(every, 0.50), "p95": percentile(every, 0.95),
            "p99": percentile(every, 0.99),
            "steps": {step: percentile(tally.latencies[step], 0.99) for step in STEPS},
            "app_p99": percentile(tally.app_times, 0.99),
            "replies": len(tokens), "tok_s": sum(tokens) / elapsed,
            "first": max(first_tokens) * 1000 if first_tokens else float("nan"),
            "rate": len(every) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", type=int, default=100)
    parser.add_argument("--chats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn -w")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--think", type=float, default=2.0,
                        help="seconds a visitor's browser spends writing each reply")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--setups", default="after", help="after, before or both (before,after)")
    parser.add_argument("--busy", action="store_true", help="also run each beside a CPU-bound process")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="keepalive",
                        help="keepalive: connections kept through a burst, visitors spread over "
                             "processes; urllib: the earlier one-process, connection-per-request client")
    parser.add_argument("--client-processes", type=int, default=4,
                        help="processes the visitors are spread over (keepalive only)")
    parser.add_argument("--model", help="a .gguf (default: the bundled model)")
    args = parser.parse_args()
    runs = [(setup, False) for setup in args.setups.split(",")]
    if args.busy:
        runs += [(setup, True) for setup in args.setups.split(",")]
    print(f"{args.students} browser-engine visitors (post, open, {args.think:g} s writing, reply, "
          f"list) + {args.chats} server chats (128 tokens, back to back), {args.seconds:.0f} s, "
          f"gunicorn -w {args.workers}, {os.cpu_count()} cores, "
          f"{Path(args.model).name if args.model else 'the bundled model'}, client {args.client}")
    print(f"{'database':<11}{'setup':<7}{'busy':<5}{'requests':>9}{'req/s':>7}{'errors':>7}"
          f"{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'app p99':>8}  {'p99 by step (ms)':<40}"
          f"{'chats':>6}{'tok/s':>7}{'worst 1st token ms':>19}")
    for kind in args.databases.split(","):
        for setup, busy in runs:
            with database(kind) as url:
                r = run(url, setup, args, busy)
            steps = " ".join(f"{step} {ms:.0f}" for step, ms in r["steps"].items())
            print(f"{kind:<11}{setup:<7}{'yes' if busy else '-':<5}{r['requests']:>9}{r['rate']:>7.0f}"
                  f"{r['errors']:>7}{r['p50']:>8.0f}{r['p95']:>8.0f}{r['p99']:>8.0f}{r['app_p99']:>8.0f}"
                  f"  {steps:<40}"
                  f"{r['replies']:>6}{r['tok_s']:>7.1f}{r['first']:>19.0f}", flush=True)
            if r["failures"]:
                print(f"  failures (first kinds): {', '.join(r['failures'])}")


if __name__ == "__main__":
    main()
