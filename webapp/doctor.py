"""``bchat doctor``: what a self-hoster needs to know about this installation, in one screen.

Each line is ``ok``, ``warn`` (worth a look, not fatal) or ``FAIL`` (bchat will not work as
configured); the command exits 1 when anything failed, so it can gate a deploy script.
Settings that other parts of bchat may add (``ALLOWED_HOSTS``, ``PASSCODE``) are read with
``.get()`` from the config, falling back to the environment; ``BCHAT_MAX_SOCKETS`` only from the
environment, since the config always holds a computed default (see check_serving).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .config import default_max_sockets, instance_path, load_config

MIN_PYTHON = (3, 11)
MIN_PASSCODE_CHARS = 8


@dataclass(frozen=True)
class Check:
    status: str  # "ok" | "warn" | "FAIL"
    topic: str
    detail: str


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.0f} MiB"


def _setting(config: Mapping, environ: Mapping[str, str], name: str) -> Any:
    value = config.get(name)
    return value if value not in (None, "", []) else environ.get(f"BCHAT_{name}") or None


def check_python() -> Iterator[Check]:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info[:2] >= MIN_PYTHON
    yield Check("ok" if ok else "FAIL", "python", f"{version} at {sys.executable}"
                + ("" if ok else f" (bchat needs {'.'.join(map(str, MIN_PYTHON))}+)"))


def llama_backends(system_info: str) -> list[str]:
    """Backend names from llama_print_system_info(), e.g. "CPU : SSE3 = 1 | ... | CUDA : ..."."""
    return list(dict.fromkeys(re.findall(r"(?:^|\|)\s*([A-Za-z][\w-]*) : ", system_info)))


def check_llama(config: Mapping) -> Iterator[Check]:
    try:
        import llama_cpp
    except Exception as err:  # a broken build shows up here, not as a crash at the first chat
        yield Check("FAIL", "llama.cpp", f"llama_cpp does not import: {err}")
        return
    info = llama_cpp.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    backends = llama_backends(info) or ["CPU"]
    yield Check("ok", "llama.cpp", f"llama-cpp-python {llama_cpp.__version__}; backends: "
                f"{', '.join(backends)}; GPU offload: {'yes' if gpu else 'no'}")
    yield Check("ok", "llama.cpp", f"system info: {info.strip()}")
    layers = int(config.get("N_GPU_LAYERS") or 0)
    if layers and not gpu:
        yield Check("FAIL", "llama.cpp", f"BCHAT_N_GPU_LAYERS={layers} but this build has no GPU "
                    "backend: reinstall llama-cpp-python with e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\"")


SMOKE_TIMEOUT_SECONDS = 300.0
SMOKE_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 6).strip()
REBUILD_ADVICE = (
    "this llama.cpp build crashes on this CPU. Install the portable build (-DGGML_NATIVE=OFF, any "
    "x86-64 with AVX2): BCHAT_LLAMA_BUILD=portable ./scripts/setup (setup falls back to it by "
    "itself when its own check crashes); with CMAKE_ARGS of your own, drop -DGGML_NATIVE=ON"
)


def smoke_models(config: Mapping) -> list:
    """One model per quantisation type the server will run (the smallest file of each)."""
    from .catalogue import discover

    smallest: dict[str, Any] = {}
    for model in discover(str(config.get("MODEL_PATH"))):
        kept = smallest.get(model.quantization)
        if kept is None or model.file_size < kept.file_size:
            smallest[model.quantization] = model
    return list(smallest.values())


def smoke_decode(path: str, n_threads: int) -> None:
    """Evaluate a prompt and decode a few tokens (run in a child: a crash must not be ours)."""
    from llama_cpp import Llama

    llama = Llama(model_path=path, n_ctx=256, n_threads=n_threads, n_threads_batch=n_threads,
                  verbose=False)
    out = llama.create_completion(SMOKE_PROMPT, max_tokens=4, temperature=0.0)
    print(f"decoded {out['usage']['completion_tokens']} tokens after a "
          f"{out['usage']['prompt_tokens']}-token prompt")


def check_decode(config: Mapping, command: list[str] | None = None) -> Iterator[Check]:
    """Decode with each quantisation type in a child process: a llama.cpp build that crashes on
    this CPU (the AMX kernels of a native build) is named here, with its signal, not found by
    the first visitor. ``command`` replaces the child (the tests give one that crashes)."""
    import subprocess

    from .model_runner import describe_exit

    threads = int(config.get("N_THREADS") or os.cpu_count() or 1)
    models = smoke_models(config)
    if not models:
        yield Check("FAIL", "decode", f"no readable .gguf files at {config.get('MODEL_PATH')} "
                    "(BCHAT_MODEL_PATH): nothing to decode")
    for model in models:
        argv = command or [sys.executable, "-m", "webapp.doctor", "smoke", str(model.path), str(threads)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_SECONDS,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            yield Check("FAIL", "decode", f"{model.quantization} ({model.id}): no answer in "
                        f"{SMOKE_TIMEOUT_SECONDS:.0f} s")
            continue
        if done.returncode == 0:
            said = (done.stdout.strip().splitlines() or ["ok"])[-1]
            yield Check("ok", "decode", f"{model.quantization} ({model.id}): {said}")
        elif done.returncode < 0:
            yield Check("FAIL", "decode", f"{model.quantization} ({model.id}): the decoding process "
                        f"{describe_exit(done.returncode)}; {REBUILD_ADVICE}")
        else:
            error = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
            yield Check("FAIL", "decode", f"{model.quantization} ({model.id}): {error}")


def check_models(config: Mapping) -> Iterator[Check]:
    from .catalogue import ModelCatalogue, meminfo_bytes

    path = str(config.get("MODEL_PATH"))
    catalogue = ModelCatalogue(path, n_ctx=config["N_CTX"], parallel=config["PARALLEL"])
    if not len(catalogue):
        yield Check("FAIL", "models", f"no readable .gguf files at {path} (BCHAT_MODEL_PATH)")
        return
    total = meminfo_bytes("MemTotal")
    for model in catalogue:
        fit = catalogue.facts(model.id)["fits_server"]
        line = (f"{model.id}: {model.quantization}, {_mib(model.file_size)} on disk, needs ~"
                f"{_mib(fit['memory_needed'])} for {fit['parallel']} x {fit['n_ctx']} tokens; "
                f"{_mib(fit['mem_available'])} available")
        if total is not None and fit["memory_needed"] > total:
            yield Check("FAIL", "models", line + f" — more than this machine's {_mib(total)} RAM")
        elif fit["fits"] is False:
            yield Check("warn", "models", line + " — may not fit now (other programs hold memory)")
        else:
            yield Check("ok", "models", line)
        if not model.has_chat_template and not config.get("CHAT_TEMPLATE"):
            yield Check("warn", "models", f"{model.id} has no chat template (a base model?): set "
                        "BCHAT_CHAT_TEMPLATE=chatml or pick an instruct model")


def check_database(config: Mapping) -> Iterator[Check]:
    from sqlalchemy.engine import make_url

    from .db import make_engine, normalise_url, schema_is_current

    url = normalise_url(str(config["DATABASE_URL"]))
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():  # connecting would create an empty file
            yield Check("FAIL", "database", f"{shown} does not exist yet: run `bchat db upgrade`")
            return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as err:
        yield Check("FAIL", "database", f"{shown} is not reachable: {str(err).splitlines()[0]}")
        return
    finally:
        engine.dispose()
    if schema_is_current(url):
        yield Check("ok", "database", f"{shown} reachable, schema at the latest revision")
    else:
        yield Check("FAIL", "database", f"{shown} is not at the latest schema: run `bchat db upgrade`")


def gunicorn_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """workers / threads / worker_class from GUNICORN_CMD_ARGS (gunicorn reads it too)."""
    args = shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
    found: dict[str, Any] = {}
    names = {"-w": "workers", "--workers": "workers", "--threads": "threads",
             "-k": "worker_class", "--worker-class": "worker_class"}
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in names:
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            found[names[key]] = int(value) if names[key] != "worker_class" and value.isdigit() else value
    return found


def check_serving(config: Mapping, environ: Mapping[str, str]) -> Iterator[Check]:
    gunicorn = gunicorn_settings(environ)
    source = "GUNICORN_CMD_ARGS" if gunicorn else "the README's command (GUNICORN_CMD_ARGS not set)"
    threads = gunicorn.get("threads", 32)
    workers = gunicorn.get("workers", 1)
    worker_class = gunicorn.get("worker_class", "gthread")
    yield Check("ok", "gunicorn",
                f"{workers} worker(s) x {threads} threads, -k {worker_class}, from {source}")
    if worker_class not in ("gthread", "sync") or (worker_class == "sync" and threads <= 1):
        yield Check("FAIL", "gunicorn", f"-k {worker_class}: websockets need the gthread worker "
                    "(-k gthread --threads N); eventlet is gone and gevent misbehaves")
    # Only a BCHAT_MAX_SOCKETS someone set is judged. Unset, bchat derives it per worker from
    # the threads webapp.gunicorn_conf reports (threads minus a reserve), which is right by
    # construction; the value in this process's config is the development server's default
    # (it has no thread pool), not what a gunicorn worker will use.
    max_sockets = environ.get("BCHAT_MAX_SOCKETS")
    if not max_sockets:
        derived = default_max_sockets({"BCHAT_SERVER_THREADS": str(threads)})
        yield Check("ok", "gunicorn", f"BCHAT_MAX_SOCKETS not set: each worker admits {derived} "
                    f"websockets and keeps {threads - derived} of its {threads} threads for HTTP requests")
    else:
        try:
            max_sockets = int(max_sockets)
        except ValueError:
            yield Check("FAIL", "gunicorn", f"BCHAT_MAX_SOCKETS={max_sockets!r} is not a number")
            return
        # every open websocket holds a thread: with no spare threads, page loads and API calls
        # queue behind chats that may stay open for hours
        if threads <= max_sockets:
            yield Check("FAIL", "gunicorn", f"--threads {threads} <= BCHAT_MAX_SOCKETS={max_sockets}: "
                        "open chats could take every thread; use more threads than sockets")
        else:
            yield Check("ok", "gunicorn", f"BCHAT_MAX_SOCKETS={max_sockets} leaves "
                        f"{threads - max_sockets} threads per worker for HTTP requests")
    if workers > 1 and not config.get("WORKER_URL") and not config.get("OPENAI_BASE_URL"):
        yield Check("warn", "gunicorn", f"{workers} workers each load their own copy of every model: "
                    "run `bchat worker` and set BCHAT_WORKER_URL (see README)")


def check_access(config: Mapping, environ: Mapping[str, str]) -> Iterator[Check]:
    hosts = _setting(config, environ, "ALLOWED_HOSTS")
    if hosts:
        shown = ", ".join(hosts) if isinstance(hosts, list | tuple) else str(hosts)
        yield Check("ok", "access", f"allowed hosts: {shown}")
    else:
        yield Check("ok", "access", "BCHAT_ALLOWED_HOSTS not set")
    passcode = _setting(config, environ, "PASSCODE")
    if passcode:
        # never print the passcode itself: doctor output gets pasted into bug reports
        status = "ok" if len(str(passcode)) >= MIN_PASSCODE_CHARS else "warn"
        yield Check(status, "access", f"passcode set ({len(str(passcode))} characters"
                    + (")" if status == "ok" else f"; use at least {MIN_PASSCODE_CHARS})"))
    else:
        yield Check("ok", "access", "no passcode (BCHAT_PASSCODE): anyone who reaches the site can chat")
    if config.get("SECRET_KEY") or environ.get("BCHAT_SECRET_KEY"):
        yield Check("ok", "access", "BCHAT_SECRET_KEY set")
    else:
        yield Check("ok", "access", f"secret key kept in {instance_path(environ) / 'secret_key'}")


def collect(config: Mapping, environ: Mapping[str, str]) -> list[Check]:
    sections: list[tuple[str, Callable[[], Iterator[Check]]]] = [
        ("python", check_python),
        ("llama.cpp", lambda: check_llama(config)),
        ("models", lambda: check_models(config)),
        ("decode", lambda: check_decode(config)),
        ("database", lambda: check_database(config)),
        ("gunicorn", lambda: check_serving(config, environ)),
        ("access", lambda: check_access(config, environ)),
    ]
    checks: list[Check] = []
    for topic, section in sections:
        try:
            checks.extend(section())
        except Exception as err:  # one broken section must not hide the others' findings
            checks.append(Check("FAIL", topic, f"check crashed: {type(err).__name__}: {err}"))
    return checks


def smoke_checks(config: Mapping) -> list[Check]:
    """What `scripts/setup` runs after installing: does llama.cpp import and decode here?"""
    checks = [*check_python(), *check_llama(config)]
    if not any(c.status == "FAIL" for c in checks):
        checks.extend(check_decode(config))
    return checks


def run_doctor(environ: Mapping[str, str] | None = None, stream: IO[str] | None = None,
               smoke_only: bool = False) -> int:
    environ = os.environ if environ is None else environ
    stream = stream or sys.stdout
    config = load_config(instance_path(environ), environ)
    checks = smoke_checks(config) if smoke_only else collect(config, environ)
    width = max(len(c.topic) for c in checks)
    for check in checks:
        print(f"{check.status:<4}  {check.topic:<{width}}  {check.detail}", file=stream)
    failed = [c for c in checks if c.status == "FAIL"]
    warned = [c for c in checks if c.status == "warn"]
    print(f"\n{len(failed)} problem(s), {len(warned)} warning(s)", file=stream)
    return 1 if failed else 0


if __name__ == "__main__":  # python -m webapp.doctor smoke MODEL THREADS: check_decode's child
    if len(sys.argv) == 4 and sys.argv[1] == "smoke":
        smoke_decode(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m webapp.doctor smoke MODEL_PATH N_THREADS")
