"""gunicorn settings module: ``gunicorn -c python:webapp.gunicorn_conf …``.

It starts the model runners' supervisor once, beside gunicorn's master, so every worker
process shares one runner process per model (``-w 4`` loads each model once), and it tells
each worker process how many threads it has (BCHAT_SERVER_THREADS), so bchat can keep some of
them free for page loads: every open websocket holds a thread (see MAX_SOCKETS). Any other
gunicorn setting can still be given on the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

_supervisor: subprocess.Popen | None = None


def on_starting(server) -> None:  # gunicorn's hook: in the master, before any worker exists
    """Start the supervisor of the model runners in a process of its own: the master reaps
    every child it sees (waitpid(-1)), so runners started inside it would lose their exit
    statuses, and with them the cause of a crash."""
    global _supervisor
    from webapp.config import instance_path, load_config
    from webapp.model_runner import RUNNER_DIR_ENV

    config = load_config(instance_path())
    if config["MODEL_RUNNER"] != "process" or config["WORKER_URL"] or os.environ.get(RUNNER_DIR_ENV):
        return
    directory = tempfile.mkdtemp(prefix="bchat-runners-")
    _supervisor = subprocess.Popen([sys.executable, "-m", "webapp.model_runner", "supervise",
                                    "--dir", directory], stdin=subprocess.DEVNULL)
    os.environ[RUNNER_DIR_ENV] = directory  # the workers, forked later, find the runners here


def on_exit(server) -> None:
    import shutil

    from webapp.model_runner import RUNNER_DIR_ENV

    if _supervisor is None:
        return
    if _supervisor.poll() is None:
        _supervisor.terminate()  # it stops the runners, then itself
        try:
            _supervisor.wait(10)
        except subprocess.TimeoutExpired:
            _supervisor.kill()
    shutil.rmtree(os.environ.get(RUNNER_DIR_ENV, ""), ignore_errors=True)


def post_fork(server, worker) -> None:  # gunicorn's hook: runs in the worker before the app loads
    from webapp.processes import own_scheduling_group

    os.environ["BCHAT_SERVER_THREADS"] = str(worker.cfg.threads)
    own_scheduling_group()  # a worker shares the CPU as a PostgreSQL backend does


def post_worker_init(worker) -> None:
    """On SIGTERM, keep the partial replies and close the sockets at once: gunicorn would
    otherwise wait up to its graceful timeout for every open websocket to end. Then freeze
    what the worker has loaded (processes.freeze_loaded_objects)."""
    import signal
    import threading

    from webapp.processes import freeze_loaded_objects

    previous = signal.getsignal(signal.SIGTERM)
    services = getattr(worker.wsgi, "extensions", {}).get("bchat")

    def on_term(signum, frame) -> None:
        if services is not None:
            threading.Thread(target=services.shutdown, name="bchat-shutdown").start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    freeze_loaded_objects()


worker_class = "gthread"

