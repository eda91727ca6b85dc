"""bchat: a self-hosted web chat for local LLMs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask

from .config import instance_path, load_config, resolve_secret_key

# Templates, static files, migrations and alembic.ini live inside the package, so a wheel
# carries them; nothing is looked up relative to a checkout.
PACKAGE_DIR = Path(__file__).resolve().parent


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app factory: settings, database, engines, blueprints, socket, headers."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import api, limits, model_files, openai_api, pages, security, socket
    from .api_keys import KeyService
    from .benchmarks import BenchmarkService
    from .chats import ChatService
    from .db import Database
    from .engines import build_engines
    from .model_files import ModelCatalogue
    from .runs.service import RunService
    from .services import EXTENSION_KEY, Services
    from .shares import ShareService
    from .validation import StrictJSONProvider

    app = Flask(
        __name__,
        instance_path=str(instance_path()),  # the same folder cli, doctor and worker use
        instance_relative_config=True,
    )  # static_folder="static" and template_folder="templates" (Flask's defaults) are in the package
    app.json = StrictJSONProvider(app)  # never reads or writes NaN/Infinity, huge ints, lone surrogates
    app.config.update(load_config(app.instance_path))
    app.config.update(config or {})
    resolve_secret_key(app.config, app.instance_path)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    limits_ = limits.init_app(app)  # before security: the passcode's tries are counted there
    security.init_app(app)
    app.config["SOCK_SERVER_OPTIONS"] = {
        "ping_interval": app.config["WS_PING_INTERVAL"],
        "max_message_size": app.config["WS_MAX_FRAME_BYTES"],
    }

    db = Database(app.config["DATABASE_URL"])
    # Deriving a missing browser format happens here, once per model version (~1 s for the
    # bundled model; `bchat models prepare` does it ahead of time).
    catalogue = ModelCatalogue(app.config["MODEL_PATH"], app.config["BROWSER_FORMAT"],
                               app.config["BROWSER_MODELS_DIR"])
    engines = build_engines(app.config, catalogue)
    chats = ChatService(db, max_message_chars=app.config["MAX_MESSAGE_CHARS"],
                        max_tokens_limit=app.config["MAX_TOKENS_LIMIT"])

    def model_facts(model_id: str) -> dict | None:
        model = catalogue.get(model_id)
        return model.facts() if model else None

    runs = RunService(chats, engines, app.config, limits_)
    app.extensions[EXTENSION_KEY] = Services(
        db=db,
        chats=chats,
        catalogue=catalogue,
        engines=engines,
        shares=ShareService(db, chats, app.config["SECRET_KEY"], model_facts),
        runs=runs,
        benchmarks=BenchmarkService(db, engines, catalogue, runs, limits_),
        keys=KeyService(db),
    )
    try:
        # Replies left "streaming" by a process that died become "interrupted", text kept.
        runs.keeper.reap_stale()
    except Exception as exc:  # e.g. a database not migrated yet: `bchat serve` says so itself
        logging.getLogger(__name__).warning("could not check for interrupted replies: %s", exc)

    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(socket.bp)
    app.register_blueprint(model_files.bp)
    app.register_blueprint(openai_api.bp)
    if app.config["PROXY_FIX"]:
        n = app.config["PROXY_FIX"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    return app
