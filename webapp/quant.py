"""Pick your quant: make variants of a model with llama.cpp's quantizer, group them into
families, and measure what each variant costs in quality and gains in speed.

A **family** is a model and the variants made from it: files whose names differ only in their
quantisation tag (``SmolLM2-F16.gguf``, ``SmolLM2-Q4_K_M.gguf``: as the hub names them), or
that `bchat models quantize` recorded as made from one.

Where the facts live: next to the files, as JSON sidecars, not in a database table. The
catalogue is made from the models folder alone (read at start, by the app, the worker, a model
runner and the CLI without a database), a variant is a file an admin copies, pulls or removes
like any other, and its record should go where it goes: ``NAME.gguf.quant.json`` says what it
was made from and how (written once, atomically, by the quantize command), and
``FAMILY.quality.json`` holds the last `bchat models eval` of the family (replaced whole by
the next one; each figure names the file version it was measured on, so a replaced file's
figures are shown as stale, never as its own).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .catalogue import FILE_TYPES, ModelFile, base_stem, read_model_file, run_quantizer

log = logging.getLogger(__name__)

# name -> llama_ftype: every type llama.cpp's quantizer writes (as llama-quantize names them).
QUANT_TYPES = {name: ftype for ftype, name in FILE_TYPES.items()}
# llama-quantize refuses these without an importance matrix: too few bits to round blindly.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})
# The other i-quants run without one but are designed around it.
BETTER_WITH_IMATRIX = frozenset(n for n in QUANT_TYPES if n.startswith("IQ")) - NEEDS_IMATRIX
# Unquantised formats: a source in one of these loses nothing more by being quantised.
FULL_PRECISION = frozenset({"F32", "F16", "BF16"})
# Roughly what each type stores per weight (K-quant mixes included), only to draw the progress
# bar of a quantisation that reports none: the file grows tensor by tensor toward this.
NOMINAL_BPW = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_0": 5.5, "Q5_1": 6,
    "Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q4_0": 4.5, "Q4_1": 5, "Q4_K_M": 4.85, "Q4_K_S": 4.58,
    "IQ4_NL": 4.5, "IQ4_XS": 4.25, "MXFP4": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5,
    "IQ3_M": 3.66, "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "Q2_K": 3.35, "Q2_K_S": 2.97,
    "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,
    "TQ2_0": 2.06, "TQ1_0": 1.69,
}

QUANT_SUFFIX = ".quant.json"
QUALITY_SUFFIX = ".quality.json"
DATA = Path(__file__).parent / "data"
# The shipped evaluation text: chapter I of Alice's Adventures in Wonderland (Lewis Carroll),
# Project Gutenberg eBook #11, public domain in the USA (webapp/data/README.md).
EVAL_TEXT = DATA / "alice-chapter-1.txt"
EVAL_TEXT_SOURCE = ("Lewis Carroll, Alice's Adventures in Wonderland, chapter I "
                    "(Project Gutenberg eBook #11, https://www.gutenberg.org/ebooks/11; public domain)")
EVAL_CTX = 512  # tokens per chunk, llama-perplexity's default; the second half of each is scored
DECODE_TOKENS = 32  # greedy steps timed for decode tok/s


class QuantError(Exception):
    """A quantize or eval that cannot go on; the message says why and what to do."""


# -- families -------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def variant_record(model: ModelFile) -> dict[str, Any] | None:
    """What `bchat models quantize` recorded of a variant it made (None: not made here)."""
    return _read_json(model.path.with_name(model.path.name + QUANT_SUFFIX))


def family_of(model: ModelFile) -> str:
    record = variant_record(model)
    family = record.get("family") if record else None
    return family if isinstance(family, str) and family else base_stem(model.path.stem)


def families(models: Iterable[ModelFile]) -> dict[str, list[ModelFile]]:
    """Family name -> its members, highest precision first (the first is the reference)."""
    grouped: dict[str, list[ModelFile]] = {}
    for model in models:
        grouped.setdefault(family_of(model), []).append(model)
    for members in grouped.values():
        members.sort(key=lambda m: (-m.weights_bits_per_weight, m.id))
    return grouped


# -- quantize -------------------------------------------------------------------------------

def _imatrix_entries(path: Path) -> list[tuple[str, Any]]:
    """(tensor name, mean squared activations) from an importance matrix file: llama-imatrix's
    GGUF (``NAME.in_sum2`` and ``NAME.counts`` per tensor) or its older .dat format, averaged
    the way llama-quantize does."""
    import numpy as np

    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
        entries = []
        for name, sums in tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name.removesuffix(".in_sum2")
            counts = tensors.get(base + ".counts")
            if counts is None:
                raise QuantError(f"{path}: {base} has sums but no counts")
            sums_arr = np.asarray(sums.data, dtype=np.float32).reshape(-1, int(sums.shape[0]))
            count_arr = np.asarray(counts.data, dtype=np.float32).reshape(-1)
            values = np.ones_like(sums_arr)  # an expert never reached in calibration: no weighting
            seen = count_arr > 0
            values[seen] = sums_arr[seen] / count_arr[seen, None]
            entries.append((base, values.reshape(-1)))
        return entries
    # legacy .dat: int32 count, then per entry: int32 name length, name, int32 ncall, int32 n, floats
    data = path.read_bytes()
    entries, offset = [], 0

    def int32() -> int:
        nonlocal offset
        value = int.from_bytes(data[offset:offset + 4], "little", signed=True)
        offset += 4
        return value

    try:
        for _ in range(int32()):
            length = int32()
            name = data[offset:offset + length].decode()
            offset += length
            ncall, nval = int32(), int32()
            values = np.frombuffer(data, dtype=np.float32, count=nval, offset=offset).copy()
            offset += 4 * nval
            entries.append((name, values / ncall if ncall > 0 else values))
    except (ValueError, UnicodeDecodeError):
        raise QuantError(f"{path}: not an importance matrix (llama-imatrix's .gguf or .dat)") from None
    return entries


class _Imatrix:
    """The entries as llama_model_imatrix_data, NULL-terminated, kept alive while in use."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self.entries = _imatrix_entries(path)
        if not self.entries:
            raise QuantError(f"{path}: the importance matrix has no entries")
        array = (llama_cpp.llama_model_imatrix_data * (len(self.entries) + 1))()
        self._names = [name.encode() for name, _ in self.entries]
        for i, ((_, values), name) in enumerate(zip(self.entries, self._names, strict=True)):
            array[i].name = name
            array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = values.size
        self.array = array
        self.pointer = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def check_type(qtype: str) -> str:
    name = qtype.upper()
    if name not in QUANT_TYPES:
        raise QuantError(f"unknown type {qtype!r}: llama.cpp's quantizer takes {', '.join(QUANT_TYPES)}")
    return name


