"""Database engine and session scopes, and the schema's migrations (``alembic_config``,
``schema_is_current``: shared by ``bchat`` and ``bchat doctor``).

Two kinds of session: ``read()`` for lookups and ``write()`` for changes. On SQLite a write
starts with ``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of failing
half-way with "database is locked" (and writers in one process queue in arrival order before
that: FairGate); sessions are short and never held while tokens stream. A database still busy
after the timeout is a 503 with Retry-After, never a 500.

PostgreSQL (``postgresql+psycopg://``) lets writers run side by side at READ COMMITTED, so a
read-then-write that must not interleave with another (e.g. "create the share unless one
exists") takes a row lock first (chats.ChatService.owned's ``lock``: SELECT … FOR NO KEY
UPDATE); on SQLite that is a no-op because ``BEGIN IMMEDIATE`` has already serialised every
writer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from .errors import AppError

SQLITE_BUSY_TIMEOUT_MS = 10_000
BUSY_RETRY_AFTER_S = 2
# PostgreSQL's "lock not available" and "deadlock detected": like SQLite's busy, a retry helps.
_PG_BUSY_STATES = {"55P03", "40P01"}
# An unreachable PostgreSQL server fails a request in seconds, not after the OS's TCP timeout.
PG_CONNECT_TIMEOUT_S = 10
# Connections a process keeps to its database (make_engine), and how long a session waits
# for one when all are in use before it is a 503 database_busy (not a 500).
POOL_SIZE = 15
POOL_TIMEOUT_S = 10.0
# A pooled connection idle longer than this is pinged before it is handed out (below).
PG_PING_AFTER_IDLE_S = 10.0


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's own transaction handling defers it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def normalise_url(url: str) -> str:
    """``postgres://`` and bare ``postgresql://`` mean psycopg 3, the driver bchat installs.

    (SQLAlchemy would otherwise pick psycopg2, which is not installed, and fail with an import
    error that does not mention the URL.)
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def kept_pool() -> dict:
    """The pool both databases get: every connection kept (no overflow closed as it comes
    back), the one used last handed out first (make_engine says why)."""
    return {"pool_size": POOL_SIZE, "max_overflow": 0, "pool_use_lifo": True,
            "pool_timeout": POOL_TIMEOUT_S}


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        # A file's connections are kept as PostgreSQL's are (below): a new one reads the
        # schema again and runs the PRAGMAs on its first use. (":memory:" has its own pool.)
        database = make_url(url).database
        pool = kept_pool() if database and database != ":memory:" else {}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10},
                               **pool)
        _configure_sqlite(engine)
        return engine
    if make_url(url).get_backend_name() == "postgresql":
        # Up to POOL_SIZE connections per process, every one of them kept (no overflow):
        # SQLAlchemy's default 5 + 10 overflow closed each connection past the fifth when it
        # came back, so a class's bursts opened and closed connections all the time (141 in
        # 30 s of bench/class_load.py), each a new PostgreSQL backend with cold caches: its
        # fork, its first statements and a slower request. The ceiling is the same 15, and 4
        # gunicorn workers x 15 stay under PostgreSQL's default max_connections=100. LIFO
        # hands out the connection used last: a few warm ones do the work, and the rest sit
        # idle (and are pinged before use, _ping_when_idle) instead of all going cold in turn.
        engine = create_engine(
            url,
            **kept_pool(),
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": "bchat"},
        )
        _ping_when_idle(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before handing it out only when it sat idle for over
    PG_PING_AFTER_IDLE_S: one closed by the server (a restart) or a proxy (an idle timeout)
    while nobody used it is replaced, not handed out.

    Not ``pool_pre_ping``, which pings on every checkout: a round trip more on every request
    (a third of an append's), where under load a connection is back in use within
    milliseconds. A connection that dies between two close uses fails its statement instead;
    SQLAlchemy then invalidates the whole pool (every connection made before it), and the
    request is a 503 that says to retry (Database, below): SQLAlchemy's "optimistic"
    disconnect handling, for the window the ping no longer covers."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.pop("idle_since", None)  # None: a fresh connection
        if idle_since is None or time.monotonic() - idle_since <= PG_PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            if engine.dialect.is_disconnect(exc, dbapi_connection, None):
                # the pool replaces this connection (and those as old) and checks out anew
                raise DisconnectionError("a pooled connection was closed while idle") from exc
            raise


def _busy(exc: OperationalError) -> bool:
    if getattr(exc.orig, "sqlstate", None) in _PG_BUSY_STATES:
        return True
    return "database is locked" in str(exc.orig) or "database table is locked" in str(exc.orig)


def _disconnected(exc: DBAPIError) -> bool:
    """The server closed the connection mid-session (a restart); SQLAlchemy has invalidated
    the pool, so a retry gets a new connection."""
    return exc.connection_invalidated


REPLY_CHANNEL = "bchat_reply"  # PostgreSQL NOTIFY channel: a reply's row changed (runs/listen.py)


def notify_replies(session: Session, message_ids: list[str]) -> None:
    """Tell other processes' watchers that these replies' rows changed, when this write
    commits (PostgreSQL's NOTIFY is transactional: a rolled-back write wakes nobody). SQLite
    has no such thing: its watchers keep re-reading the row."""
    if message_ids and session.get_bind().dialect.name == "postgresql":
        for message_id in message_ids:  # a few a tick: the runs of one process
            session.execute(select(func.pg_notify(REPLY_CHANNEL, message_id)))


def _pool_busy() -> AppError:
    return AppError("database_busy", "every database connection is in use; try again in a moment",
                    retry_after=BUSY_RETRY_AFTER_S)


class FairGate:
    """A lock handed to waiters in arrival order. SQLite's own busy handler is not fair: a
    waiter sleeps (up to 100 ms at a time) and polls, so a writer that commits and begins
    again at once (an import's chunks) can keep the lock from it for seconds. Writers in this
    process queue here first; other processes still meet on SQLite's busy timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def acquire(self, timeout: float) -> bool:
        with self._lock:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._lock:
            if turn.is_set():  # handed over between the timeout and this lock
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # handed straight over: it stays held
            else:
                self._held = False

    @contextmanager
    def held(self, timeout: float) -> Iterator[None]:
        if not self.acquire(timeout):
            raise AppError("database_busy", "the database is busy; try again in a moment",
                           retry_after=BUSY_RETRY_AFTER_S)
        try:
            yield
        finally:
            self.release()


class Database:
    """Owns the engine and hands out short-lived sessions."""

    def __init__(self, url: str, *, queue_writers: bool = True) -> None:
        """``queue_writers=False`` leaves SQLite's writers to its busy handler alone (only
        bench/sqlite_writers.py, which compares the two)."""
        self.url = url
        self.engine = make_engine(url)
        # PostgreSQL's reads run without a transaction: at READ COMMITTED each statement sees
        # its own snapshot anyway, so a read's BEGIN and ROLLBACK were two round trips that
        # bought nothing. (SQLite's BEGIN is a call into the library, and its transaction
        # gives a read's statements one snapshot: kept.) A read() never writes.
        reader_bind = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.engine.dialect.name == "postgresql"
            else self.engine
        )
        self._reader = sessionmaker(reader_bind, expire_on_commit=False, autoflush=False)
        writer_bind = (
            self.engine.execution_options(sqlite_immediate=True)
            if self.engine.dialect.name == "sqlite"
            else self.engine
        )
        self._writer = sessionmaker(writer_bind, expire_on_commit=False, autoflush=False)
        self._gate = FairGate() if self.engine.dialect.name == "sqlite" and queue_writers else None

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._reader() as session:
                yield session
        except PoolTimeout as exc:
            raise _pool_busy() from exc
        except DBAPIError as exc:
            if not _disconnected(exc):
                raise
            raise AppError("database_busy", "the database connection was lost; try again",
                           retry_after=BUSY_RETRY_AFTER_S) from exc

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction; a database still busy after its timeout is a 503 that says to
        retry (an AppError with ``retry_after``), never a 500."""
        gate = self._gate.held(SQLITE_BUSY_TIMEOUT_MS / 1000) if self._gate else nullcontext()
        try:
            with gate, self._writer() as session, session.begin():
                yield session
        except PoolTimeout as exc:
            raise _pool_busy() from exc
        except DBAPIError as exc:
            if _disconnected(exc):
                raise AppError("database_busy", "the database connection was lost; try again",
                               retry_after=BUSY_RETRY_AFTER_S) from exc
            if not isinstance(exc, OperationalError) or not _busy(exc):
                raise
            raise AppError("database_busy", "the database is busy; try again in a moment",
                           retry_after=BUSY_RETRY_AFTER_S) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(database_url: str):
    from alembic.config import Config

    package = Path(__file__).resolve().parent  # alembic.ini and migrations/ ship inside it
    cfg = Config(str(package / "alembic.ini"))
    cfg.set_main_option("script_location", str(package / "migrations"))
    cfg.attributes["database_url"] = database_url  # attributes: no %-interpolation of URLs
    return cfg


def schema_is_current(database_url: str) -> bool:
    """True when the database is at the newest migration (``bchat serve`` and doctor ask)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(database_url))
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    return current == set(script.get_heads())
