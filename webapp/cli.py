"""The ``bchat`` command: serve, db upgrade, models, config."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import ROOT
from .config import describe, load_config


def alembic_config(database_url: str):
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url  # attributes: no %-interpolation of URLs
    return cfg


def _settings() -> dict:
    config = load_config(ROOT / "instance")
    url = str(config["DATABASE_URL"])
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return config


def db_upgrade(revision: str = "head") -> None:
    from alembic import command

    config = _settings()
    command.upgrade(alembic_config(config["DATABASE_URL"]), revision)
    print(f"database at {revision}: {config['DATABASE_URL']}")


def schema_is_current(database_url: str) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from .db import make_engine

    script = ScriptDirectory.from_config(alembic_config(database_url))
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    return current == set(script.get_heads())


def list_models() -> int:
    from .model_files import discover

    config = _settings()
    models = discover(config["MODEL_PATH"])
    if not models:
        print(f"no readable .gguf files at {config['MODEL_PATH']}", file=sys.stderr)
        return 1
    header = ("id", "name", "arch", "params", "quant", "bpw", "size", "ctx", "chat")
    rows = [
        (
            m.id, m.name, m.architecture, f"{m.parameters / 1e6:.1f}M", m.quantization,
            f"{m.bits_per_weight:.2f}", f"{m.file_size / 2**20:.1f} MiB",
            str(m.context_length or "?"), "yes" if m.has_chat_template else "no",
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def serve(host: str, port: int) -> int:
    # The Host the site is reached by must be allowed (security.check_host): the address
    # bound here is, through the same setting gunicorn users set by hand.
    os.environ["BCHAT_BIND_HOST"] = host
    config = _settings()
    if host not in LOOPBACK and not config.get("PASSCODE"):
        print(
            f"WARNING: bchat is listening on {host}, beyond this machine, with no BCHAT_PASSCODE:\n"
            "anyone who can reach the port can chat and use the models. Set BCHAT_PASSCODE, and\n"
            "BCHAT_ALLOWED_HOSTS to the names visitors type (see README, Security).",
            file=sys.stderr,
        )
    if host in ("0.0.0.0", "::") and not config.get("ALLOWED_HOSTS"):
        print(
            "note: only loopback Host names are answered (others get 400); set\n"
            "BCHAT_ALLOWED_HOSTS to this machine's name or address to reach it from elsewhere.",
            file=sys.stderr,
        )
    if not schema_is_current(config["DATABASE_URL"]):
        print(
            "the database is not at the latest schema: run `bchat db upgrade` first",
            file=sys.stderr,
        )
        return 2
    from . import create_app
    from .security import redacting_request_handler

    app = create_app()
    print(f"bchat on http://{host}:{port}/  (development server; see README for gunicorn)")
    app.run(host=host, port=port, threaded=True, use_reloader=False,
            request_handler=redacting_request_handler())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bchat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the development server (threaded)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=5000)
    p_db = sub.add_parser("db", help="database schema")
    db_sub = p_db.add_subparsers(dest="db_command", required=True)
    p_up = db_sub.add_parser("upgrade", help="migrate the database to the latest schema")
    p_up.add_argument("revision", nargs="?", default="head")
    p_worker = sub.add_parser(
        "worker", help="serve the embedded models to web processes (OpenAI-compatible API)"
    )
    p_worker.add_argument("--host", default="127.0.0.1")
    p_worker.add_argument("--port", type=int, default=8600)
    p_worker.add_argument("--threads", type=int, default=64, help="open requests at once")
    sub.add_parser("models", help="list the GGUF models this server can run")
    sub.add_parser("config", help="list the BCHAT_* settings and their defaults")
    args = parser.parse_args(argv)

    if args.command == "serve":
        return serve(args.host, args.port)
    if args.command == "db":
        db_upgrade(args.revision)
        return 0
    if args.command == "worker":
        from .worker import run_worker

        run_worker(args.host, args.port, args.threads)
        return 0
    if args.command == "models":
        return list_models()
    if args.command == "config":
        print(describe())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
