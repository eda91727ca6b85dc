"""The catalogue of GGUF model files this app can run, with facts read from their headers.

Facts come from the GGUF metadata and tensor table (no weights are loaded), so listing
models is cheap and the UI can show size and quantisation before anyone downloads a byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from .config import SETTINGS
from .images import NATIVE_TYPES

log = logging.getLogger(__name__)

# GGUF general.file_type values (llama_ftype) -> the names llama.cpp prints.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4",
}
FILE_TYPES = _FILE_TYPES  # the names `bchat models quantize` takes (quant.py)


@dataclass(frozen=True)
class ModelFile:
    id: str
    path: Path
    name: str
    architecture: str
    parameters: int
    quantization: str
    bits_per_weight: float
    file_size: int
    context_length: int | None
    has_chat_template: bool
    version: str  # changes whenever the file does; part of the browser download URL
    n_layers: int | None = None
    # KV cache bytes per token of context (f16 K and V over every layer), from the header.
    kv_bytes_per_token: int | None = None
    # The weights alone (the tensor table's bytes, no header or vocabulary): bits per weight as
    # the quantisation type really stores them (quant.py records variants with it).
    tensor_bytes: int | None = None
    # Mixture of experts, from the header: experts per layer, those used per token, and the
    # parameters in expert tensors (*_exps), of which only experts_used/experts run per token.
    experts: int | None = None
    experts_used: int | None = None
    expert_parameters: int | None = None
    # The image projector beside it (projector_for), by file name: what a vision model needs;
    # the embedded engine runs it (engines/vision.py), so such a model takes images.
    projector: str | None = None
    projector_problem: str | None = None  # why that file is not an image projector (vision_problem)
    # Where it is: beside the path the model was found at, which need not be where a linked
    # model file really lives (path is resolved). The server's to know, not in facts.
    projector_path: Path | None = None

    @property
    def weights_bits_per_weight(self) -> float:
        if not self.parameters or not self.tensor_bytes:
            return self.bits_per_weight
        return round(self.tensor_bytes * 8 / self.parameters, 3)

    @property
    def active_parameters(self) -> int:
        """Parameters that run for each token: all of a dense model's; a MoE model's shared
        ones plus its used share of the experts'."""
        if not self.experts or not self.experts_used or not self.expert_parameters:
            return self.parameters
        idle = self.expert_parameters * (1 - self.experts_used / self.experts)
        return int(self.parameters - idle)

    def memory_needed(self, n_ctx: int, parallel: int = 1) -> int:
        """Rough RAM to run this model: the weights plus ~20% (compute buffers, runtime) plus
        the KV cache for ``parallel`` chats of ``n_ctx`` tokens (capped at the model's own)."""
        if self.context_length:
            n_ctx = min(n_ctx, self.context_length)
        kv = (self.kv_bytes_per_token or 0) * n_ctx * max(parallel, 1)
        return int(self.file_size * WEIGHTS_OVERHEAD) + kv

    def fits_server(self, n_ctx: int, parallel: int) -> dict[str, Any]:
        """Whether this machine has the memory free to load it now (None where unknown), run
        with ``parallel`` chats of ``n_ctx`` tokens (ModelCatalogue.facts passes the server's)."""
        needed = self.memory_needed(n_ctx, parallel)
        available = meminfo_bytes()
        return {
            "fits": None if available is None else needed <= available,
            "memory_needed": needed,
            "mem_available": available,
            "n_ctx": min(n_ctx, self.context_length or n_ctx),
            "parallel": parallel,
        }

    def facts(self, n_ctx: int, parallel: int) -> dict[str, Any]:
        data = asdict(self)
        data["file_name"] = data.pop("path").name  # the name only: where it lives is the server's
        data.pop("projector_path")
        data.pop("id")
        # file_size and kv_bytes_per_token let a page estimate its own fit for its own context.
        data["fits_server"] = self.fits_server(n_ctx, parallel)
        data["weights_bits_per_weight"] = self.weights_bits_per_weight
        data["active_parameters"] = self.active_parameters
        if self.projector and not self.projector_problem:
            data["vision"] = True  # engines.base.takes_images
            data["image_types"] = list(NATIVE_TYPES)  # what its decoder reads (no WebP)
        return data


# The weights are mapped whole; compute buffers and the runtime add roughly a fifth on top.
WEIGHTS_OVERHEAD = 1.2


