"""The long-lived objects one app instance shares between requests: built once here (``init_app``)
and kept on ``app.extensions``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app

from .api_keys import KeyService
from .attachments import AttachmentService
from .benchmarks import BenchmarkService
from .catalogue import ModelCatalogue, load_model_names
from .chats import ChatService
from .db import Database
from .engines import EngineRegistry, build_engines
from .limits import Limits
from .runs.service import RunService
from .shares import ShareService
from .tools import ToolRegistry, build_tools
from .tools.steps import PageTools

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
    attachments: AttachmentService
    tools: ToolRegistry | None = None  # built-ins and the admin's MCP servers (tools/)
    page_tools: PageTools | None = None  # the browser engine's tool steps (tools/steps.py)
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
        if self.tools is not None:
            self.tools.close()
        self.db.dispose()


def init_app(app: Flask, limits: Limits) -> Services:
    """Build the services of one app instance, once, from its config."""
    config = app.config
    db = Database(config["DATABASE_URL"])
    # Deriving a missing browser format happens here, once per model version (~1 s for the
    # bundled model; `bchat models prepare` does it ahead of time).
    catalogue = ModelCatalogue(config["MODEL_PATH"], config["BROWSER_FORMAT"],
                               config["BROWSER_MODELS_DIR"], n_ctx=config["N_CTX"],
                               parallel=config["PARALLEL"],
                               names=load_model_names(config.get("MODELS_FILE")))
    engines = build_engines(config, catalogue)
    chats = ChatService(db, max_message_chars=config["MAX_MESSAGE_CHARS"],
                        max_tokens_limit=config["MAX_TOKENS_LIMIT"])

    tools = build_tools(config)
    runs = RunService(chats, engines, config, limits, tools)
    built = app.extensions[EXTENSION_KEY] = Services(
        db=db,
        chats=chats,
        catalogue=catalogue,
        engines=engines,
        shares=ShareService(db, chats, config["SECRET_KEY"], catalogue.facts),
        runs=runs,
        benchmarks=BenchmarkService(db, engines, catalogue, runs, limits),
        keys=KeyService(db),
        tools=tools,
        page_tools=PageTools(chats, tools, config),
        attachments=AttachmentService(db, max_bytes=config["MAX_ATTACHMENT_BYTES"],
                                      quota_bytes=config["ATTACHMENT_QUOTA_BYTES"]),
    )
    return built


def get_services() -> Services:
    return current_app.extensions[EXTENSION_KEY]
