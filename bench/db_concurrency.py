"""Concurrent writers on one database: P processes x T threads post messages through the app.

Each process runs its own bchat app on its own loopback port (as gunicorn workers would share
one database); each of its threads posts messages over real HTTP to one of P conversations
owned by one visitor, so every conversation is written by every process at once, and every
fifth post also shares the conversation (the "create the share unless it exists" race). Then
the database is read back: every message must be there exactly once, and every conversation
must have exactly one share.

Meanwhile a probe in the parent's own app (its own loopback server, as one more gunicorn worker
would be) appends a message to a 1,000-message conversation every 50 ms: what a visitor with a
semester-long conversation waits for an append while the writers run (its p50/p99, and the
app's own share of it from the Server-Timing header).

    .venv/bin/python bench/db_concurrency.py                      # SQLite and PostgreSQL
    .venv/bin/python bench/db_concurrency.py --database postgresql --messages 50
    .venv/bin/python bench/db_concurrency.py --database postgresql+psycopg://u@host/db

``sqlite`` uses a temp file; ``postgresql`` starts a throwaway cluster (tests/pg.py); any
other value is an existing database URL, migrated to head first.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "db-concurrency-bench"
SHARE_EVERY = 5


@dataclass
class Report:
    database: str
    processes: int
    threads: int
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    lost: int = 0
    duplicated: int = 0
    shares_per_conversation: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)
    probe_app: list[float] = field(default_factory=list)
    probe_errors: int = 0

    def percentile(self, p: float, values: list[float] | None = None) -> float:
        values = self.latencies if values is None else values
        if not values:
            return math.nan
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    def line(self) -> str:
        return (f"{self.database}: {self.processes} processes x {self.threads} threads, "
                f"{self.requests} requests in {self.seconds:.1f} s ({self.requests / self.seconds:.0f}/s), "
                f"{self.errors} errors, p50 {self.percentile(50) * 1000:.0f} ms, "
                f"p99 {self.percentile(99) * 1000:.0f} ms; lost {self.lost}, duplicated {self.duplicated}, "
                f"shares per conversation {sorted(set(self.shares_per_conversation))}\n"
                f"  append to a {PROBE_MESSAGES:,}-message conversation meanwhile: "
                f"{len(self.probe)} appends, "
                f"{self.probe_errors} errors, p50 {self.percentile(50, self.probe) * 1000:.1f} ms, "
                f"p99 {self.percentile(99, self.probe) * 1000:.1f} ms; the app's own time "
                f"p50 {self.percentile(50, self.probe_app) * 1000:.1f} ms")


PROBE_MESSAGES = 1000
PROBE_EVERY_S = 0.05


def long_conversation(client) -> str:
    """A 1,000-message conversation, imported in one request (export format, a chain)."""
    messages = [{"id": f"m{i}", "parent_id": f"m{i - 1}" if i else None,
                 "role": "user" if i % 2 == 0 else "assistant",
                 "content": f"turn {i}: " + "words of a long semester " * 8}
                for i in range(PROBE_MESSAGES)]
    from webapp.exchange import FORMAT

    response = client.post("/api/conversations/import", json={
        "format": FORMAT, "version": 2,
        "conversation": {"title": "a semester", "current_message_id": messages[-1]["id"]},
        "messages": messages})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def probe(app, conversation: str, cookie: str, stop: threading.Event, report: Report) -> None:
    """Appends to ``conversation`` every PROBE_EVERY_S over real HTTP until ``stop``."""
    import logging
    import re

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        while not stop.wait(PROBE_EVERY_S):
            request = urllib.request.Request(
                f"{base}/api/conversations/{conversation}/messages", method="POST",
                data=json.dumps({"role": "user", "content": "one more question"}).encode(),
                headers={"Content-Type": "application/json", "Cookie": cookie, "Origin": base})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    timing = re.search(r"app;dur=([0-9.]+)", response.headers.get("Server-Timing", ""))
            except OSError:
                report.probe_errors += 1
                continue
            report.probe.append(time.perf_counter() - started)
            if timing:
                report.probe_app.append(float(timing.group(1)) / 1000)
    finally:
        server.shutdown()


def _config(database_url: str, model_path: str) -> dict:
    return {"DATABASE_URL": database_url, "MODEL_PATH": model_path, "SECRET_KEY": SECRET,
            "N_THREADS": 1}


# -- child: one app process and its writer threads -----------------------------------------

def child(spec: dict) -> None:
    import logging

    from werkzeug.serving import make_server

    from webapp import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = create_app(_config(spec["database_url"], spec["model_path"]))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":  # the parent starts every process at once
        return

    results: list[dict] = []

    def writer(t: int) -> None:
        conversation = spec["conversations"][(spec["index"] + t) % len(spec["conversations"])]
        latencies, errors, sent = [], [], []
        for i in range(spec["messages"]):
            content = f"p{spec['index']}-t{t}-m{i}"
            calls = [(f"/api/conversations/{conversation}/messages", {"role": "user", "content": content})]
            if i % SHARE_EVERY == SHARE_EVERY - 1:
                calls.append((f"/api/conversations/{conversation}/share", {}))
            for path, body in calls:
                request = urllib.request.Request(
                    base + path, data=json.dumps(body).encode(), method="POST",
                    headers={"Content-Type": "application/json", "Cookie": spec["cookie"], "Origin": base})
                started = time.perf_counter()
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        response.read()
                        ok = response.status in (200, 201)
                except urllib.error.HTTPError as err:
                    errors.append(f"{path}: HTTP {err.code} {err.read()[:200]!r}")
                    ok = None
                except OSError as err:
                    errors.append(f"{path}: {err}")
                    ok = None
                latencies.append(time.perf_counter() - started)
                if ok and path.endswith("/messages"):
                    sent.append([conversation, content])
        results.append({"latencies": latencies, "errors": errors, "sent": sent})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(spec["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.shutdown()
    app.extensions["bchat"].close()
    print(json.dumps({
        "latencies": [x for r in results for x in r["latencies"]],
        "errors": [x for r in results for x in r["errors"]],
        "sent": [x for r in results for x in r["sent"]],
    }), flush=True)


# -- parent --------------------------------------------------------------------------------

def run_workload(database_url: str, model_path: str, *, processes: int = 4, threads: int = 8,
                 messages: int = 25, label: str | None = None) -> Report:
    """Run the writers against an already-migrated database and check what was stored."""
    from sqlalchemy import func, select
    from sqlalchemy.engine import make_url

    from webapp import create_app
    from webapp.models import Conversation, Message, Share

    app = create_app(_config(database_url, model_path))
    try:
        client = app.test_client()
        client.get("/")
        cookie = f"bchat={client.get_cookie('bchat').value}"
        conversations = [
            client.post("/api/conversations", json={"title": f"c{i}"}).get_json()["id"]
            for i in range(processes)
        ]
        long_one = long_conversation(client)
        spec = {"database_url": database_url, "model_path": model_path, "threads": threads,
                "messages": messages, "conversations": conversations, "cookie": cookie}
        children = [
            subprocess.Popen([sys.executable, __file__, "--child", json.dumps({**spec, "index": p})],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            for p in range(processes)
        ]
        for proc in children:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"writer process did not start (said {line!r}, exit {proc.wait()})")
        report = Report(label or make_url(database_url).get_backend_name(), processes, threads)
        stop_probe = threading.Event()
        prober = threading.Thread(target=probe, args=(app, long_one, cookie, stop_probe, report))
        started = time.perf_counter()
        for proc in children:
            proc.stdin.write("go\n")
            proc.stdin.close()
        prober.start()
        outputs = []
        try:
            for proc in children:
                out = proc.stdout.read()
                if proc.wait(timeout=600) != 0 or not out.strip():
                    raise RuntimeError(f"a writer process failed (exit {proc.returncode})")
                outputs.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            stop_probe.set()
            prober.join()
        report.seconds = time.perf_counter() - started
        sent: Counter[tuple[str, str]] = Counter()
        for out in outputs:
            report.latencies += out["latencies"]
            report.errors += len(out["errors"])
            report.error_samples += out["errors"][:5]
            sent.update(tuple(x) for x in out["sent"])
        report.requests = len(report.latencies)

        db = app.extensions["bchat"].db
        with db.read() as session:
            stored = Counter(tuple(row) for row in session.execute(
                select(Conversation.public_id, Message.content).join(Message.conversation)
                .where(Conversation.public_id.in_(conversations))
            ))
            report.shares_per_conversation = [
                session.scalar(select(func.count(Share.id)).join(
                    Conversation, Share.conversation_id == Conversation.id
                ).where(Conversation.public_id == c)) or 0
                for c in conversations
            ]
        report.lost = sum((sent - stored).values())
        report.duplicated = sum((stored - sent).values())
        return report
    finally:
        app.extensions["bchat"].close()


def main() -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's webapp, and tests/pg.py
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", action="append",
                        help="sqlite, postgresql, or a database URL (repeatable; default: both kinds)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--messages", type=int, default=25, help="messages each thread posts")
    parser.add_argument("--model-path", help="GGUF for the apps' catalogue (default: the bundled one)")
    args = parser.parse_args()

    from alembic import command

    from webapp.cli import alembic_config
    from webapp.config import bundled_model_path

    model_path = args.model_path or str(bundled_model_path())
    failed = False
    for kind in args.database or ["sqlite", "postgresql"]:
        cluster = None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if kind == "sqlite":
                    url = f"sqlite:///{tmp}/bench.sqlite3"
                elif kind == "postgresql":
                    from pg import PostgresCluster

                    cluster = PostgresCluster().start()
                    url = cluster.create_database(name="bench")
                else:
                    url = kind
                command.upgrade(alembic_config(url), "head")
                report = run_workload(url, model_path, processes=args.processes, threads=args.threads,
                                      messages=args.messages, label=kind if "://" not in kind else None)
            finally:
                if cluster:
                    cluster.stop()
        print(report.line())
        for sample in report.error_samples[:5]:
            print("  error:", sample)
        failed |= bool(report.errors or report.lost or report.duplicated
                       or set(report.shares_per_conversation) != {1})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
