"""The ``bchat`` command: serve, db upgrade, models (list/pull/remove/quantize/eval), keys, users,
doctor, config."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .config import describe, instance_path, load_config
from .db import alembic_config, schema_is_current


def _settings() -> dict:
    config = load_config(instance_path())
    url = str(config["DATABASE_URL"])
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return config


NOT_UPGRADED = "the database is not at the latest schema: run `bchat db upgrade` first"


def _on_database(work: Callable[..., int]) -> int:
    """An admin command's ``work`` on the app's database, which must be at the latest schema;
    an AppError is printed and exits 1."""
    from .db import Database
    from .errors import AppError

    config = _settings()
    if not schema_is_current(config["DATABASE_URL"]):
        print(NOT_UPGRADED, file=sys.stderr)
        return 1
    db = Database(config["DATABASE_URL"])
    try:
        return work(db)
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        db.dispose()


def db_upgrade(revision: str = "head") -> None:
    from alembic import command

    config = _settings()
    command.upgrade(alembic_config(config["DATABASE_URL"]), revision)
    print(f"database at {revision}: {config['DATABASE_URL']}")


def list_models() -> int:
    from .catalogue import discover
    from .quant import family_of

    config = _settings()
    models = discover(config["MODEL_PATH"])
    if not models:
        print(f"no readable .gguf files at {config['MODEL_PATH']}", file=sys.stderr)
        return 1
    header = ("id", "name", "arch", "params", "quant", "bpw", "size", "ctx", "chat", "family")
    rows = [
        (
            m.id, m.name, m.architecture, f"{m.parameters / 1e6:.1f}M", m.quantization,
            f"{m.bits_per_weight:.2f}", f"{m.file_size / 2**20:.1f} MiB",
            str(m.context_length or "?"), "yes" if m.has_chat_template else "no", family_of(m),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def prepare_models() -> int:
    """Derive the format browsers run for every model now (app start would do it otherwise)."""
    from .catalogue import browser_file, discover

    config = _settings()
    models = discover(config["MODEL_PATH"])
    if not models:
        print(f"no readable .gguf files at {config['MODEL_PATH']}", file=sys.stderr)
        return 1
    folder = Path(str(config["BROWSER_MODELS_DIR"]))
    for model in models:
        file = browser_file(model, str(config["BROWSER_FORMAT"]), folder)
        print(f"{model.id}: server {model.quantization}, browser {file.format} "
              f"({file.size / 2**20:.1f} MiB, {file.path.name}): {file.reason}")
    return 0


def pull_model(source: str, name: str | None, sha256: str | None, dest: str | None) -> int:
    from .model_pull import PullError, models_dir, pull

    config = _settings()
    folder = Path(dest) if dest else models_dir(config, instance_path())
    try:
        result = pull(source, folder, name=name, sha256=sha256)
    except PullError as err:
        print(f"bchat: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbchat: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    how = {"hub": "matches the hub's sha256", "given": "matches --sha256"}.get(
        result.checked_against or "", "recorded (no published checksum to compare)")
    print(f"{result.path} ({result.size / 2**20:.1f} MiB), sha256 {result.sha256} {how}")
    model_path = Path(str(config["MODEL_PATH"]))
    if not (model_path.is_dir() and model_path.resolve() == folder.resolve()):
        print(f"to serve it, set BCHAT_MODEL_PATH={folder}", file=sys.stderr)
    return 0


def _find_model(config: dict, name: str):
    """A model by its id in BCHAT_MODEL_PATH, or a .gguf file by its path."""
    from .catalogue import discover, read_model_file

    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return read_model_file(path)
    models = {m.id: m for m in discover(config["MODEL_PATH"])}
    if name.removesuffix(".gguf") in models:
        return models[name.removesuffix(".gguf")]
    known = ", ".join(models) or "none"
    print(f"bchat: no model {name!r} at {config['MODEL_PATH']} (models: {known}; or give a .gguf path)",
          file=sys.stderr)
    return None


def quantize_models(name: str, types: list[str], allow_requantize: bool, imatrix: str | None,
                    dest: str | None) -> int:
    """`bchat models quantize MODEL TYPE...`: variants of a model, recorded in its family."""
    from .model_pull import Progress, models_dir
    from .quant import BETTER_WITH_IMATRIX, QuantError, check_type, quantize

    config = _settings()
    try:
        types = [check_type(t) for t in types]
    except QuantError as err:
        print(f"bchat: {err}", file=sys.stderr)
        return 2
    source = _find_model(config, name)
    if source is None:
        return 1
    folder = Path(dest) if dest else models_dir(config, instance_path())
    for qtype in types:
        if qtype in BETTER_WITH_IMATRIX and not imatrix:
            print(f"note: {qtype} is an i-quant, made to be used with an importance matrix "
                  "(--imatrix FILE from llama.cpp's llama-imatrix); without one it is worse than "
                  "it could be", file=sys.stderr)
        bar: list[Progress] = []

        def progress(done: int, total: int, qtype=qtype, bar=bar) -> None:
            if not bar:
                bar.append(Progress(f"{source.id} -> {qtype}", total))
            bar[0].update(done - bar[0].done)

        try:
            variant = quantize(source, qtype, folder, allow_requantize=allow_requantize,
                               imatrix=Path(imatrix) if imatrix else None,
                               nthread=int(config["N_THREADS"]), progress=progress)
        except QuantError as err:
            print(f"bchat: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nbchat: interrupted; nothing was written", file=sys.stderr)
            return 130
        finally:
            if bar:
                bar[0].finish()
        model, record = variant.model, variant.record
        print(f"{model.path} ({model.quantization}, {record['bits_per_weight']:.2f} bits/weight, "
              f"{model.file_size / 2**20:.1f} MiB): family {record['family']}")
    model_path = Path(str(config["MODEL_PATH"]))
    if not (model_path.is_dir() and model_path.resolve() == folder.resolve()):
        print(f"to serve the variants, set BCHAT_MODEL_PATH={folder}", file=sys.stderr)
    return 0


def eval_family(family: str, text: str | None, n_ctx: int, dest: str | None) -> int:
    """`bchat models eval FAMILY`: every variant against the family's highest-precision member."""
    from .catalogue import discover
    from .model_pull import models_dir
    from .quant import EVAL_TEXT, QuantError, evaluate_family, families

    config = _settings()
    folder = Path(dest) if dest else Path(str(config["MODEL_PATH"]))
    if not folder.exists():
        folder = models_dir(config, instance_path())
    models = discover(folder)

    def progress(model: str, done: int, total: int) -> None:
        print(f"\r{model}: chunk {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
              flush=True)

    members = families(models).get(family, [])
    if members:
        print(f"{family}: reference {members[0].id} ({members[0].quantization}), "
              f"{len(members) - 1} variant(s)", file=sys.stderr)
    try:
        result = evaluate_family(models, family, text_path=Path(text) if text else EVAL_TEXT,
                                 n_ctx=n_ctx, n_threads=int(config["N_THREADS"]),
                                 folder=folder if folder.is_dir() else folder.parent, progress=progress)
    except QuantError as err:
        print(f"bchat: {err}", file=sys.stderr)
        return 1
    header = ("model", "quant", "bpw", "size", "PPL", "ΔPPL", "KLD", "top-1", "prompt tok/s",
              "decode tok/s")
    rows = [(r["model"], r["quantization"], f"{r['bits_per_weight']:.2f}",
             f"{r['file_size'] / 2**20:.1f} MiB",
             f"{r['ppl']:.4g}", f"{r['delta_ppl_pct']:+.2f}%", f"{r['kld']:.5f}", f"{100 * r['top1']:.1f}%",
             f"{r['prompt_tps']:.0f}", f"{r['decode_tps']:.1f}" if r["decode_tps"] else "-")
            for r in result["variants"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{result['scored_tokens']} tokens scored in {result['chunks']} chunks of {result['n_ctx']} "
          f"({result['text']['name']})", file=sys.stderr)
    return 0


def remove_model(name: str, dest: str | None) -> int:
    from .model_pull import PullError, models_dir, remove

    folder = Path(dest) if dest else models_dir(_settings(), instance_path())
    try:
        for path in remove(name, folder):
            print(f"removed {path}")
    except PullError as err:
        print(f"bchat: {err}", file=sys.stderr)
        return 1
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
        print(NOT_UPGRADED, file=sys.stderr)
        return 2
    from . import create_app
    from .processes import freeze_loaded_objects
    from .security import redacting_request_handler

    app = create_app()
    services = app.extensions["bchat"]
    freeze_loaded_objects()

    def on_term(_signum, _frame) -> None:
        # Python's default SIGTERM ends the process at once; keep the partial replies first.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print(f"bchat on http://{host}:{port}/  (development server; see README for gunicorn)")
    try:
        app.run(host=host, port=port, threaded=True, use_reloader=False,
                request_handler=redacting_request_handler())
    finally:
        services.close()  # keeps partial replies, then stops the model runners
    return 0


def bench(models: list[str] | None, tokens: int | None, *, store: bool) -> int:
    """The server side of the benchmark, from the shell: the page's prompt set and table."""
    from . import create_app
    from .benchmarks import DEFAULT_TOKENS, table
    from .errors import AppError

    config = _settings()
    if store and not schema_is_current(config["DATABASE_URL"]):
        print(f"{NOT_UPGRADED} (or use --no-store)", file=sys.stderr)
        return 2
    app = create_app()
    services = app.extensions["bchat"]
    try:
        chosen = models or [m.id for m in services.engines.models()]
        records = []
        for model in chosen:
            try:
                records.append(services.benchmarks.run_server(
                    model, tokens=tokens or DEFAULT_TOKENS, store=store))
            except AppError as exc:
                print(f"{model}: {exc.message}", file=sys.stderr)
                return 1
        print(table(records))
    finally:
        services.close()
    return 0


def manage_benchmarks(remove: str | None) -> int:
    """`bchat bench --list` / `--remove ID`: an admin's view of the stored runs (everyone's
    page shows them), without loading any model."""
    from .benchmarks import BenchmarkService
    from .security import short

    def work(db) -> int:
        benchmarks = BenchmarkService(db, None, None, None)
        if remove is not None:
            record = benchmarks.remove(remove)
            print(f"removed {record['id']} ({record['engine']} {record['backend']} "
                  f"{record['model']}, {record['created_at']})")
            return 0
        listed = benchmarks.list(None, with_owner=True)
        for record in listed:
            print(f"{record['id']}  {record['created_at']}  {record['engine']}  "
                  f"{record['backend']}  {record['model']}  owner {short(record['owner'])}")
        if not listed:
            print("no benchmark runs stored", file=sys.stderr)
        return 0

    return _on_database(work)


def manage_keys(args) -> int:
    """`bchat keys create|list|revoke`: API keys for /v1, for an admin at the shell."""
    import secrets

    from .api_keys import KeyService

    def work(db) -> int:
        keys = KeyService(db)
        if args.keys_command == "create":
            owner = args.owner or secrets.token_urlsafe(18)
            key, token = keys.create(owner, args.name)
            print(f"key {key['id']} ({key['name']}) for owner {owner}")
            print(token)
            print("This is the only time the key is shown: keep it somewhere safe.",
                  file=sys.stderr)
            return 0
        if args.keys_command == "revoke":
            key = keys.revoke(None, args.id)
            print(f"revoked {key['id']} ({key['name']})")
            return 0
        listed = keys.list_for(args.owner)
        for key in listed:
            state = "revoked" if key["revoked"] else f"last used {key['last_used_at'] or 'never'}"
            print(f"{key['id']}  {key['prefix']}…  {key['name']}  owner {key['owner']}  "
                  f"created {key['created_at']}  {state}")
        if not listed:
            print("no API keys", file=sys.stderr)
        return 0

    return _on_database(work)


def _new_password(prompt: str) -> str:
    """A password typed twice at the terminal (never an argument: it would land in the shell's
    history and in ``ps``), or read from standard input when that is not a terminal."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(prompt)
    if getpass.getpass("Again: ") != first:
        raise SystemExit("error: the two passwords differ")
    return first


def manage_users(args) -> int:
    """`bchat users create|reset-password|link-oidc|list`: accounts, for an admin at the shell."""
    from .accounts import AccountService

    def work(db) -> int:
        accounts = AccountService(db)
        if args.users_command == "create":
            account = accounts.create(args.name, _new_password(f"Password for {args.name}: "),
                                      role="admin" if args.admin else "user")
            accounts.audit("user_created", target=account["username"],
                           detail={"role": account["role"], "by": "shell"})
            print(f"created {account['role']} {account['username']}")
            return 0
        if args.users_command == "reset-password":
            account = accounts.set_password(args.name, _new_password(f"New password for {args.name}: "))
            accounts.audit("password_reset", target=account["username"], detail={"by": "shell"})
            print(f"new password set for {account['username']}; their browsers are signed out")
            return 0
        if args.users_command == "link-oidc":
            account = accounts.link_oidc(args.name, args.identity)
            accounts.audit("oidc_linked", target=account["username"],
                           detail={"subject": args.identity, "by": "shell"})
            print(f"{args.identity} now signs in to {account['username']}")
            return 0
        listed = accounts.list()
        for account in listed:
            state = "disabled" if account["disabled"] else "active"
            print(f"{account['username']}  {account['role']}  {state}  created {account['created_at']}  "
                  f"last sign-in {account['last_sign_in_at'] or 'never'}")
        if not listed:
            print("no accounts", file=sys.stderr)
        return 0

    return _on_database(work)


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
    p_models = sub.add_parser("models", help="list (default), pull or remove GGUF models")
    models_sub = p_models.add_subparsers(dest="models_command")
    models_sub.add_parser("list", help="the GGUF models this server can run, with their facts")
    p_pull = models_sub.add_parser(
        "pull", help="download a GGUF into the models folder (resumable, checksum-verified)"
    )
    p_pull.add_argument("source", help="hf://USER/REPO[@REVISION]/FILE.gguf or an http(s):// URL")
    p_pull.add_argument("--name", help="file name to save as (default: the source's)")
    p_pull.add_argument("--sha256", help="expected sha256 (else the hub's, else only recorded)")
    p_pull.add_argument("--dir", help="models folder (default: BCHAT_MODEL_PATH if a folder, "
                                      "else instance/models)")
    models_sub.add_parser(
        "prepare", help="derive the format browsers run (BCHAT_BROWSER_FORMAT) for every model"
    )
    p_quant = models_sub.add_parser(
        "quantize", help="make variants of a model with llama.cpp's quantizer (Q8_0, Q4_K_M, …)")
    p_quant.add_argument("model", help="a model id (bchat models list) or a .gguf path")
    p_quant.add_argument("types", nargs="+", metavar="TYPE",
                         help="Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, … (one file each)")
    p_quant.add_argument("--allow-requantize", action="store_true",
                         help="quantize a source that is already quantized (loses more quality)")
    p_quant.add_argument("--imatrix", metavar="FILE",
                         help="importance matrix from llama.cpp's llama-imatrix (needed by IQ1/IQ2 "
                              "and Q2_K_S, better for every IQ type)")
    p_quant.add_argument("--dir", help="where to write (as for pull)")
    p_eval = models_sub.add_parser(
        "eval", help="perplexity, KL divergence, top-1 and tok/s of a family's variants")
    p_eval.add_argument("family", help="the family: a model's file name without its quant tag")
    p_eval.add_argument("--text", help="the text to score (default: the one shipped with bchat)")
    p_eval.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p_eval.add_argument("--dir", help="models folder (default: BCHAT_MODEL_PATH)")
    p_remove = models_sub.add_parser("remove", help="delete a pulled model and its checksum file")
    p_remove.add_argument("name")
    p_remove.add_argument("--dir", help="models folder (as for pull)")
    p_keys = sub.add_parser("keys", help="API keys for /v1: create, list (default), revoke")
    keys_sub = p_keys.add_subparsers(dest="keys_command")
    p_create = keys_sub.add_parser("create", help="make a key and print it (once)")
    p_create.add_argument("--name", required=True, help="what the key is for")
    p_create.add_argument("--owner", help="the owner id it acts as (a visitor's, to see its "
                                          "calls in their chat list); default: a new owner")
    p_list = keys_sub.add_parser("list", help="every key (or one owner's), revoked ones too")
    p_list.add_argument("--owner")
    p_revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    p_revoke.add_argument("id")
    p_users = sub.add_parser("users", help="accounts (BCHAT_ACCOUNTS): create, reset-password, "
                                           "list (default)")
    users_sub = p_users.add_subparsers(dest="users_command")
    p_ucreate = users_sub.add_parser("create", help="make an account (asks for its password; "
                                                    "reads one line from stdin when piped)")
    p_ucreate.add_argument("--admin", action="store_true", help="may open the admin page")
    p_ucreate.add_argument("name")
    p_reset = users_sub.add_parser("reset-password", help="set a new password (signs the "
                                                          "account's browsers out)")
    p_reset.add_argument("name")
    p_link = users_sub.add_parser("link-oidc", help="let an OpenID Connect identity "
                                  "(\"issuer|sub\", shown by its refused sign-in) sign in to "
                                  "an account (BCHAT_SIGNUP=admin)")
    p_link.add_argument("name")
    p_link.add_argument("identity")
    users_sub.add_parser("list", help="every account, its role and state")
    p_doctor = sub.add_parser("doctor", help="check this installation and say what needs fixing")
    p_doctor.add_argument("--smoke-only", action="store_true",
                          help="only check that llama.cpp imports and decodes each model type "
                               "(what ./scripts/setup runs)")
    sub.add_parser("config", help="list the BCHAT_* settings and their defaults")
    p_bench = sub.add_parser("bench", help="run the benchmark prompt set on the server's models")
    p_bench.add_argument("--model", action="append", help="a model id (repeat; default: all)")
    p_bench.add_argument("--tokens", type=int, default=None, help="tokens per prompt")
    p_bench.add_argument("--no-store", action="store_true", help="print only; store nothing")
    p_bench.add_argument("--list", action="store_true",
                         help="list the stored runs (ids, who posted them) instead of running")
    p_bench.add_argument("--remove", metavar="ID", help="delete one stored run (see --list)")
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
        if args.models_command == "pull":
            return pull_model(args.source, args.name, args.sha256, args.dir)
        if args.models_command == "remove":
            return remove_model(args.name, args.dir)
        if args.models_command == "prepare":
            return prepare_models()
        if args.models_command == "quantize":
            return quantize_models(args.model, args.types, args.allow_requantize, args.imatrix, args.dir)
        if args.models_command == "eval":
            return eval_family(args.family, args.text, args.ctx, args.dir)
        return list_models()
    if args.command == "keys":
        if args.keys_command is None:
            args.owner = None
        return manage_keys(args)
    if args.command == "users":
        return manage_users(args)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(smoke_only=args.smoke_only)
    if args.command == "bench":
        if args.list or args.remove is not None:
            return manage_benchmarks(args.remove)
        return bench(args.model, args.tokens, store=not args.no_store)
    if args.command == "config":
        print(describe())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
