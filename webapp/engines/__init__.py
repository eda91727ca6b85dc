"""Server-side engines behind one interface, and the registry that routes a model id to one."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .base import Chunk, Engine, GenerationOptions, ModelInfo, UnknownModel


class EngineRegistry:
    """Every model the server can run, whichever engine serves it."""

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines

    def models(self) -> list[ModelInfo]:
        seen: set[str] = set()
        found: list[ModelInfo] = []
        for engine in self.engines:
            for info in engine.models():
                if info.id not in seen:  # the first engine to offer an id wins
                    seen.add(info.id)
                    found.append(info)
        return found

    @property
    def default_model(self) -> str | None:
        models = self.models()
        return models[0].id if models else None

    def engine_for(self, model_id: str) -> Engine:
        for engine in self.engines:
            if any(info.id == model_id for info in engine.models()):
                return engine
        raise UnknownModel(f"no model named {model_id!r} on this server")

    def stream(
        self,
        model_id: str,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
    ) -> Iterator[Chunk]:
        return self.engine_for(model_id).stream(model_id, messages, options, cancel)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
