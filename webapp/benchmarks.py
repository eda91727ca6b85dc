"""Benchmarks: one fixed prompt set, run on the server's models (here or with `bchat bench`)
and in visitors' browsers (the page posts its figures), stored so a class sees its devices
next to the server.

The prompt set is fixed and documented (docs/benchmark.md): a short and a long prompt, greedy,
a fixed seed, ``DEFAULT_TOKENS`` tokens each. Figures are what the engine measured (llama.cpp's
own prompt and decode timings where it gives them). A run whose prompt came from a warm cache
says so (``cold: false``), and a server run made while other chats were running says how many
(``busy``), so nobody mistakes a shared server's figure for an idle one.
"""

from __future__ import annotations

import math
import platform
import threading
from typing import Any

from sqlalchemy import delete, select

from .db import Database
from .engines.base import EngineError, Finished, Queued, timed
from .errors import AppError, Invalid, NotFound
from .limits import Limits
from .models import Benchmark
from .options import GenerationOptions

SEED = 1234
DEFAULT_TOKENS = 64
MAX_TOKENS = 256
LIST_LIMIT = 200

PROMPTS: list[dict[str, str]] = [
    {"name": "short", "text": "Name three colours of the rainbow."},
    {"name": "long", "text": (
        "Read the following notes and then summarise them in two sentences.\n\n"
        + " ".join(
            f"Note {i}: the lighthouse keeper logged the weather at dawn, the passing ships at "
            f"noon, and the state of the lamp at dusk, as every keeper before had done."
            for i in range(1, 13)
        )
    )},
]
PROMPT_NAMES = tuple(p["name"] for p in PROMPTS)
BACKENDS = ("llamacpp", "webgpu", "wasm-mt", "wasm-st")
DEVICE_KEYS = {"cores": int, "device_memory": float, "gpu": str, "browser": str, "os": str}


def server_device() -> dict[str, Any]:
    import os

    return {"cores": os.cpu_count() or 1, "os": platform.system(), "gpu": None,
            "browser": None, "device_memory": None}


