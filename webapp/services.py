"""The long-lived objects one app instance shares between requests, kept on ``app.extensions``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from .api_keys import KeyService
from .benchmarks import BenchmarkService
from .chats import ChatService
from .db import Database
from .engines import EngineRegistry
from .model_files import ModelCatalogue
from .runs.service import RunService
from .shares import ShareService

EXTENSION_KEY = "bchat"


@dataclass
class Services:
    db: Database
    chats: ChatService
    catalogue: ModelCatalogue
    engines: EngineRegistry
    shares: ShareService
    runs: RunService
    benchmarks: BenchmarkService
    keys: KeyService
    # Open chat sockets, so a shutdown can close them (with 1001, "going away") instead of
    # waiting for every visitor to leave.
    sockets: set[Any] = field(default_factory=set)
    sockets_lock: threading.Lock = field(default_factory=threading.Lock)

    def shutdown(self) -> None:
        """The server is stopping (SIGTERM): keep every partial reply, marked "interrupted",
        and close the sockets so pages reconnect to whichever process serves next."""
        self.runs.shutdown()
        with self.sockets_lock:
            sockets = list(self.sockets)
        for chat_socket in sockets:
            chat_socket.going_away()

    def close(self) -> None:
        self.shutdown()
        self.engines.close()
        self.db.dispose()


def get_services() -> Services:
    return current_app.extensions[EXTENSION_KEY]