def meminfo_bytes(field: str = "MemAvailable", meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """A ``field`` of Linux's /proc/meminfo in bytes (MemAvailable: what can be allocated
    without swapping; MemTotal); None elsewhere."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        log.warning("could not read %s from %s", field, meminfo)
    return None


def _kv_bytes_per_token(reader, arch: str) -> tuple[int | None, int | None]:
    """(layers, KV bytes per token) for a llama.cpp f16 cache, or (None, None) if unknown."""
    def number(key: str) -> int | None:
        value = _field_value(reader, f"{arch}.{key}")
        if isinstance(value, list):  # per-layer head counts (some architectures): take the largest
            value = max(value) if value else None
        return int(value) if value is not None else None

    layers, embd, heads = number("block_count"), number("embedding_length"), number("attention.head_count")
    if not layers or not embd or not heads:
        return layers, None
    heads_kv = number("attention.head_count_kv") or heads
    key_len = number("attention.key_length") or embd // heads
    value_len = number("attention.value_length") or embd // heads
    return layers, layers * heads_kv * (key_len + value_len) * 2


def _field_value(reader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def _file_version(path: Path, stat: os.stat_result) -> str:
    """A short tag that changes when the file does, without hashing 100 MB at every start.

    Size, mtime and the first and last MiB together catch replacement and re-quantisation.
    """
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        if stat.st_size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def read_model_file(path: Path, model_id: str | None = None) -> ModelFile:
    from gguf import GGUFReader  # imported here: it pulls in numpy, needed only when scanning

    reader = GGUFReader(str(path))
    arch = _field_value(reader, "general.architecture") or "unknown"
    parameters = int(sum(int(t.n_elements) for t in reader.tensors))
    stat = path.stat()
    file_type = _field_value(reader, "general.file_type")
    quant = _FILE_TYPES.get(int(file_type), f"type {file_type}") if file_type is not None else "?"
    ctx = _field_value(reader, f"{arch}.context_length")
    n_layers, kv_per_token = _kv_bytes_per_token(reader, arch)
    experts, experts_used = (_field_value(reader, f"{arch}.{key}")
                             for key in ("expert_count", "expert_used_count"))
    expert_parameters = sum(int(t.n_elements) for t in reader.tensors if "_exps." in t.name)
    return ModelFile(
        id=model_id or path.stem,
        path=path.resolve(),
        name=_field_value(reader, "general.name") or path.stem,
        architecture=arch,
        parameters=parameters,
        quantization=quant,
        bits_per_weight=round(stat.st_size * 8 / parameters, 2) if parameters else 0.0,
        file_size=stat.st_size,
        context_length=int(ctx) if ctx is not None else None,
        has_chat_template=_field_value(reader, "tokenizer.chat_template") is not None,
        version=_file_version(path, stat),
        n_layers=n_layers,
        kv_bytes_per_token=kv_per_token,
        tensor_bytes=int(sum(int(t.n_bytes) for t in reader.tensors)),
        experts=int(experts) if experts else None,
        experts_used=int(experts_used) if experts_used else None,
        expert_parameters=expert_parameters or None,
    )


def is_projector(path: Path) -> bool:
    """An image projector (llama.cpp's ``mmproj`` GGUF), by its name: not a model to chat with."""
    return path.name.lower().startswith("mmproj") or path.name.lower().endswith(".mmproj.gguf")


def projector_for(model: Path) -> Path | None:
    """The projector beside ``model`` (llama.cpp's convention): ``<stem>.mmproj.gguf`` or
    ``mmproj-<stem>.gguf``, else ``mmproj-<stem without its quantisation>*.gguf`` as
    ggml-org's repositories ship them (gemma-3-4b-it-Q4_K_M.gguf beside
    mmproj-gemma-3-4b-it-f16.gguf); the first by name when several match."""
    folder, stem = model.parent, model.stem
    for name in (f"{stem}.mmproj.gguf", f"mmproj-{stem}.gguf"):
        if (folder / name).is_file():
            return folder / name
    base = _QUANT_TAG.sub("", stem)
    found = sorted(p for p in folder.glob(f"mmproj-{glob_escape(base)}*.gguf") if p.is_file())
    return found[0] if found else None


def vision_problem(path: Path) -> str | None:
    """Why ``path`` is not an image projector llama.cpp can run (None: it is one, as far as
    its GGUF header says: a CLIP file with a vision encoder)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same answer
        return f"{path.name} is not a readable GGUF file ({type(exc).__name__})"
    if _field_value(reader, "general.architecture") != "clip" or \
            not _field_value(reader, "clip.has_vision_encoder"):
        return f"{path.name} is not an image projector (a CLIP GGUF with a vision encoder)"
    return None


def discover(model_path: str | os.PathLike) -> list[ModelFile]:
    """Every readable .gguf at ``model_path`` (a file, or a directory searched one level),
    each with its image projector when one is beside it; projectors are not models."""
    root = Path(model_path)
    if root.is_dir():
        candidates = sorted(p for p in root.iterdir() if p.suffix == ".gguf" and p.is_file()
                            and not is_projector(p))
    elif root.is_file():
        candidates = [root]
    else:
        log.error("BCHAT_MODEL_PATH %s does not exist", root)
        return []
    models: list[ModelFile] = []
    seen: set[str] = set()
    for path in candidates:
        model_id = path.stem
        n = 2
        while model_id in seen:
            model_id, n = f"{path.stem}-{n}", n + 1
        try:
            model = read_model_file(path, model_id)
            projector = projector_for(path)
            if projector:
                model = replace(model, projector=projector.name, projector_path=projector,
                                projector_problem=vision_problem(projector))
            models.append(model)
        except Exception:  # a broken file must not hide the good ones
            log.exception("skipping %s: not a readable GGUF file", path)
            continue
        seen.add(model_id)
    return models


# -- display names ---------------------------------------------------------------------------
#
# What the page calls a model. The id (the file's stem) stays what programs use; people get a
# name: the one an admin gave it (BCHAT_MODELS_FILE), else the GGUF's general.name when it says
# no more than the file name does (it is often a training run's: "Smollm2 135M 8k Lc100K Mix1
# Ep2"), else the file name without its quantisation, then " · " and the quantisation.

# A trailing quantisation tag in a file name: .Q4_1, -Q4_K_M, _q8_0, -IQ3_XS, .F16, -bf16 …
_QUANT_TAG = re.compile(r"[.\-_](?:I?Q\d(?:_[A-Z0-9]+)*|[BF]F?16|F32|MXFP4|TQ\d_\d)$", re.IGNORECASE)
# File names that say nothing about the model: its general.name is better, whatever it is.
_GENERIC_STEMS = {"model", "ggml-model", "ggml_model", "gguf", "weights"}


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s\-_.:/]+", text.lower()) if w]


def base_stem(stem: str) -> str:
    """A file name's stem without its quantisation tags: what a model's variants share."""
    base = stem
    while _QUANT_TAG.search(base):
        base = _QUANT_TAG.sub("", base)
    return base or stem


def display_name(general_name: str | None, stem: str, quantization: str | None) -> str:
    """A person's name for a model file (see above)."""
    base = base_stem(stem)
    general = " ".join((general_name or "").split())
    if general and (base.lower() in _GENERIC_STEMS or len(_words(base)) < 2
                    or set(_words(general)) <= set(_words(base))):
        name = general
    else:
        name = " ".join(re.split(r"[\s\-_]+", base)).strip() or stem
    said = re.search(rf"(?<![a-z0-9]){re.escape(quantization or '?')}(?![a-z0-9])", name, re.IGNORECASE)
    if quantization and quantization != "?" and not said:
        name = f"{name} · {quantization}"
    return name


def load_model_names(path: str | os.PathLike | None) -> dict[str, str]:
    """BCHAT_MODELS_FILE: a TOML or JSON table of model file name (or id) -> display name.
    A file that is not such a table stops the start with the file's name and what is wrong."""
    if not path:
        return {}
    import tomllib

    text = Path(path).read_text()
    kind = "JSON" if str(path).endswith(".json") else "TOML"
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not valid {kind}: {exc}") from None
    data = data.get("names", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in data.items()):
        raise ValueError(f"{path}: expected a table of model file name = \"display name\"")
    return {key.removesuffix(".gguf"): " ".join(value.split())[:120] for key, value in data.items()}


class ModelCatalogue:
    """The models found at start; looked up by id for inference and for browser downloads."""

    # The context and parallel chats the server runs each model with, for which facts() judges
    # whether it fits (the app and the worker pass BCHAT_N_CTX and BCHAT_PARALLEL).
    n_ctx: int = SETTINGS["N_CTX"][0]  # type: ignore[assignment]
    parallel: int = SETTINGS["PARALLEL"][0]  # type: ignore[assignment]

    def __init__(self, model_path: str | os.PathLike, browser_format: str | None = None,
                 browser_dir: str | os.PathLike | None = None, *, n_ctx: int | None = None,
                 parallel: int | None = None, names: dict[str, str] | None = None) -> None:
        self.model_path = str(model_path)
        self.names = names or {}  # BCHAT_MODELS_FILE's display names, by model id
        self.n_ctx = int(n_ctx or self.n_ctx)
        self.parallel = int(parallel or self.parallel)
        self._models = {m.id: m for m in discover(model_path)}
        # What each model's page download is: the file itself, or a format derived from it.
        self._browser = {
            m.id: browser_file(m, browser_format, Path(browser_dir) if browser_dir else None)
            for m in self._models.values()
        }

    @classmethod
    def of(cls, models: list[ModelFile]) -> ModelCatalogue:
        """A catalogue of models already read (a model runner gets its one model from the
        supervisor: reading a GGUF header again costs ~2 s for a 49k-token vocabulary)."""
        catalogue = cls.__new__(cls)
        catalogue.model_path = ""
        catalogue._models = {m.id: m for m in models}
        catalogue._browser = {}
        catalogue.names = {}
        return catalogue

    def to_json(self, model_id: str) -> str:
        model = self._models[model_id]
        return json.dumps({**asdict(model), "path": str(model.path), "projector_path":
                           str(model.projector_path) if model.projector_path else None})

    @staticmethod
    def model_from_json(text: str) -> ModelFile:
        data = json.loads(text)
        projector = data.get("projector_path")
        return ModelFile(**{**data, "path": Path(data["path"]),
                            "projector_path": Path(projector) if projector else None})

    def browser(self, model_id: str) -> BrowserFile | None:
        return self._browser.get(model_id)

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> ModelFile | None:
        return self._models.get(model_id)

    def facts(self, model_id: str) -> dict[str, Any] | None:
        """What the page, the API, the engines and the doctor say about a model (None: no such
        model), its fit judged for the settings it is run with."""
        model = self._models.get(model_id)
        return model.facts(self.n_ctx, self.parallel) if model else None

    def display_name(self, model_id: str) -> str:
        """What people see for a model: the admin's name, else one made from the file (any
        model, an upstream's too: those keep their id unless the models file names them)."""
        if model_id in self.names:
            return self.names[model_id]
        model = self._models.get(model_id)
        return display_name(model.name, model.path.stem, model.quantization) if model else model_id

    @property
    def default_id(self) -> str | None:
        return next(iter(self._models), None)


# -- the format browsers run ----------------------------------------------------------------
#
# llama.cpp in the page (WASM SIMD128) is compute-bound, not memory-bound like native code, so
# the format that decodes fastest there is not the one that is fastest natively: 8-bit blocks
# need no nibble unpacking in the inner dot product. bench/browser_speed.py measures every
# format llama.cpp can derive from the bundled Q4_1 (Q4_1, Q8_0, Q4_0, F16) on both WASM
# backends; its winner is BCHAT_BROWSER_FORMAT's default. The server engine keeps the file
# as configured.
BROWSER_REASON = (
    "{fmt} runs fastest in the page (bench/browser_speed.py: decode and prompt tok/s of Q4_1, "
    "Q8_0, Q4_0 and F16 in chromium's WASM, where 8-bit blocks skip the 4-bit unpacking); "
    "derived once from {source} with llama.cpp's quantizer"
)
# llama_ftype values llama.cpp's quantizer takes for the formats offered to browsers.
_DERIVABLE = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "F16": 1}
# Below this a file is served as is: deriving costs more than it could save (test models).
DERIVE_MIN_BYTES = 8 * 1024**2


@dataclass(frozen=True)
class BrowserFile:
    """The GGUF a page downloads for a model: the model's own file or one derived from it."""

    path: Path
    version: str
    size: int
    format: str
    reason: str

    def bits_per_weight(self, model: ModelFile) -> float:
        """The copy's own bits per weight (the same tensors as ``model``, another format)."""
        return round(self.size * 8 / model.parameters, 2) if model.parameters else 0.0

    def facts(self, model: ModelFile) -> dict[str, Any]:
        """The figures of the file a page really runs, as ModelFile.facts names them."""
        return {"quantization": self.format, "bits_per_weight": self.bits_per_weight(model),
                "file_size": self.size, "file_name": self.path.name}


def derived_path(model: ModelFile, fmt: str, folder: Path) -> Path:
    """Where the ``fmt`` copy of ``model`` is cached: keyed by the original's version, so a
    replaced original is derived again (and gets a new, immutable URL)."""
    return folder / model.id / model.version / f"{model.path.stem}.{fmt}.gguf"


def run_quantizer(source: Path, target: Path, ftype: int, *, allow_requantize: bool,
                  imatrix: Any = None, nthread: int | None = None) -> None:
    """llama.cpp's quantizer (llama_model_quantize): ``source`` to ``target`` as llama_ftype
    ``ftype``; ``imatrix`` a NULL-terminated ctypes array of llama_model_imatrix_data (quant.py
    reads one from a file). The one call to it: browser copies (derive) and `bchat models
    quantize` (quant.py) both come here. RuntimeError when llama.cpp refuses (its log says why)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.nthread = nthread or max(1, min(os.cpu_count() or 1, 4))
    if imatrix is not None:
        params.imatrix = imatrix
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def derive(model: ModelFile, fmt: str, folder: Path) -> Path:
    """Write the ``fmt`` copy of ``model`` (once; atomically, so concurrent starts are safe)."""
    target = derived_path(model, fmt, folder)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        # allow_requantize: the source is already quantised, that is the point
        run_quantizer(model.path, partial, _DERIVABLE[fmt], allow_requantize=True)
        try:
            # Not os.replace: when several processes start at once (gunicorn workers) the first
            # file stays, so every process computes the same version, hence the same URL.
            os.link(partial, target)
        except FileExistsError:
            pass
    finally:
        partial.unlink(missing_ok=True)
    # Older derivations of this model (an earlier version of the original) only take space.
    for old in (folder / model.id).iterdir():
        if old.is_dir() and old.name != model.version:
            for stale in old.glob("*.gguf"):
                stale.unlink(missing_ok=True)
            if not any(old.iterdir()):
                old.rmdir()
    log.info("derived %s for browsers from %s", target.name, model.path.name)
    return target


def browser_file(model: ModelFile, fmt: str | None, folder: Path | None, *,
                 create: bool = True) -> BrowserFile:
    """The file browsers get for ``model``: the ``fmt`` copy when it can be derived (and
    ``create`` allows deriving a missing one), else the original, with the reason either way."""
    def original(reason: str) -> BrowserFile:
        return BrowserFile(model.path, model.version, model.file_size, model.quantization, reason)

    if not fmt or fmt.lower() == "original" or folder is None:
        return original("the model file as configured (BCHAT_BROWSER_FORMAT=original)")
    fmt = fmt.upper()
    if fmt == model.quantization:
        return original(BROWSER_REASON.format(fmt=fmt, source="the original").split(";")[0]
                        + "; the model file already is")
    if fmt not in _DERIVABLE:
        return original(f"{fmt} is not a format bchat derives ({', '.join(_DERIVABLE)})")
    if model.quantization not in _DERIVABLE:
        # K-quants and others already have WASM kernels of their own; requantising them to a
        # legacy format would lose quality for an unmeasured gain.
        return original(f"{model.quantization} is served as is: only {', '.join(_DERIVABLE)} "
                        "files are re-quantised for browsers")
    if model.file_size < DERIVE_MIN_BYTES:
        return original(f"the file is under {DERIVE_MIN_BYTES >> 20} MiB: served as is")
    path = derived_path(model, fmt, folder)
    if not path.is_file():
        if not create:
            return original(f"the {fmt} copy is not prepared yet (bchat models prepare)")
        try:
            path = derive(model, fmt, folder)
        except Exception:
            log.exception("could not derive %s of %s; browsers get the original", fmt, model.id)
            return original(f"deriving {fmt} failed (see the server log): the original is served")
    stat = path.stat()
    return BrowserFile(path.resolve(), _file_version(path, stat), stat.st_size, fmt,
                       BROWSER_REASON.format(fmt=fmt, source=f"the {model.quantization} original"))
