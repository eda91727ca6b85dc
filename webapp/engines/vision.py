"""Images for the embedded engine: a model's projector (llama.cpp's ``mmproj`` GGUF beside it,
catalogue.projector_for) run through llama.cpp's libmtmd, as llama-server runs it.

A message's images arrive as OpenAI content parts (attachments.with_files: ``image_url`` with a
``data:`` URL). ``split_images`` turns each message back into text with a marker of this
request's own where each image was (a marker a person's text cannot guess), and keeps the
bytes. ``Projector.picture`` decodes one image and tokenizes it the way the model's projector
wants it (``Picture``: the text tokens some projectors wrap an image in, and the image chunk,
whose embeddings take ``n_tokens`` places of the context). The prompt builder puts a picture's
tokens where its marker is, an image chunk's places as its placeholder id (negative, never a
vocabulary token, made from the image's bytes), so fitting the history to the context counts
an image as what it costs, and a slot's cache knows an image it already holds: the next turn
of a conversation reuses it (and everything after it) instead of evaluating it again.

The bytes are hostile input and reach a native decoder (stb_image inside libmtmd), so only
what images.sniff took of images.NATIVE_TYPES (stb_image reads no WebP: the model's facts say
so, and attachments.with_files refuses or names a WebP before it gets here) of at most
MAX_PIXELS by its header gets there. That bounds the memory a decode takes, not the
decoder's own bugs: those are contained by the model's own process (model_runner.py), which
a crash restarts.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import images
from .base import EngineError

# The most pixels an image may have to be decoded here: 8,192² is 200 MB of RGB; vision
# projectors shrink every image to a few hundred thousand pixels anyway.
MAX_PIXELS = 40_000_000
_DATA_URL = re.compile(r"data:(image/[a-z]+);base64,(.*)", re.DOTALL)


def placeholder(data: bytes, ordinal: int) -> int:
    """The id the places of an image chunk hold in a prompt: from the image's bytes and which
    of its chunks it is, so the same image is the same id in every request (a slot's cache
    holds what those places were) and two images differ but once in 2³¹."""
    digest = hashlib.blake2b(data, digest_size=8, person=ordinal.to_bytes(4, "little"))
    return -1 - (int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF)


class Picture:
    """One image as the model's projector tokenizes it: ``pieces`` in order, each a list of text
    tokens or an image chunk (mtmd's, owned here and freed with this object)."""

    def __init__(self, pieces: list[Any], chunks: list[int], data: bytes) -> None:
        self.pieces = pieces
        self._chunks = chunks  # the image chunks' pointers, to free
        self._data = data

    def tokens(self, chunks: dict[int, ImageChunk]) -> list[int]:
        """Its tokens in a prompt: each image chunk's places hold its placeholder, which
        ``chunks`` (the request's image chunks) is given."""
        out: list[int] = []
        ordinal = 0
        for piece in self.pieces:
            if isinstance(piece, list):
                out += piece
            else:
                token = placeholder(self._data, ordinal)
                ordinal += 1
                out += [token] * piece.n_tokens
                chunks[token] = piece
        return out

    def close(self) -> None:
        from llama_cpp import mtmd_cpp

        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            mtmd_cpp.mtmd_input_chunk_free(chunk)

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class ImageChunk:
    """An image chunk of a Picture: where mtmd keeps it, the context places it takes
    (``n_tokens``) and the positions it advances (``n_pos``: fewer under M-RoPE)."""

    pointer: int
    n_tokens: int
    n_pos: int


@dataclass
class Images:
    """A request's images: the marker put in its text for each, and their bytes."""

    markers: list[str] = field(default_factory=list)
    data: list[tuple[str, bytes]] = field(default_factory=list)  # (type, bytes)


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Images]:
    """``messages`` with each content given as parts turned into text (an image part into a
    marker of this request's own), and the images in the order they come."""
    found = Images()
    nonce = secrets.token_hex(6)
    out = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        text = []
        for part in content:
            if part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url") or ""
                match = _DATA_URL.fullmatch(url)
                if not match:
                    raise EngineError("an image for the embedded engine must be a data: URL",
                                      code="bad_image")
                marker = f"<__bchat_image_{nonce}_{len(found.markers)}__>"
                found.markers.append(marker)
                found.data.append((match.group(1), base64.b64decode(match.group(2))))
                text.append(marker)
            else:
                text.append(str(part.get("text") or ""))
        # The text first, then its images each on a line, as attachments.with_files sends them.
        out.append({**message, "content": "\n".join(text)})
    return out, found


