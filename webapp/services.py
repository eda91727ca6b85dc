"""The long-lived objects one app instance shares between requests, kept on ``app.extensions``."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from .api_keys import KeyService
from .chats import ChatService
from .db import Database
from .engines import EngineRegistry
from .model_files import ModelCatalogue
from .runs import RunService
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
    keys: KeyService

    def close(self) -> None:
        self.runs.shutdown()
        self.engines.close()
        self.db.dispose()


def get_services() -> Services:
    return current_app.extensions[EXTENSION_KEY]
