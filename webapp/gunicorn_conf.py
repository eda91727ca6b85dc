"""gunicorn settings module: ``gunicorn -c python:webapp.gunicorn_conf …``.

It tells each worker process how many threads it has (BCHAT_SERVER_THREADS), so bchat can
keep some of them free for page loads: every open websocket holds a thread (see MAX_SOCKETS).
Any other gunicorn setting can still be given on the command line.
"""

from __future__ import annotations

import os


def post_fork(server, worker) -> None:  # gunicorn's hook: runs in the worker before the app loads
    os.environ["BCHAT_SERVER_THREADS"] = str(worker.cfg.threads)


def post_worker_init(worker) -> None:
    """On SIGTERM, keep the partial replies and close the sockets at once: gunicorn would
    otherwise wait up to its graceful timeout for every open websocket to end."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    services = getattr(worker.wsgi, "extensions", {}).get("bchat")

    def on_term(signum, frame) -> None:
        if services is not None:
            threading.Thread(target=services.shutdown, name="bchat-shutdown").start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


worker_class = "gthread"

