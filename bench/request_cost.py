"""What one request costs the app, with no contention: statements, round trips and CPU.

On a small box under a class's load, latency is mostly the wait for a core, so what each request
costs in CPU and in trips to the database is what sets it. This builds the app in-process (the
app factory, as tests/conftest.py does) on a temp SQLite file and on a throwaway PostgreSQL
(tests/pg.py), seeds a 1,000-message conversation and a visitor with 200 conversations, and
runs each hot request a few hundred times on one thread through Flask's test client:

- append:   POST a user message to the 1,000-message conversation
- open:     GET its window (?limit=50, the page's MESSAGE_WINDOW)
- reply:    the browser engine's reply: POST the streaming row, PATCH its text, PATCH settled
- list:     GET the first page of the 200 conversations (?limit=50)
- turn:     bench/class_load.py's turn: post, open, reply post, settle, list

For each it prints, per request: SQL statements (SQLAlchemy's before_cursor_execute), round
trips to the database (statements plus the pings, BEGINs, COMMITs and ROLLBACKs the driver
sends; on SQLite these are library calls, not trips), the app's CPU ms (time.process_time),
PostgreSQL's own CPU ms (its server processes, from /proc), and wall ms.

    .venv/bin/python bench/request_cost.py [--database sqlite|postgresql] [--requests 300]
        [--profile] [--show-sql STEP]

``--profile`` adds cProfile's top 15 (own time) per step; ``--show-sql STEP`` prints one
request's statements of that step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's webapp, and tests/pg.py

LONG = 1000
CONVERSATIONS = 200
WINDOW = 50
STEPS = ("append", "open", "reply", "list", "turn")


@dataclass
class Trips:
    """Counts what a database connection sends. Statements come from SQLAlchemy's events; the
    driver's own traffic (the pool's ping, psycopg's implicit BEGIN, COMMIT, the pool's
    ROLLBACK on return) from wrapping the dialect's do_ping/do_commit/do_rollback, counted only
    when the connection is inside a transaction (psycopg sends nothing for a commit or a
    rollback of an idle connection)."""

    statements: int = 0
    pings: int = 0
    begins: int = 0
    commits: int = 0
    rollbacks: int = 0
    sql: list[str] = field(default_factory=list)
    open_tx: set[int] = field(default_factory=set)
    keep_sql: bool = False

    @property
    def round_trips(self) -> int:
        return self.statements + self.pings + self.begins + self.commits + self.rollbacks

    def reset(self) -> None:
        self.statements = self.pings = self.begins = self.commits = self.rollbacks = 0
        self.sql.clear()


def instrument(engine) -> Trips:
    from sqlalchemy import event

    trips = Trips()
    dialect = engine.dialect
    implicit_begin = dialect.name == "postgresql"  # SQLite's BEGIN is a statement of its own

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, parameters, context, executemany) -> None:
        trips.statements += 1
        if trips.keep_sql:
            trips.sql.append(" ".join(statement.split())[:200])
        dbapi_connection = conn.connection.dbapi_connection
        key = id(dbapi_connection)
        if key not in trips.open_tx and not getattr(dbapi_connection, "autocommit", False):
            trips.open_tx.add(key)
            if implicit_begin:
                trips.begins += 1

    ping, commit, rollback = dialect.do_ping, dialect.do_commit, dialect.do_rollback

    def do_ping(dbapi_connection):
        trips.pings += 1
        return ping(dbapi_connection)

    def ended(connection) -> bool:
        # SQLAlchemy passes the pool's proxy here, the DBAPI connection to do_ping
        key = id(getattr(connection, "dbapi_connection", connection))
        if key not in trips.open_tx:
            return False
        trips.open_tx.discard(key)
        return True

    def do_commit(connection):
        trips.commits += ended(connection)
        return commit(connection)

    def do_rollback(connection):
        trips.rollbacks += ended(connection)
        return rollback(connection)

    dialect.do_ping, dialect.do_commit, dialect.do_rollback = do_ping, do_commit, do_rollback
    return trips


def server_cpu(cluster) -> float:
    """Seconds of CPU PostgreSQL's processes have used (the postmaster's children: backends,
    writers); 0 on SQLite."""
    if cluster is None:
        return 0.0
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [postmaster]
    for task in Path(f"/proc/{postmaster}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a backend that has just exited
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class Bench:
    def __init__(self, url: str, cluster) -> None:
        from webapp import create_app
        from webapp.config import bundled_model_path

        self.cluster = cluster
        self.app = create_app({"DATABASE_URL": url, "MODEL_PATH": str(bundled_model_path()),
                               "SECRET_KEY": "request-cost-bench", "N_THREADS": 1})
        self.trips = instrument(self.app.extensions["bchat"].db.engine)
        self.client = self.app.test_client()
        self.client.get("/")
        self.model = "bench-model"
        self.turns = 0

    def call(self, method: str, path: str, body=None, status=(200, 201)):
        response = self.client.open(path, method=method, json=body,
                                    headers={"Origin": "http://localhost"})
        assert response.status_code in status, (method, path, response.status_code,
                                                 response.get_data(as_text=True)[:300])
        # the stdlib's parser: the app's own (validation.py's strict one) is the server's cost
        # for request bodies, not the client's for answers
        return json.loads(response.get_data()) if response.data else None

    def seed(self) -> None:
        from webapp.exchange import FORMAT

        messages = [{"id": f"m{i}", "parent_id": f"m{i - 1}" if i else None,
                     "role": "user" if i % 2 == 0 else "assistant",
                     "content": f"turn {i}: " + "words of a long semester " * 8}
                    for i in range(LONG)]
        self.long = self.call("POST", "/api/conversations/import", {
            "format": FORMAT, "version": 2,
            "conversation": {"title": "a semester", "current_message_id": messages[-1]["id"]},
            "messages": messages})["id"]
        for i in range(CONVERSATIONS - 3):
            self.call("POST", "/api/conversations", {"title": f"homework {i}"})
        # the reply's and the turn's conversations: the newest two, as in a class
        self.short = self.call("POST", "/api/conversations", {"title": "homework"})["id"]
        self.asked = self.call("POST", f"/api/conversations/{self.short}/messages",
                               {"role": "user", "content": "why is the sky blue?"})["id"]
        self.turn_conv = self.call("POST", "/api/conversations", {"title": "homework"})["id"]

    # -- the steps -------------------------------------------------------------------------
    def append(self) -> None:
        self.call("POST", f"/api/conversations/{self.long}/messages",
                  {"role": "user", "content": "one more question"})

    def open(self) -> None:
        self.call("GET", f"/api/conversations/{self.long}?limit={WINDOW}")

    def _reply(self, conversation: str, parent: str) -> None:
        path = f"/api/conversations/{conversation}"
        reply = self.call("POST", f"{path}/messages", {
            "role": "assistant", "content": "", "status": "streaming", "parent_id": parent,
            "provenance": {"engine": "browser", "model": self.model, "backend": "wasm-mt"}})
        self.call("PATCH", f"{path}/messages/{reply['id']}", {
            "content": "Rayleigh scattering: ", "status": "streaming"})
        self.call("PATCH", f"{path}/messages/{reply['id']}", {
            "content": "Rayleigh scattering: shorter wavelengths scatter more. " * 8,
            "status": "complete",
            "provenance": {"completion_tokens": 96, "tokens_per_second": 20.0}})

    def reply(self) -> None:
        self._reply(self.short, self.asked)

    def list(self) -> None:
        self.call("GET", f"/api/conversations?limit={WINDOW}")

    def turn(self) -> None:
        self.turns += 1
        path = f"/api/conversations/{self.turn_conv}"
        user = self.call("POST", f"{path}/messages",
                         {"role": "user", "content": f"question {self.turns}: why is the sky blue?"})
        self.call("GET", f"{path}?limit={WINDOW}")
        path_reply = self.call("POST", f"{path}/messages", {
            "role": "assistant", "content": "", "status": "streaming", "parent_id": user["id"],
            "provenance": {"engine": "browser", "model": self.model, "backend": "wasm-mt"}})
        self.call("PATCH", f"{path}/messages/{path_reply['id']}", {
            "content": "Rayleigh scattering: shorter wavelengths scatter more. " * 8,
            "status": "complete",
            "provenance": {"completion_tokens": 96, "tokens_per_second": 20.0}})
        self.call("GET", f"/api/conversations?limit={WINDOW}")

    def requests_in(self, step: str) -> int:
        return {"reply": 3, "turn": 5}.get(step, 1)

    def measure(self, step: str, n: int, profile: bool) -> dict:
        run = getattr(self, step)
        for _ in range(10):  # warm: caches, the pool's connections, prepared plans
            run()
        self.trips.reset()
        run()
        one = Counter(statements=self.trips.statements, round_trips=self.trips.round_trips,
                      pings=self.trips.pings)
        profiler = cProfile.Profile() if profile else None
        server_before = server_cpu(self.cluster)
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for _ in range(n):
            run()
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        server = server_cpu(self.cluster) - server_before
        per = n * self.requests_in(step)
        report = {"step": step, "requests": per,
                  "statements": one["statements"] / self.requests_in(step),
                  "round_trips": one["round_trips"] / self.requests_in(step),
                  "cpu_ms": cpu * 1000 / per, "server_cpu_ms": server * 1000 / per,
                  "wall_ms": wall * 1000 / per}
        if profiler:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            report["profile"] = out.getvalue()
        return report

    def show_sql(self, step: str) -> list[str]:
        run = getattr(self, step)
        run()
        self.trips.reset()
        self.trips.keep_sql = True
        run()
        self.trips.keep_sql = False
        return [*self.trips.sql, f"(pings {self.trips.pings}, begins {self.trips.begins}, "
                f"commits {self.trips.commits}, rollbacks {self.trips.rollbacks})"]

    def close(self) -> None:
        self.app.extensions["bchat"].close()


def run(kind: str, args) -> None:
    from alembic import command

    from webapp.db import alembic_config

    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if kind == "sqlite":
                url = f"sqlite:///{tmp}/bench.sqlite3"
            else:
                from pg import PostgresCluster

                cluster = PostgresCluster().start()
                url = cluster.create_database(name="bench")
            command.upgrade(alembic_config(url), "head")
            bench = Bench(url, cluster)
            try:
                bench.seed()
                if args.show_sql:
                    print(f"{kind}: one {args.show_sql}'s statements:")
                    for line in bench.show_sql(args.show_sql):
                        print("  ", line)
                    return
                print(f"{kind}: per request, {args.requests} runs of each step, one thread")
                print(f"  {'step':8} {'stmts':>6} {'trips':>6} {'cpu ms':>7} {'db cpu ms':>9} "
                      f"{'wall ms':>8}")
                for step in args.steps:
                    r = bench.measure(step, args.requests, args.profile)
                    print(f"  {step:8} {r['statements']:6.1f} {r['round_trips']:6.1f} "
                          f"{r['cpu_ms']:7.2f} {r['server_cpu_ms']:9.2f} {r['wall_ms']:8.2f}",
                          flush=True)
                    if "profile" in r:
                        print(r["profile"])
            finally:
                bench.close()
        finally:
            if cluster:
                cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", action="append", choices=("sqlite", "postgresql"),
                        help="repeatable; default: both")
    parser.add_argument("--requests", type=int, default=300, help="runs of each step")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)}")
    parser.add_argument("--profile", action="store_true", help="cProfile's top 15 per step")
    parser.add_argument("--show-sql", choices=STEPS, help="print one request's statements")
    args = parser.parse_args()
    args.steps = [s for s in args.steps.split(",") if s]
    for kind in args.database or ["sqlite", "postgresql"]:
        run(kind, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
