"""gunicorn settings module: ``gunicorn -c python:webapp.gunicorn_conf …``.

It tells each worker process how many threads it has (BCHAT_SERVER_THREADS), so bchat can
keep some of them free for page loads: every open websocket holds a thread (see MAX_SOCKETS).
Any other gunicorn setting can still be given on the command line.
"""

from __future__ import annotations

import os


def post_fork(server, worker) -> None:  # gunicorn's hook: runs in the worker before the app loads
    os.environ["BCHAT_SERVER_THREADS"] = str(worker.cfg.threads)


worker_class = "gthread"

