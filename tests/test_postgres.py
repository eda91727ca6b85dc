"""Storage behaviour that differs between SQLite and PostgreSQL, checked on both: column
widths PostgreSQL enforces, the 0004 migration both ways, concurrent shares, and many
processes writing at once."""

from __future__ import annotations

import importlib.util
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import DateTime, Integer, String, column, insert, select, table, text

from webapp.db import Database, alembic_config, normalise_url, schema_is_current
from webapp.errors import AppError
from webapp.models import Message

BOTH = pytest.mark.databases("sqlite", "postgresql")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.databases("postgresql")
def test_the_cluster_is_a_real_postgresql(db_url):
    assert db_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    db = Database(db_url)
    try:
        with db.read() as session:
            assert session.execute(text("SELECT version()")).scalar().startswith("PostgreSQL ")
            assert session.execute(text("SELECT current_database()")).scalar() == db_url.rsplit("/", 1)[1]
    finally:
        db.dispose()
    assert schema_is_current(db_url), "a copy of the migrated template is at head"


def test_postgres_urls_mean_psycopg_3():
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert normalise_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


@BOTH
def test_provenance_as_long_as_the_api_accepts_is_stored(live_server):
    visitor = live_server.session()
    visitor.visit()
    _, conv = visitor.json("POST", "/api/conversations", {})
    path = f"/api/conversations/{conv['id']}/messages"
    long = {"engine": "browser", "backend": "b" * 200, "model": "m" * 200, "finish_reason": "f" * 200}
    status, reply = visitor.json("POST", path, {"role": "assistant", "content": "x", "provenance": long})
    assert status == 201, reply
    stored = visitor.json("GET", f"/api/conversations/{conv['id']}")[1]["messages"][0]
    assert (stored["backend"], stored["model"], stored["finish_reason"]) == ("b" * 200, "m" * 200, "f" * 200)
    too_long = {**long, "backend": "b" * 201}
    status, error = visitor.json("POST", path, {"role": "assistant", "content": "x", "provenance": too_long})
    assert status == 400 and error["error"]["code"] == "bad_provenance"


@BOTH
def test_0004_widens_provenance_and_downgrade_cuts_to_fit(new_database):
    url = new_database(migrated=False)
    cfg = alembic_config(url)
    command.upgrade(cfg, "0002")
    db = Database(url)
    # the tables as they are at 0002, not as the models describe them now
    at = datetime(2026, 1, 1)
    conversation = table("conversation", column("id", Integer), column("public_id", String),
                         column("owner_id", String), column("title", String),
                         column("created_at", DateTime), column("updated_at", DateTime))
    message = table("message", column("public_id", String), column("conversation_id", Integer),
                    column("role", String), column("content", String), column("status", String),
                    column("created_at", DateTime), column("backend", String),
                    column("finish_reason", String))

    def add_message(session, public_id: str, backend: str) -> None:
        conv_id = session.execute(select(conversation.c.id)).scalar_one()
        session.execute(insert(message).values(
            public_id=public_id, conversation_id=conv_id, role="assistant", content="x",
            status="complete", created_at=at, backend=backend, finish_reason="stop"))

    try:
        with db.write() as session:
            session.execute(insert(conversation).values(
                public_id="c", owner_id="o", title="t", created_at=at, updated_at=at))
            add_message(session, "m1", "b" * 32)
        db.dispose()
        command.upgrade(cfg, "head")
        with db.write() as session:
            add_message(session, "m2", "w" * 200)
        with db.read() as session:
            backends = dict(session.execute(select(Message.public_id, Message.backend)).all())
        assert backends == {"m1": "b" * 32, "m2": "w" * 200}
        db.dispose()
        command.downgrade(cfg, "0002")
        with db.read() as session:
            backends = dict(session.execute(text("SELECT public_id, backend FROM message")).all())
        assert backends == {"m1": "b" * 32, "m2": "w" * 32}, "cut to fit, not refused"
    finally:
        db.dispose()