def prompt_media(markers: list[str], pictures: list[Picture]
                 ) -> tuple[dict[str, list[int]], dict[int, ImageChunk]]:
    """Marker → its picture's tokens (for PromptBuilder.tokens), and the image chunks by the
    placeholder their places hold."""
    chunks: dict[int, ImageChunk] = {}
    return {m: p.tokens(chunks) for m, p in zip(markers, pictures, strict=True)}, chunks


def image_start(prompt: list[int], keep: int) -> int:
    """``keep`` moved back to the start of the image it falls inside (a cache holds an image
    whole or not at all); ``keep`` itself when it is not inside one."""
    if 0 < keep < len(prompt) and prompt[keep] < 0:
        while keep > 0 and prompt[keep - 1] == prompt[keep]:
            keep -= 1
    return keep


def check_image(data: bytes) -> images.ImageFacts:
    """What the native decoder may be given: a type it reads, of at most MAX_PIXELS (read
    from the header, in Python); EngineError ``bad_image`` otherwise."""
    try:
        facts = images.sniff(data)
    except images.NotAnImage as exc:
        raise EngineError(f"this image could not be read: {exc}", code="bad_image") from None
    if facts is None or facts.mime not in images.NATIVE_TYPES:
        kind = facts.mime if facts else "this file"
        raise EngineError(f"{kind} can't be shown to an embedded model: it takes "
                          f"{images.kinds(images.NATIVE_TYPES)} images", code="bad_image")
    if facts.width * facts.height > MAX_PIXELS:
        raise EngineError(f"this image is {facts.width}×{facts.height} pixels; an embedded "
                          f"model is shown images of at most {MAX_PIXELS // 1_000_000} "
                          "megapixels", code="bad_image")
    return facts


class Projector:
    """A model's projector, loaded beside its llama.cpp model (one per model worker).

    ``picture`` may be called from request threads (it reads the projector, as llama-server
    tokenizes in its HTTP threads); ``evaluate`` only from the thread that owns the context."""

    def __init__(self, path: Path, model, *, n_threads: int, use_gpu: bool) -> None:
        from llama_cpp import _logger, mtmd_cpp

        # Through llama-cpp-python's log callback: quiet unless it is verbose.
        mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, None)
        mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, None)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not load the image projector {path.name}")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise EngineError(f"{path.name} is not an image projector (no vision encoder)")
        self.mrope = bool(mtmd_cpp.mtmd_decode_use_mrope(self._ctx))

    def picture(self, data: bytes) -> Picture:
        from llama_cpp import mtmd_cpp

        check_image(data)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(self._ctx, buffer, len(data), False)
        if not bitmap:
            raise EngineError("this image could not be decoded", code="bad_image")
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(text=marker, text_len=len(marker), add_special=False,
                                            parse_special=True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd_cpp.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise EngineError("the projector could not take this image", code="bad_image")
            pieces: list[Any] = []
            owned: list[int] = []
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    pieces.append([tokens[j] for j in range(n.value)])
                else:
                    own = mtmd_cpp.mtmd_input_chunk_copy(chunk)
                    owned.append(own)
                    pieces.append(ImageChunk(own, mtmd_cpp.mtmd_input_chunk_get_n_tokens(own),
                                             mtmd_cpp.mtmd_input_chunk_get_n_pos(own)))
            return Picture(pieces, owned, data)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def evaluate(self, lctx, chunk: ImageChunk, n_past: int, seq_id: int, n_batch: int) -> int:
        """Encode the image and decode its embeddings into ``seq_id`` from position ``n_past``
        (no logits: a prompt always ends in text); the position after it."""
        from llama_cpp import llama_cpp, mtmd_cpp

        new_past = llama_cpp.llama_pos(0)
        result = mtmd_cpp.mtmd_helper_eval_chunk_single(
            self._ctx, lctx, chunk.pointer, n_past, seq_id, n_batch, False, ctypes.byref(new_past))
        if result != 0:
            raise EngineError(f"llama.cpp could not evaluate an image (code {result})")
        return int(new_past.value)

    def close(self) -> None:
        from llama_cpp import mtmd_cpp

        ctx, self._ctx = self._ctx, None
        if ctx:
            mtmd_cpp.mtmd_free(ctx)