def run_prompt(engine: Any, model: str, prompt: dict[str, str], tokens: int,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """One prompt through a server engine, timed above it (engines.base.timed); ``cancel``
    set stops it (the engine ends the reply early)."""
    cancel = cancel or threading.Event()
    options = GenerationOptions(temperature=0.0, seed=SEED, max_tokens=tokens)
    finished: Finished | None = None
    queued = 0
    for item in timed(engine.stream(model, [{"role": "user", "content": prompt["text"]}], options,
                                    cancel)):
        if isinstance(item, Finished):
            finished = item
        elif isinstance(item, Queued):
            queued = max(queued, item.position)
    if finished is None:
        raise EngineError("the engine ended without a result")
    cached = int(finished.meta.get("prompt_cached") or 0)
    prompt_ms = finished.timing.prompt_ms
    evaluated = max(0, finished.prompt_tokens - cached)
    prompt_tps = round(evaluated / (prompt_ms / 1000), 1) if prompt_ms and evaluated else None
    return {
        "prompt": prompt["name"],
        "prompt_tokens": finished.prompt_tokens,
        "prompt_cached": cached,
        "prompt_ms": prompt_ms,
        "prompt_tps": prompt_tps,
        "decode_tps": finished.tokens_per_second,
        "completion_tokens": finished.completion_tokens,
        "ttft_ms": finished.timing.first_token_ms,
        "cold": cached == 0,
        "queued": queued,
    }


class BenchmarkService:
    def __init__(self, db: Database, engines: Any, catalogue: Any, runs: Any,
                 limits: Limits | None = None) -> None:
        self.db = db
        self.engines = engines
        self.catalogue = catalogue
        self.runs = runs
        self._lock = threading.Lock()  # one server benchmark at a time: they would skew each other
        # The running server benchmark: whose it is, whether it was cancelled, and the event
        # that stops the prompt under way (an engine may set its own at a reply's end, so the
        # cancellation is kept apart from it).
        self._running: dict[str, Any] | None = None
        self._cancelled: dict[tuple[str | None, str], None] = {}  # (owner, run) cancelled early
        self._state = threading.Lock()  # a cancel and a run's start see each other's writes
        self.limits = limits  # None: no limit on posts (the CLI)

    def model_facts(self, model: str, engine: str = "server") -> dict[str, Any]:
        """The figures of the file the engine runs: a browser run ran the copy pages download
        (catalogue.browser_file: Q8_0 by default), not the server's file."""
        facts = self.catalogue.facts(model) or {}
        facts = {k: facts.get(k) for k in ("quantization", "bits_per_weight", "file_size",
                                           "parameters", "architecture")}
        local, served = self.catalogue.get(model), self.catalogue.browser(model)
        if engine == "browser" and local is not None and served is not None:
            facts.update({k: v for k, v in served.facts(local).items() if k != "file_name"})
        return facts

    def run_server(self, model: str | None, *, tokens: int = DEFAULT_TOKENS,
                   owner: str | None = None, store: bool = True, run: Any = None) -> dict[str, Any]:
        """``run``: the caller's name for this run, so a cancel sent before the run began
        (the page's Cancel right after its Run) still stops it."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
            raise Invalid("bad_tokens", f"tokens must be from 1 to {MAX_TOKENS}")
        if run is not None and not (isinstance(run, str) and 0 < len(run) <= 64):
            raise Invalid("bad_run", "run must be a string of 1 to 64 characters")
        model, engine = self.engines.resolve(model)
        if owner is not None and self.runs is not None and self.runs.admission is not None:
            # A benchmark is replies too: an account's models and token quota hold here as in
            # a chat (one server benchmark runs at a time, so the in-flight cap is moot).
            self.runs.admission(owner, 1, [model])
        if not self._lock.acquire(blocking=False):
            raise AppError("busy", "a server benchmark is already running; try again shortly")
        with self._state:
            running = self._running = {"owner": owner, "run": run, "prompt": threading.Event(),
                                       "cancelled": run is not None and (owner, run) in self._cancelled}
        try:
            busy = len(self.runs.live_runs()) if self.runs is not None else 0
            results = []
            try:
                for prompt in PROMPTS:
                    running["prompt"] = threading.Event()
                    if running["cancelled"]:
                        break
                    results.append(run_prompt(engine, model, prompt, tokens, running["prompt"]))
            except EngineError as exc:
                raise AppError(exc.code, exc.message, status=502) from None
            if running["cancelled"]:  # a cut-short run's figures would mislead: nothing is stored
                raise AppError("cancelled", "the benchmark was cancelled")
        finally:
            self._running = None
            self._lock.release()
        for result in results:
            result["busy"] = busy
        record = {"engine": "server", "backend": getattr(engine, "name", "server"), "model": model,
                  "model_facts": self.model_facts(model), "device": server_device(),
                  "results": results}
        return self._store(owner, record) if store else {**record, "id": None}

    def cancel(self, owner: str, run: Any = None) -> None:
        """Stop the server benchmark ``owner`` started (its POST answers ``cancelled``). With
        ``run``, that run, even if its POST has not begun yet; without, the one running.
        NotFound when none of theirs is running (another visitor's is not theirs to stop)."""
        with self._state:
            running = self._running
            if isinstance(run, str) and 0 < len(run) <= 64:
                self._cancelled[(owner, run)] = None
                while len(self._cancelled) > 256:  # only the latest few can still be on their way
                    del self._cancelled[next(iter(self._cancelled))]
                if running is None or running["owner"] != owner or running["run"] != run:
                    return
            elif running is None or running["owner"] != owner:
                raise NotFound("benchmark", "no server benchmark of yours is running")
            running["cancelled"] = True  # read before each prompt starts, and after the last
            running["prompt"].set()

    def add_browser(self, owner: str, body: Any, ip: str | None = None) -> dict[str, Any]:
        """A page's own run of the prompt set, validated strictly (it is only numbers), and
        limited per visitor and per address (only posts that would be stored count)."""
        if not isinstance(body, dict):
            raise Invalid("bad_benchmark", "the body must be an object")
        backend, model = body.get("backend"), body.get("model")
        if backend not in BACKENDS[1:]:
            raise Invalid("bad_benchmark", f"backend must be one of {', '.join(BACKENDS[1:])}")
        if not isinstance(model, str) or not 0 < len(model) <= 200:
            raise Invalid("bad_benchmark", "model must be a model id")
        results = body.get("results")
        if not isinstance(results, list) or not 0 < len(results) <= len(PROMPTS):
            raise Invalid("bad_benchmark", "results must list the prompts' figures")
        clean_results = [self._clean_result(r) for r in results]
        record = {"engine": "browser", "backend": backend, "model": model,
                  "model_facts": self.model_facts(model, "browser"),
                  "device": self._clean_device(body.get("device")), "results": clean_results}
        if self.limits is not None:
            self.limits.take_benchmark_post(owner, ip)
        return self._store(owner, record)

    def remove(self, benchmark_id: str) -> dict[str, Any]:
        """Delete one stored run (an admin's `bchat bench --remove ID`); NotFound if none."""
        with self.db.write() as session:
            row = session.scalar(select(Benchmark).where(Benchmark.public_id == benchmark_id))
            if row is None:
                raise NotFound("benchmark")
            removed = self._dict(row, None)
            session.execute(delete(Benchmark).where(Benchmark.id == row.id))
            return removed

    @staticmethod
    def _number(value: Any, name: str, *, integer: bool = False, high: float = 1e7) -> Any:
        if value is None:
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                or not 0 <= value <= high:
            raise Invalid("bad_benchmark", f"{name} must be a number from 0 to {high:g}")
        return value

    def _clean_result(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict) or raw.get("prompt") not in PROMPT_NAMES:
            raise Invalid("bad_benchmark", f"each result names its prompt: {', '.join(PROMPT_NAMES)}")
        result = {"prompt": raw["prompt"]}
        for name in ("prompt_tokens", "prompt_cached", "completion_tokens", "queued", "busy"):
            result[name] = self._number(raw.get(name), name, integer=True)
        for name in ("prompt_ms", "prompt_tps", "decode_tps", "ttft_ms"):
            result[name] = self._number(raw.get(name), name)
        result["cold"] = bool(raw.get("cold", (result["prompt_cached"] or 0) == 0))
        return result

    @staticmethod
    def _clean_device(raw: Any) -> dict[str, Any]:
        """Only coarse facts: cores, memory class, GPU adapter name, browser and OS family."""
        raw = raw if isinstance(raw, dict) else {}
        device: dict[str, Any] = {}
        for key, kind in DEVICE_KEYS.items():
            value = raw.get(key)
            if kind is str:
                device[key] = value[:80] if isinstance(value, str) and value.isprintable() else None
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1024
                device[key] = value if ok else None
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value) and 0 < value <= 1024
                device[key] = value if ok else None
        return device

    def _store(self, owner: str | None, record: dict[str, Any]) -> dict[str, Any]:
        with self.db.write() as session:
            row = Benchmark(owner_id=owner, **record)
            session.add(row)
            session.flush()
            return self._dict(row, owner)

    @staticmethod
    def _dict(row: Benchmark, viewer: str | None) -> dict[str, Any]:
        return {"id": row.public_id, "created_at": row.created_at.isoformat(timespec="seconds") + "Z",
                "engine": row.engine, "backend": row.backend, "model": row.model,
                "model_facts": row.model_facts, "device": row.device, "results": row.results,
                "mine": viewer is not None and row.owner_id == viewer}

    def list(self, viewer: str | None, *, with_owner: bool = False) -> list[dict[str, Any]]:
        """Everyone's runs, newest first: the class's devices next to the server. An admin's
        listing (``with_owner``) also says whose each one is."""
        with self.db.read() as session:
            rows = session.scalars(select(Benchmark).order_by(Benchmark.id.desc()).limit(LIST_LIMIT))
            return [{**self._dict(row, viewer), **({"owner": row.owner_id} if with_owner else {})}
                    for row in rows]


def table(records: list[dict[str, Any]]) -> str:
    """The figures as a plain table (for `bchat bench`)."""
    header = ("engine", "backend", "model", "quant", "bpw", "prompt", "tokens", "prompt tok/s",
              "decode tok/s", "first token", "cache")
    rows = []
    for record in records:
        facts = record.get("model_facts") or {}
        for r in record["results"]:
            rows.append((
                record["engine"], record["backend"], record["model"], str(facts.get("quantization") or "?"),
                f"{facts['bits_per_weight']:.2f}" if facts.get("bits_per_weight") else "?",
                r["prompt"], str(r["prompt_tokens"]),
                f"{r['prompt_tps']:.1f}" if r.get("prompt_tps") else "-",
                f"{r['decode_tps']:.1f}" if r.get("decode_tps") else "-",
                f"{r['ttft_ms']:.0f} ms" if r.get("ttft_ms") is not None else "-",
                "cold" if r.get("cold") else "warm",
            ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])