def variant_path(source: ModelFile, qtype: str, folder: Path) -> Path:
    return folder / f"{family_of(source)}-{qtype}.gguf"


@dataclass(frozen=True)
class Variant:
    model: ModelFile
    record: dict[str, Any]


def quantize(source: ModelFile, qtype: str, folder: Path, *, allow_requantize: bool = False,
             imatrix: Path | None = None, nthread: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Variant:
    """Write ``source`` as ``qtype`` into ``folder`` (FAMILY-TYPE.gguf; a temporary name until
    complete, then one rename) and record it as a member of the source's family.

    ``progress(bytes_written, bytes_expected)`` is called while it runs (the expected size is
    an estimate from the type's nominal bits per weight)."""
    qtype = check_type(qtype)
    if qtype in NEEDS_IMATRIX and imatrix is None:
        raise QuantError(f"{qtype} needs an importance matrix: llama.cpp will not round weights to "
                         "so few bits blindly. Make one with llama.cpp's llama-imatrix on some "
                         "text and pass it with --imatrix FILE")
    if qtype == source.quantization:
        raise QuantError(f"{source.path.name} already is {qtype}")
    if source.quantization not in FULL_PRECISION and not allow_requantize:
        raise QuantError(
            f"{source.path.name} is already quantized ({source.quantization}): quantizing it again "
            "adds a second rounding on top of the first and loses more quality than quantizing the "
            "F16/BF16/F32 original would. Use the original if you can; to go ahead anyway, pass "
            "--allow-requantize")
    target = variant_path(source, qtype, folder)
    if target.exists():
        raise QuantError(f"{target} already exists: remove it first (bchat models remove {target.name})")
    matrix = _Imatrix(imatrix) if imatrix is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    header = max(0, source.file_size - (source.tensor_bytes or source.file_size))
    expected = header + int(source.parameters * NOMINAL_BPW.get(qtype, 8) / 8)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            run_quantizer(source.path, partial, QUANT_TYPES[qtype], allow_requantize=allow_requantize,
                          imatrix=matrix.pointer if matrix else None, nthread=nthread)
        except BaseException as exc:  # reported by the caller's thread
            failure.append(exc)

    # llama.cpp says nothing while it works (its log is off unless an error): the file it grows
    # tensor by tensor is the progress.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    thread = threading.Thread(target=work, name=f"quantize-{qtype}", daemon=True)
    try:
        if progress is not None:
            progress(0, expected)
        thread.start()
        while thread.is_alive():
            thread.join(0.25)
            if progress is not None:
                written = partial.stat().st_size if partial.exists() else 0
                progress(min(written, expected), expected)
        if failure:
            reason = "needs an importance matrix (--imatrix)" if qtype in BETTER_WITH_IMATRIX else \
                "see llama.cpp's message above"
            raise QuantError(f"llama.cpp's quantizer could not make {qtype} of {source.path.name}: {reason}")
        os.replace(partial, target)
    finally:
        if thread.is_alive():  # interrupted: let llama.cpp finish writing before removing its file
            thread.join()
        partial.unlink(missing_ok=True)
    if progress is not None:
        progress(expected, expected)
    model = read_model_file(target)
    record = {
        "family": family_of(source),
        "source": source.path.name,
        "source_quantization": source.quantization,
        "source_version": source.version,
        "quantization": model.quantization,
        "requested": qtype,
        "bits_per_weight": model.weights_bits_per_weight,
        "file_size": model.file_size,
        "parameters": model.parameters,
        "imatrix": imatrix.name if imatrix else None,
        "requantized": source.quantization not in FULL_PRECISION,
        "version": model.version,
        "created_at": _now(),
    }
    write_json_atomically(target.with_name(target.name + QUANT_SUFFIX), record)
    return Variant(model, record)


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


# -- evaluate -------------------------------------------------------------------------------

def _log_softmax(logits: Any) -> Any:
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _load(model: ModelFile, n_ctx: int, n_threads: int | None):
    from llama_cpp import Llama

    return Llama(model_path=str(model.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                 logits_all=True, n_threads=n_threads, n_gpu_layers=0, verbose=False)


def chunks_of(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """The text cut into whole chunks of ``n_ctx`` tokens, as llama-perplexity does (the last
    partial chunk dropped; with a BOS model, each chunk starts with BOS in place of its first)."""
    out = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = list(tokens[start:start + n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def _eval_chunk(llm, chunk: list[int]) -> float:
    """Evaluate one chunk from an empty cache (every position's logits kept); its seconds."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(chunk)
    return time.perf_counter() - started


# Scored positions turned into log-probabilities at a time: with a 150k-token vocabulary a whole
# half-chunk in float64 is ~150 MB per temporary; a block of 32 rows keeps each under 40 MB.
BLOCK_ROWS = 32


def _scored_blocks(llm, n_ctx: int):
    """(row offset, log-probabilities) of the next token at the scored positions (the second
    half of the chunk just evaluated), a block of rows at a time."""
    first, last = n_ctx // 2, n_ctx - 1
    for start in range(first, last, BLOCK_ROWS):
        yield start - first, _log_softmax(llm.scores[start:min(start + BLOCK_ROWS, last)])


def _decode_speed(llm, prompt: list[int], steps: int = DECODE_TOKENS) -> float | None:
    """Greedy tokens per second after a short prompt, one token per step as in a chat."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    started = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    took = time.perf_counter() - started
    return round(steps / took, 1) if took > 0 else None


def evaluate(reference: ModelFile, variants: list[ModelFile], text: str, *, n_ctx: int = EVAL_CTX,
             n_threads: int | None = None, speed: bool = True,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity of each model on ``text``, and each variant's mean KL divergence from the
    reference's next-token distributions and top-1 agreement with it, scored as
    llama-perplexity --kl-divergence does (same chunks, second half of each).

    Memory stays bounded by one model at a time: the reference's log-probabilities of the
    scored positions go to a temporary file (as llama-perplexity's --kl-divergence-base does),
    then each variant is loaded in turn and compared chunk by chunk."""
    import numpy as np

    llm = _load(reference, n_ctx, n_threads)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    add_bos = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    chunks = chunks_of(tokens, n_ctx, llm.token_bos() if add_bos else None)
    if not chunks:
        raise QuantError(f"the text is {len(tokens)} tokens: at least {n_ctx} are needed (one chunk)")
    first = n_ctx // 2
    per_chunk = n_ctx - 1 - first
    n_vocab = llm.n_vocab()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bchat-eval-") as folder:
        base = np.lib.format.open_memmap(Path(folder) / "reference.npy", mode="w+", dtype=np.float32,
                                         shape=(len(chunks) * per_chunk, n_vocab))
        targets = np.array([c[first + 1:] for c in chunks], dtype=np.int64).reshape(-1)
        nll, seconds = 0.0, 0.0
        for i, chunk in enumerate(chunks):
            seconds += _eval_chunk(llm, chunk)
            for offset, logprobs in _scored_blocks(llm, n_ctx):
                rows = slice(i * per_chunk + offset, i * per_chunk + offset + len(logprobs))
                base[rows] = logprobs
                nll -= float(logprobs[np.arange(len(logprobs)), targets[rows]].sum())
            if progress:
                progress(reference.id, i + 1, len(chunks))
        ppl_ref = math.exp(nll / len(targets))
        results.append(_row(reference, ppl_ref, ppl_ref, 0.0, 1.0, len(chunks) * n_ctx / seconds,
                            _decode_speed(llm, tokens[:64]) if speed else None))
        del llm
        for variant in variants:
            llm = _load(variant, n_ctx, n_threads)
            if llm.tokenize(text.encode(), add_bos=False, special=False) != tokens:
                raise QuantError(f"{variant.id} tokenizes the text differently from {reference.id}: "
                                 "not a variant of the same model")
            nll, kld, agree, seconds = 0.0, 0.0, 0, 0.0
            for i, chunk in enumerate(chunks):
                seconds += _eval_chunk(llm, chunk)
                for offset, logprobs in _scored_blocks(llm, n_ctx):
                    rows = slice(i * per_chunk + offset, i * per_chunk + offset + len(logprobs))
                    ref = np.asarray(base[rows], dtype=np.float64)
                    nll -= float(logprobs[np.arange(len(logprobs)), targets[rows]].sum())
                    kld += float((np.exp(ref) * (ref - logprobs)).sum())
                    agree += int((ref.argmax(axis=-1) == logprobs.argmax(axis=-1)).sum())
                if progress:
                    progress(variant.id, i + 1, len(chunks))
            ppl = math.exp(nll / len(targets))
            results.append(_row(variant, ppl, ppl_ref, kld / len(targets), agree / len(targets),
                                len(chunks) * n_ctx / seconds,
                                _decode_speed(llm, tokens[:64]) if speed else None))
            del llm
        del base
    return {"reference": reference.id, "n_ctx": n_ctx, "chunks": len(chunks), "text_tokens": len(tokens),
            "scored_tokens": int(len(chunks) * per_chunk), "variants": results}


def _row(model: ModelFile, ppl: float, ppl_ref: float, kld: float, top1: float, prompt_tps: float,
         decode_tps: float | None) -> dict[str, Any]:
    return {"model": model.id, "file": model.path.name, "version": model.version,
            "quantization": model.quantization, "bits_per_weight": model.weights_bits_per_weight,
            "file_size": model.file_size, "ppl": round(ppl, 4), "delta_ppl": round(ppl - ppl_ref, 4),
            "delta_ppl_pct": round(100 * (ppl / ppl_ref - 1), 3), "kld": round(kld, 6),
            "top1": round(top1, 4), "prompt_tps": round(prompt_tps, 1), "decode_tps": decode_tps}


def evaluate_family(models: Iterable[ModelFile], family: str, *, text_path: Path = EVAL_TEXT,
                    n_ctx: int = EVAL_CTX, n_threads: int | None = None, folder: Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate every member of ``family`` against its highest-precision member and store the
    result as FAMILY.quality.json in ``folder``, the models folder they were found in (default:
    the reference's own folder; a model's path is its resolved file, which a symlinked models
    folder shares with others)."""
    import hashlib

    grouped = families(models)
    if family not in grouped:
        known = ", ".join(sorted(grouped)) or "none"
        raise QuantError(f"no model family {family!r} (families: {known})")
    members = grouped[family]
    if len(members) < 2:
        raise QuantError(f"{family} has one member ({members[0].path.name}): make a variant first "
                         f"(bchat models quantize {members[0].id} Q8_0 Q4_K_M)")
    text = text_path.read_text()
    result = evaluate(members[0], members[1:], text, n_ctx=n_ctx, n_threads=n_threads, progress=progress)
    result.update({
        "family": family,
        "text": {"name": text_path.name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                 "source": EVAL_TEXT_SOURCE if text_path == EVAL_TEXT else str(text_path)},
        "device": {"cores": os.cpu_count() or 1, "threads": n_threads},
        "created_at": _now(),
    })
    write_json_atomically((folder or members[0].path.parent) / (family + QUALITY_SUFFIX), result)
    return result


def quality_report(models: Iterable[ModelFile], folder: Path | None = None) -> list[dict[str, Any]]:
    """Every family with its members' facts and their last evaluation (``stale`` where a file
    changed since it was measured; members added since have none): from ``folder`` (the models
    folder) first, else from beside a member's file."""
    report = []
    for family, members in sorted(families(models).items()):
        stored = None
        for place in [folder] * (folder is not None) + [m.path.parent for m in members]:
            stored = _read_json(place / (family + QUALITY_SUFFIX))
            if stored:
                break
        measured = {row.get("model"): row for row in (stored or {}).get("variants", [])
                    if isinstance(row, dict)}
        reference = (stored or {}).get("reference")
        rows = []
        for member in members:
            row = measured.get(member.id)
            quality = None
            if row is not None:
                quality = {k: row.get(k) for k in ("ppl", "delta_ppl", "delta_ppl_pct", "kld", "top1",
                                                   "prompt_tps", "decode_tps")}
                quality["stale"] = row.get("version") != member.version
            record = variant_record(member)
            rows.append({"model": member.id, "file": member.path.name, "quantization": member.quantization,
                         "bits_per_weight": member.weights_bits_per_weight, "file_size": member.file_size,
                         "made_from": record.get("source") if record else None,
                         "imatrix": record.get("imatrix") if record else None,
                         "reference": member.id == reference, "quality": quality})
        head = members[0]
        report.append({
            "family": family,
            "parameters": head.parameters,
            "active_parameters": head.active_parameters,
            "experts": head.experts,
            "experts_used": head.experts_used,
            "architecture": head.architecture,
            "members": rows,
            "evaluation": None if stored is None else {
                k: stored.get(k) for k in ("reference", "n_ctx", "chunks", "text_tokens", "scored_tokens",
                                           "text", "device", "created_at")},
        })
    return report
