"""The ``Server-Timing`` header: how long the app spent on an answer, and how much of it in SQL.

On a small box shared with the models, a slow answer is either bchat's own work or a wait for a
core, a thread or a database lock before bchat saw the request. The header tells the two apart
from outside: the browser's devtools show it per request, and ``bench/class_load.py`` prints the
server's share beside the latency a visitor saw. It carries durations only, nothing a visitor
could not time themselves.
"""

from __future__ import annotations

import time

from flask import Flask, g, has_request_context
from sqlalchemy import Engine, event

DB_SECONDS = "request_timing_db"


def init_app(app: Flask, engine: Engine) -> None:
    app.before_request(_start)
    app.after_request(_stamp)

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info.setdefault("request_timing_started", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany) -> None:
        started = conn.info.get("request_timing_started")
        if not started:
            return
        took = time.perf_counter() - started.pop()
        # Sessions also run outside requests (the run keeper's flushes, the listener): only a
        # request's own statements count toward its header.
        if has_request_context() and DB_SECONDS in g:
            setattr(g, DB_SECONDS, g.get(DB_SECONDS) + took)


def _start() -> None:
    g.request_timing_started = time.perf_counter()
    setattr(g, DB_SECONDS, 0.0)


def _stamp(response):
    started = g.get("request_timing_started")
    if started is not None:
        app_ms = (time.perf_counter() - started) * 1000
        db_ms = g.get(DB_SECONDS, 0.0) * 1000
        response.headers["Server-Timing"] = f"app;dur={app_ms:.1f}, db;dur={db_ms:.1f}"
    return response
