"""The embedded llama.cpp engine: the GGUF files of the catalogue, each run in this process by
its own inference thread (batched.py) through llama-cpp-python."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from ..catalogue import ModelCatalogue
from ..options import GenerationOptions
from .base import Chunk, ModelInfo, UnknownModel
from .batched import ModelWorker
from .inference import fallback_template


class LlamaCppEngine:
    """All GGUF files of the catalogue, each loaded once, on first use or at start."""

    name = "llamacpp"

    def __init__(
        self,
        catalogue: ModelCatalogue,
        *,
        n_ctx: int,
        n_threads: int,
        n_gpu_layers: int = 0,
        preload: bool = False,
        parallel: int = 1,
        chat_template: str | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.parallel = parallel
        self._settings = dict(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                              chat_template=fallback_template(chat_template))
        self._workers: dict[str, ModelWorker] = {}
        self._lock = threading.Lock()
        if preload:
            for model in catalogue:
                self.worker(model.id).wait_loaded()

    @classmethod
    def from_config(cls, catalogue: ModelCatalogue, config: Mapping[str, Any]) -> LlamaCppEngine:
        """The engine as a deployment's settings (BCHAT_N_CTX …) ask for it: the app's inline
        runner, ``bchat worker`` and each runner process."""
        return cls(catalogue, n_ctx=int(config["N_CTX"]), n_threads=int(config["N_THREADS"]),
                   n_gpu_layers=int(config.get("N_GPU_LAYERS") or 0),
                   preload=bool(config.get("PRELOAD_MODELS")),
                   parallel=int(config.get("PARALLEL") or 1),
                   chat_template=config.get("CHAT_TEMPLATE"))

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=m.id, engine=self.name, facts=self.catalogue.facts(m.id) or {})
                for m in self.catalogue]

    def activity(self) -> dict[str, dict[str, Any]]:
        """Per loaded model: is it generating, and how many requests wait for it."""
        with self._lock:
            workers = dict(self._workers)
        return {mid: w.activity() for mid, w in workers.items()}

    def health(self, stuck_after: float) -> list[dict[str, Any]]:
        with self._lock:
            workers = list(self._workers.values())
        return [problem for w in workers if (problem := w.health(stuck_after))]

    def loaded_models(self) -> list[str]:
        with self._lock:
            return [mid for mid, w in self._workers.items() if w.loaded()]

    def worker(self, model_id: str) -> ModelWorker:
        with self._lock:
            worker = self._workers.get(model_id)
            if worker is None:
                model = self.catalogue.get(model_id)
                if model is None:
                    raise UnknownModel(f"no model named {model_id!r}")
                worker = ModelWorker(model, parallel=self.parallel, **self._settings)
                self._workers[model_id] = worker
            return worker

    def stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: GenerationOptions,
        cancel: threading.Event,
        heartbeat: float | None = None,
    ) -> Iterator[Chunk]:
        return self.worker(model).submit(messages, options, cancel, heartbeat)

    def close(self) -> None:
        with self._lock:
            for worker in self._workers.values():
                worker.close()
            self._workers.clear()
