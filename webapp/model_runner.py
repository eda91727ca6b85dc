"""Embedded models in processes of their own: one runner process per model, supervised.

llama.cpp is native code: a bug in a kernel (the AMX segfault), a corrupt GGUF or the kernel's
out-of-memory killer ends the process it runs in. So the web process never loads a model.
Each model gets a **runner**: a child process that owns the ``Llama`` object and answers on a
Unix socket in its own small protocol (one JSON request line; JSON reply lines: tokens, queue
positions, the finish, or an error). A **supervisor** starts the runners, watches them, and
writes what it sees (pid, status, restarts, last exit cause) to ``state.json`` in its folder,
which every web process reads (``engines/runner.py``). As Ollama does with its runners:

- a runner that dies by any signal fails the replies it was writing (the web side keeps their
  text, code ``model_crashed``) and is started again, after a back-off that grows while it
  keeps dying young;
- a runner that dies while loading its model ``LOAD_CRASH_LIMIT`` times is left down, and its
  model marked unavailable with the reason; other models go on;
- the supervisor lives in the web process (``bchat serve``, ``create_app``) or, under gunicorn,
  in a process of its own started by ``webapp.gunicorn_conf``, so all web workers share one
  runner per model.

Runners run at a lower CPU priority than the web process (``RUNNER_NICE``), and by default
with one thread fewer than the machine has cores (config.py, N_THREADS): llama.cpp's threads
spin at barriers, so when any other process keeps a core busy, a model using every core
stalls at each barrier (SmolLM2 on 2 cores: 241 tok/s idle, 36 beside one busy process),
while one thread fewer keeps its pace (145 idle and busy) and leaves the web process a core.
OpenMP's passive wait policy is no cure: it cut idle decoding to 33 tok/s.

``python -m webapp.model_runner supervise --dir D`` runs a supervisor;
``python -m webapp.model_runner runner ...`` is one runner (started by a supervisor only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUNNER_DIR_ENV = "BCHAT_RUNNER_DIR"  # set for web workers whose runners someone else supervises
STATE_FILE = "state.json"
LOAD_CRASH_LIMIT = 3  # crashes while loading before a model is marked unavailable
BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
HEALTHY_AFTER_SECONDS = 30.0  # a runner that lived this long starts the back-off afresh
STOP_GRACE_SECONDS = 5.0
# One request line: history, options, grammar, and images in base64 (the newest 8 of the
# default 10 MB each are 107 MB; a longer request is refused before it is sent).
MAX_REQUEST_BYTES = 192 * 1024 * 1024

# The settings a runner needs, passed to it as JSON (the web app's config may come from a
# test's create_app({...}), not from the environment).
RUNNER_SETTINGS = ("N_CTX", "N_THREADS", "N_GPU_LAYERS", "PARALLEL", "CHAT_TEMPLATE",
                   "RUNNER_NICE", "WATCHDOG_SECONDS")


def runner_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    return {name: config.get(name) for name in RUNNER_SETTINGS}


def describe_exit(returncode: int) -> str:
    """Why a process ended, in words a person running the site can act on."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"was killed by signal {-returncode}"
    hints = {
        "SIGKILL": "was killed by SIGKILL (kill -9, or the kernel's out-of-memory killer)",
        "SIGSEGV": "crashed with SIGSEGV (a segmentation fault in native code)",
        "SIGILL": "crashed with SIGILL (an instruction this CPU does not run: llama.cpp was "
                  "built for another CPU)",
        "SIGABRT": "aborted with SIGABRT (llama.cpp stopped on a failed check)",
        "SIGBUS": "crashed with SIGBUS (the model file changed or vanished while mapped)",
        "SIGFPE": "crashed with SIGFPE (an arithmetic fault in native code)",
    }
    return hints.get(name, f"was killed by {name}")


# -- the supervisor --------------------------------------------------------------------------------
@dataclasses.dataclass
class RunnerRecord:
    """What the supervisor knows of one model's runner (what state.json holds)."""

    model: str
    socket: str
    status: str = "starting"  # starting | loading | ready | restarting | unavailable | stopped
    pid: int | None = None
    generation: int = 0  # +1 each start: a web process tells a new runner from the one it used
    restarts: int = 0
    last_exit: str | None = None
    last_exit_at: float | None = None
    load_crashes: int = 0
    reason: str | None = None  # why the model is unavailable


