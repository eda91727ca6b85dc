"""Images in the chat: what an uploaded image is, read from its bytes, never from its name.

The type comes from the magic bytes (PNG, JPEG, WebP, GIF, nothing else: SVG is a document
that can carry script, so it is never an image here), and the width and height from the
header, read by the few lines below rather than by a native decoder given hostile bytes
(Pillow is not installed, and the web process needs no pixels: the model's server decodes
them, or llama.cpp's libmtmd in an embedded model's own process: engines/vision.py).
A file whose header says nothing sensible is refused.

A model that takes images (engines' facts ``vision``: an upstream marked ``vision = true``,
an embedded GGUF with a projector) is sent them as OpenAI content parts, ``image_url`` with
a ``data:`` URL (``parts``).
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass

# The types a model is sent and a page is served, by their magic bytes.
TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
# What an embedded model is shown: the types stb_image inside llama.cpp's libmtmd decodes
# (no WebP), as a model's facts ``image_types`` say (engines/vision.py).
NATIVE_TYPES = ("image/png", "image/jpeg", "image/gif")


def kinds(types: tuple[str, ...]) -> str:
    """``types`` as people say them: "PNG, JPEG or GIF"."""
    names = [t.split("/")[1].upper().replace("WEBP", "WebP") for t in types]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
MAX_SIDE = 16384  # pixels: a header claiming more is a decompression bomb, or broken
# What a model is given of a branch's images: the newest this many (older ones become a line
# of text naming them), so a long conversation with photos stays a request of tens of MB, not
# hundreds, and inside the context of the vision models people run (each image costs
# hundreds to thousands of tokens).
MAX_IMAGES_SENT = 8


@dataclass(frozen=True)
class ImageFacts:
    mime: str
    width: int
    height: int


class NotAnImage(ValueError):
    """Bytes that start like an image but whose header cannot be read."""


def sniff(data: bytes) -> ImageFacts | None:
    """The image ``data`` is (type, width, height), None when it is not one of TYPES;
    NotAnImage when it starts like one but its header is broken or absurd."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        facts = _png(data)
    elif data.startswith(b"\xff\xd8\xff"):
        facts = _jpeg(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        facts = _webp(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        facts = _gif(data)
    else:
        return None
    if not (1 <= facts.width <= MAX_SIDE and 1 <= facts.height <= MAX_SIDE):
        raise NotAnImage(f"a {facts.mime} of {facts.width}×{facts.height} pixels: at most "
                         f"{MAX_SIDE} a side")
    return facts


def _png(data: bytes) -> ImageFacts:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise NotAnImage("a PNG without its IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return ImageFacts("image/png", width, height)


def _gif(data: bytes) -> ImageFacts:
    if len(data) < 10:
        raise NotAnImage("a GIF cut short")
    width, height = struct.unpack("<HH", data[6:10])
    return ImageFacts("image/gif", width, height)


def _webp(data: bytes) -> ImageFacts:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return ImageFacts("image/webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return ImageFacts("image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(data) >= 30:
        return ImageFacts("image/webp", int.from_bytes(data[24:27], "little") + 1,
                          int.from_bytes(data[27:30], "little") + 1)
    raise NotAnImage("a WebP whose header cannot be read")


# JPEG's start-of-frame markers (SOF0–SOF15 but DHT, JPG and DAC), which hold the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> ImageFacts:
    """Walk the segments (each a length) to the frame header: at most len(data) / 4 steps."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            break
        marker = data[at + 1]
        if marker == 0xFF:  # fill bytes before a marker
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if length < 2:
            break
        if marker in _SOF:
            if at + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return ImageFacts("image/jpeg", width, height)
        if marker == 0xDA:  # the scan began before any frame header
            break
        at += 2 + length
    raise NotAnImage("a JPEG without a frame header")


def estimate_tokens(width: int, height: int) -> int:
    """What an image costs a model's context, roughly: OpenAI's published rule for a detailed
    image (fit in 2048², the short side to 768, then 170 tokens a 512² tile plus 85). Local
    vision models differ (LLaVA 576, Qwen2-VL a token per 28² pixels), so it is a guide for the
    context meter, not a count."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def part(mime: str, data: bytes) -> dict:
    """One image as an OpenAI chat content part."""
    return {"type": "image_url", "image_url": {"url": data_url(mime, data)}}
