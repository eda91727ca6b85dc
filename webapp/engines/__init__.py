"""Server-side engines behind one interface, and the registry that routes a model id to one."""

from __future__ import annotations

from typing import Any

from ..errors import AppError
from .base import Engine, ModelInfo, UnknownModel


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

    def resolve(self, model: Any) -> tuple[str, Engine]:
        """The model a client asked for (none: the default one) and its engine; AppError
        ``unknown_model`` (404) when there is no such model."""
        chosen = model or self.default_model
        if not isinstance(chosen, str):
            raise AppError("unknown_model", "no model is available on this server")
        try:
            return chosen, self.engine_for(chosen)
        except UnknownModel as exc:
            raise AppError("unknown_model", exc.message) from None

    def health(self, stuck_after: float) -> list[dict[str, Any]]:
        """Problems that fail every chat to a model: a dead or stuck inference thread."""
        problems: list[dict[str, Any]] = []
        for engine in self.engines:
            check = getattr(engine, "health", None)
            if check is not None:
                problems.extend(check(stuck_after))
        return problems

    def runners(self) -> list[dict[str, Any]]:
        """The model processes and what became of them (pid, restarts, last exit)."""
        found: list[dict[str, Any]] = []
        for engine in self.engines:
            listing = getattr(engine, "runners", None)
            if listing is not None:
                found.extend(listing())
        return found

    def close(self) -> None:
        for engine in self.engines:
            engine.close()


def build_engines(config, catalogue) -> EngineRegistry:
    """The server engines a deployment asked for: the embedded models in runner processes
    (or, with BCHAT_MODEL_RUNNER=inline, in this one), or through a shared `bchat worker`,
    then any OpenAI-compatible upstreams."""
    import os

    from ..model_runner import RUNNER_DIR_ENV, start_supervisor
    from .llamacpp import LlamaCppEngine
    from .openai_compat import OpenAICompatEngine, UpstreamConfig, load_upstreams
    from .runner import RunnerEngine

    engines: list[Engine] = []
    if config.get("WORKER_URL"):
        engines.append(OpenAICompatEngine(UpstreamConfig(
            name="worker",
            base_url=str(config["WORKER_URL"]).rstrip("/") + "/v1",
            api_key=config.get("WORKER_API_KEY") or "none",
            connect_timeout=5.0,
            read_timeout=600.0,  # queued behind other chats, the first token can be far off
        )))
    elif len(catalogue) and config["MODEL_RUNNER"] == "process":
        if os.environ.get(RUNNER_DIR_ENV):  # gunicorn's master supervises them (gunicorn_conf)
            engines.append(RunnerEngine(catalogue, os.environ[RUNNER_DIR_ENV]))
        else:
            supervisor = start_supervisor(config, catalogue)
            engines.append(RunnerEngine(catalogue, supervisor.directory, supervisor))
    elif len(catalogue):
        engines.append(LlamaCppEngine.from_config(catalogue, config))
    engines.extend(OpenAICompatEngine(upstream) for upstream in load_upstreams(config))
    return EngineRegistry(engines)