class RunnerSupervisor:
    """Starts one runner per model, restarts them when they die, and publishes their state."""

    def __init__(self, settings: Mapping[str, Any], catalogue,
                 directory: str | os.PathLike | None = None) -> None:
        model_ids = [m.id for m in catalogue]
        # Each runner gets its model's facts as read here (no second read of its GGUF header).
        self.model_json = {mid: catalogue.to_json(mid) for mid in model_ids}
        self.settings = dict(settings)
        self.owns_directory = directory is None
        # A short path: a Unix socket's path is limited to ~107 bytes.
        self.directory = Path(directory or tempfile.mkdtemp(prefix="bchat-runners-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # only this user may talk to the models
        self.records = {mid: RunnerRecord(model=mid, socket=str(self.directory / f"{i}.sock"))
                        for i, mid in enumerate(model_ids)}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._publish()

    def start(self) -> RunnerSupervisor:
        for model_id in self.records:
            thread = threading.Thread(target=self._supervise, args=(model_id,),
                                      name=f"bchat-runner:{model_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    # -- state.json ----------------------------------------------------------------------------
    def _publish(self) -> None:
        """Write state.json atomically (a reader never sees half of it)."""
        with self._lock:
            body = {"supervisor": os.getpid(), "updated": time.time(),
                    "runners": {mid: dataclasses.asdict(r) for mid, r in self.records.items()}}
        path = self.directory / STATE_FILE
        partial = path.with_name(f".{STATE_FILE}.{threading.get_ident()}")
        partial.write_text(json.dumps(body))
        os.replace(partial, path)

    def _update(self, model_id: str, **changes: Any) -> None:
        with self._lock:
            record = self.records[model_id]
            for key, value in changes.items():
                setattr(record, key, value)
        self._publish()

    # -- one model's runner, for as long as the site runs --------------------------------------
    def _supervise(self, model_id: str) -> None:
        young_deaths = 0
        while not self._stopping.is_set():
            record = self.records[model_id]
            started = time.monotonic()
            returncode, last_report = self._run_once(model_id, record.generation + 1)
            if self._stopping.is_set():
                self._update(model_id, status="stopped", pid=None)
                return
            cause = describe_exit(returncode)
            lived = time.monotonic() - started
            if last_report == "load_failed":
                # llama.cpp refused the file (and said why, in the runner's log): no retry helps.
                self._update(model_id, status="unavailable", pid=None, last_exit=cause,
                             last_exit_at=time.time(),
                             reason=f"{model_id} could not be loaded: {self._failure(model_id)}")
                log.error("model %s is unavailable: it failed to load", model_id)
                return
            crashed_loading = last_report in (None, "listening", "loading")
            load_crashes = record.load_crashes + 1 if crashed_loading else 0
            log.error("the runner of %s (pid %s) %s%s", model_id, record.pid, cause,
                      " while loading the model" if crashed_loading else "")
            if crashed_loading and load_crashes >= LOAD_CRASH_LIMIT:
                self._update(model_id, status="unavailable", pid=None, restarts=record.restarts,
                             last_exit=cause, last_exit_at=time.time(), load_crashes=load_crashes,
                             reason=f"{model_id} crashed {load_crashes} times while loading: {cause}")
                log.error("model %s is unavailable after %d crashes while loading", model_id,
                          load_crashes)
                return
            young_deaths = young_deaths + 1 if lived < HEALTHY_AFTER_SECONDS else 0
            self._update(model_id, status="restarting", pid=None, restarts=record.restarts + 1,
                         last_exit=cause, last_exit_at=time.time(), load_crashes=load_crashes)
            delay = BACKOFF_SECONDS[min(max(young_deaths - 1, 0), len(BACKOFF_SECONDS) - 1)]
            self._stopping.wait(delay)

    def _failure(self, model_id: str) -> str:
        path = Path(self.records[model_id].socket + ".failure")
        try:
            return path.read_text()[:500] or "unknown error"
        except OSError:
            return "unknown error"

    def _run_once(self, model_id: str, generation: int) -> tuple[int, str | None]:
        """Start the runner, follow its reports until it exits; (returncode, last report)."""
        record = self.records[model_id]
        Path(record.socket).unlink(missing_ok=True)
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env["BCHAT_RUNNER_SETTINGS"] = json.dumps(self.settings)
        env["BCHAT_RUNNER_MODEL"] = self.model_json[model_id]
        command = [sys.executable, "-m", "webapp.model_runner", "runner", "--model", model_id,
                   "--socket", record.socket, "--report-fd", str(write_end)]
        try:
            # stdout to stderr: a command's output (`bchat bench` prints a table) stays its own.
            proc = subprocess.Popen(command, env=env, pass_fds=(write_end,), stdin=subprocess.DEVNULL,
                                    stdout=2)
        finally:
            os.close(write_end)  # the child holds the only write end: EOF means it has gone
        with self._lock:
            self._procs[model_id] = proc
        self._update(model_id, status="starting", pid=proc.pid, generation=generation)
        last: str | None = None
        with os.fdopen(read_end, "r") as reports:
            for line in reports:
                last = line.strip()
                if last == "loading":
                    self._update(model_id, status="loading")
                elif last == "ready":
                    self._update(model_id, status="ready", load_crashes=0, reason=None)
        returncode = proc.wait()
        with self._lock:
            self._procs.pop(model_id, None)
        return returncode, last

    # -- for tests, /healthz and shutdown --------------------------------------------------------
    def state(self) -> dict[str, RunnerRecord]:
        with self._lock:
            return {mid: dataclasses.replace(r) for mid, r in self.records.items()}

    def stop(self) -> None:
        """End every runner (SIGTERM, then SIGKILL after a grace period) and wait for them."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(STOP_GRACE_SECONDS)
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_supervisor(config: Mapping[str, Any], catalogue,
                     directory: str | os.PathLike | None = None) -> RunnerSupervisor:
    """Runners for every model of ``catalogue`` (a catalogue.ModelCatalogue)."""
    return RunnerSupervisor(runner_settings(config), catalogue, directory).start()


# -- one runner: the process that owns a model -------------------------------------------------------
def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the supervisor thread that started it ends, so a
    supervisor killed with -9 leaves no orphan holding the model's memory."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's stop() still ends us
        pass


def encode_options(options) -> dict[str, Any]:
    """GenerationOptions as JSON (the grammar built and checked in the web process included)."""
    return dataclasses.asdict(options)


def decode_options(data: dict[str, Any]):
    from .options import GenerationOptions

    data = dict(data)
    data["stop"] = tuple(data.get("stop") or ())
    return GenerationOptions(**data)


def encode_chunk(chunk) -> dict[str, Any] | None:
    from .engines.base import Finished, Queued, Token

    if isinstance(chunk, Token):
        return {"t": chunk.text, "l": chunk.logprobs} if chunk.logprobs else {"t": chunk.text}
    if isinstance(chunk, Queued):
        return {"q": chunk.position}
    if isinstance(chunk, Finished):  # counts only: the web side times the reply (base.timed)
        return {"f": {"finish_reason": chunk.finish_reason, "prompt_tokens": chunk.prompt_tokens,
                      "completion_tokens": chunk.completion_tokens, "meta": chunk.meta}}
    return None  # Idle: the runner needs no heartbeats, a hang-up shows on the socket itself


def encode_error(exc) -> dict[str, Any]:
    from .engines.base import ContextTooLong, UnknownModel

    kind = ("context_too_long" if isinstance(exc, ContextTooLong)
            else "unknown_model" if isinstance(exc, UnknownModel) else "engine")
    return {"e": {"kind": kind, "code": exc.code, "message": exc.message}}


class _RunnerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    engine: Any
    model_id: str
    stuck_after: float


class _Connection(socketserver.StreamRequestHandler):
    """One request on one connection. A hang-up is seen at once (the peer's close wakes a
    blocked recv), and cancels the generation even in the middle of a long prompt."""

    server: _RunnerServer

    def handle(self) -> None:
        from .engines.base import EngineError

        line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        if not line.endswith(b"\n"):
            return  # too long, or the web side went away: nothing to answer
        request = json.loads(line)
        engine, model_id = self.server.engine, self.server.model_id
        if request.get("op") == "health":
            problems = engine.health(float(request.get("stuck_after") or self.server.stuck_after))
            self._send({"pid": os.getpid(), "problems": problems, "activity": engine.activity()})
            return
        self._send({"a": 1})  # taken: from here on, a break means this runner died with it
        cancel = threading.Event()
        threading.Thread(target=self._watch_hangup, args=(cancel,), daemon=True).start()
        try:
            stream = engine.stream(model_id, request["messages"], decode_options(request["options"]),
                                   cancel)
            for chunk in stream:
                data = encode_chunk(chunk)
                if data is not None:
                    self._send(data)
        except EngineError as exc:
            self._send(encode_error(exc))
        except OSError:
            pass  # the web side hung up: the stream's own finally has cancelled the request
        finally:
            cancel.set()

    def _watch_hangup(self, cancel: threading.Event) -> None:
        try:
            while not cancel.is_set() and self.request.recv(1024):
                pass
        except OSError:
            pass
        cancel.set()

    def _send(self, data: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(data, ensure_ascii=False).encode() + b"\n")


def run_runner(model_id: str, socket_path: str, report_fd: int) -> int:
    """The runner process: load one model, then serve it on a Unix socket until told to stop."""
    from .processes import own_scheduling_group

    _die_with_parent()
    settings = json.loads(os.environ.get("BCHAT_RUNNER_SETTINGS") or "{}")
    nice = int(settings.get("RUNNER_NICE") or 0)
    if nice:
        os.nice(nice)
    own_scheduling_group(nice)  # and niced as a group where the CPU is shared by session
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s runner[{model_id}]: %(message)s")
    report = os.fdopen(report_fd, "w", buffering=1)

    def tell(what: str) -> None:
        report.write(what + "\n")

    from .catalogue import ModelCatalogue
    from .engines.llamacpp import LlamaCppEngine

    model = ModelCatalogue.model_from_json(os.environ["BCHAT_RUNNER_MODEL"])
    engine = LlamaCppEngine.from_config(ModelCatalogue.of([model]), settings)
    # The test suite's stand-in for a crash while loading (a C-level fault on demand).
    crash_on_load = os.environ.get("BCHAT_RUNNER_TEST_CRASH_ON_LOAD")
    tell("loading")
    if crash_on_load and crash_on_load == model_id:
        os.kill(os.getpid(), signal.SIGSEGV)
    worker = engine.worker(model_id)
    from .engines.base import EngineError

    try:
        worker.wait_loaded()
    except EngineError as exc:
        Path(socket_path + ".failure").write_text(exc.message)
        tell("load_failed")
        return 3
    server = _RunnerServer(socket_path, _Connection)
    server.engine, server.model_id = engine, model_id
    server.stuck_after = float(settings.get("WATCHDOG_SECONDS") or 120)

    def on_term(_signum, _frame) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal: the supervisor stops us
    tell("ready")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        engine.close()
    return 0


def run_supervisor(directory: str) -> int:
    """A supervisor process of its own (under gunicorn: its master reaps every child it sees,
    which would steal the runners' exit statuses from a supervisor living inside it)."""
    from .catalogue import ModelCatalogue
    from .config import instance_path, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    config = load_config(instance_path())
    supervisor = start_supervisor(config, ModelCatalogue(config["MODEL_PATH"]), directory)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    supervisor.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m webapp.model_runner")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("runner")
    one.add_argument("--model", required=True)
    one.add_argument("--socket", required=True)
    one.add_argument("--report-fd", type=int, required=True)
    sup = commands.add_parser("supervise")
    sup.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    if args.command == "runner":
        return run_runner(args.model, args.socket, args.report_fd)
    return run_supervisor(args.dir)


if __name__ == "__main__":
    sys.exit(main())