@BOTH
def test_concurrent_shares_of_one_conversation_make_one_share(app):
    """Eight requests share one new conversation at the same moment: on PostgreSQL they would
    all see "no share yet" and all but one insert would break the unique constraint, unless
    the conversation row is locked first."""
    services = app.extensions["bchat"]
    conv, _ = services.chats.add_user_message("owner", None, "share me")
    start = threading.Barrier(8)
    results, errors = [], []

    def share() -> None:
        start.wait(timeout=30)
        try:
            results.append(services.shares.share("owner", conv["id"]))
        except Exception as err:  # collected: the assertion below shows which
            errors.append(err)

    threads = [threading.Thread(target=share) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(results) == 8 and len({r["id"] for r in results}) == 1
    assert len({r["token"] for r in results}) == 1, "one link, not eight"
    assert len(services.shares.list_for("owner")) == 1


def _bench():
    spec = importlib.util.spec_from_file_location("db_concurrency", ROOT / "bench" / "db_concurrency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@BOTH
def test_four_processes_of_eight_writers_lose_nothing(db_url, tiny_model):
    report = _bench().run_workload(db_url, str(tiny_model), processes=4, threads=8, messages=5)
    print(report.line())
    assert report.error_samples == [] and report.errors == 0
    assert report.requests == 4 * 8 * (5 + 1), "five messages and one share per thread"
    assert report.lost == 0 and report.duplicated == 0
    assert report.shares_per_conversation == [1, 1, 1, 1]


def _terminate_app_connections(db_url: str) -> int:
    """Close every bchat connection to this database from the server's side (as a restart
    does); how many were closed."""
    from sqlalchemy import create_engine

    admin = create_engine(db_url,
                          connect_args={"application_name": "test-admin"})
    try:
        with admin.connect() as conn:
            closed = conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'bchat' AND datname = current_database()")).scalar()
            conn.commit()
            return closed
    finally:
        admin.dispose()


def _backend_pid(db: Database) -> int:
    with db.read() as session:
        return session.execute(text("SELECT pg_backend_pid()")).scalar()


@pytest.mark.databases("postgresql")
def test_a_pooled_connection_closed_while_idle_is_replaced_before_use(db_url, monkeypatch):
    """A connection idle past PG_PING_AFTER_IDLE_S is pinged at checkout: one the server
    closed meanwhile is replaced, and the request never sees it."""
    from webapp import db as db_module

    db = Database(db_url)
    try:
        before = _backend_pid(db)
        assert _terminate_app_connections(db_url) >= 1
        monkeypatch.setattr(db_module, "PG_PING_AFTER_IDLE_S", 0.0)  # every idle one is old
        after = _backend_pid(db)
        assert after != before, "a new connection, not the closed one"
    finally:
        db.dispose()


@pytest.mark.databases("postgresql")
def test_a_connection_closed_between_close_uses_is_a_retry_then_the_next_session_works(db_url):
    """Within PG_PING_AFTER_IDLE_S nothing is pinged (no round trip per request): a
    connection the server closed fails its session as database_busy (a 503 that says to
    retry, never a 500), and the pool has been renewed for the next one."""
    db = Database(db_url)
    try:
        before = _backend_pid(db)
        assert _terminate_app_connections(db_url) >= 1
        with pytest.raises(AppError) as failed:
            _backend_pid(db)
        assert failed.value.code == "database_busy" and failed.value.extra["retry_after"]
        assert _backend_pid(db) != before
        with pytest.raises(AppError) as failed:  # a write's session: the same
            assert _terminate_app_connections(db_url) >= 1
            with db.write() as session:
                session.execute(text("SELECT 1"))
        assert failed.value.code == "database_busy"
        with db.write() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
    finally:
        db.dispose()


@BOTH
def test_a_burst_of_sessions_keeps_its_connections_for_the_next_one(db_url):
    """Connections opened for a burst (10 sessions at once, as a class's requests arrive on
    one worker) are kept for the next: the second burst opens none. SQLAlchemy's default
    pool kept 5 and closed the rest as they came back, so every burst opened them again (on
    PostgreSQL a new backend each, with cold caches)."""
    from contextlib import ExitStack

    from sqlalchemy import event

    db = Database(db_url)
    opened = []
    event.listen(db.engine, "connect", lambda *_: opened.append(1))

    def burst() -> None:
        with ExitStack() as stack:
            for _ in range(10):  # all ten held at once: ten connections
                session = stack.enter_context(db.read())
                assert session.execute(text("SELECT 1")).scalar() == 1
    try:
        burst()
        assert len(opened) == 10 and db.engine.pool.checkedin() == 10
        burst()
        assert len(opened) == 10, "the second burst reused the first one's connections"
    finally:
        db.dispose()


@BOTH
def test_a_session_that_finds_every_connection_in_use_is_a_retry(db_url, monkeypatch):
    """Past POOL_SIZE sessions at once, one waits POOL_TIMEOUT_S for a connection and is
    then a 503 database_busy that says to retry (never a 500); the held ones are unharmed."""
    from webapp import db as db_module

    monkeypatch.setattr(db_module, "POOL_SIZE", 1)
    monkeypatch.setattr(db_module, "POOL_TIMEOUT_S", 0.05)
    db = Database(db_url)
    try:
        with db.read() as held:
            held.execute(text("SELECT 1"))
            for scope in (db.read, db.write):
                with pytest.raises(AppError) as failed, scope() as session:
                    session.execute(text("SELECT 1"))
                assert failed.value.code == "database_busy" and failed.value.extra["retry_after"]
            assert held.execute(text("SELECT 2")).scalar() == 2
        with db.write() as session:  # given back: the next session has it
            assert session.execute(text("SELECT 3")).scalar() == 3
    finally:
        db.dispose()
