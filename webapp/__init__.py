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

    from . import api, assets, errors, files, limits, openai_api, pages, security, services, socket
    from .account_pages import init_accounts
    from .request_timing import init_app as time_requests
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

    built = services.init_app(app, limits_)
    runs = built.runs
    time_requests(app, built.db.engine)
    init_accounts(app)  # accounts, OpenID Connect, their pages and the admin's (account_pages.py)
    try:
        # Replies left "streaming" by a process that died become "interrupted", text kept.
        runs.keeper.reap_stale()
    except Exception as exc:  # e.g. a database not migrated yet: `bchat serve` says so itself
        logging.getLogger(__name__).warning("could not check for interrupted replies: %s", exc)

    errors.register(app)
    app.register_blueprint(assets.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(socket.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(openai_api.bp)
    if app.config["PROXY_FIX"]:
        n = app.config["PROXY_FIX"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    return app
