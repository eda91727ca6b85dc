"""Images in the chat: upload (type by magic bytes, size from the header), refusal, storage,
serving to the owner only with safe headers, export v3 (base64), shares and "continue",
deletion with the conversation, on SQLite and PostgreSQL; and which models are sent them.

**The one fake here.** No vision model can run on this machine (none is installed, and none
may be downloaded), so the vision upstream is a small OpenAI-compatible HTTP server written in
this file (``VisionUpstream``: a real socket, a real streamed answer) that records each
request, so the test can assert the ``image_url`` parts bchat sends through the ``openai``
package. Everything else is real: the app on a real socket, the databases, the tiny llama.cpp
model (which does not take images, and is refused one), the browser engine's refusal."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select
from test_attachments import upload

from webapp.catalogue import discover, is_projector, projector_for
from webapp.images import MAX_IMAGES_SENT, TYPES, NotAnImage, estimate_tokens, sniff
from webapp.models import Attachment

pytestmark = pytest.mark.databases("sqlite", "postgresql")

GREEDY = {"temperature": 0, "max_tokens": 4}


def png(width: int, height: int, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real PNG (any decoder reads it): one colour, 8-bit RGB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    row = b"\0" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


# A real 1×1 GIF (GIF89a, one white pixel).
GIF = bytes.fromhex("47494638396101000100800000ffffff00000021f90401000000002c00000000010001"
                    "000002024401003b")


def test_sniff_reads_type_and_size_from_the_bytes():
    facts = sniff(png(640, 480))
    assert (facts.mime, facts.width, facts.height) == ("image/png", 640, 480)
    assert (sniff(GIF).mime, sniff(GIF).width, sniff(GIF).height) == ("image/gif", 1, 1)
    # headers as the encoders write them (the browser test sends chromium's own JPEG and WebP)
    jpeg = (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
            b"\xff\xdb\x00\x03\x00" + b"\xff\xc0\x00\x0b\x08\x01\x2c\x02\x58\x01\x01\x11\x00")
    assert (sniff(jpeg).mime, sniff(jpeg).width, sniff(jpeg).height) == ("image/jpeg", 600, 300)
    vp8x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0" + (799).to_bytes(3, "little") + \
        (99).to_bytes(3, "little")
    assert (sniff(vp8x).width, sniff(vp8x).height) == (800, 100)
    # not images: SVG (a document that can run script), text, BMP
    assert sniff(b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>') is None
    assert sniff(b"hello") is None and sniff(b"BM" + b"\0" * 60) is None
    # broken or absurd headers are refused, never decoded
    for bad in (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, b"\xff\xd8\xff\xe0\x00\x01", b"\xff\xd8\xff",
                b"RIFF\0\0\0\0WEBPVP8 ", png(1, 1)[:16] + struct.pack(">II", 100_000, 10),
                b"GIF89a\0\0\0\0"):
        with pytest.raises(NotAnImage):
            sniff(bad)
    assert estimate_tokens(1024, 1024) == 765 and estimate_tokens(64, 64) == 255


def test_upload_store_serve_refuse_and_quota(make_app, make_live_server):
    app = make_app(MAX_ATTACHMENT_BYTES=50_000, ATTACHMENT_QUOTA_BYTES=60_000)
    server = make_live_server(app)
    me = server.session()
    picture = png(300, 200)
    status, info = upload(me, "red.png", picture, "application/octet-stream")  # the bytes decide
    assert status == 201, info
    assert (info["mime"], info["width"], info["height"], info["size"]) == \
        ("image/png", 300, 200, len(picture))
    assert info["chars"] == 0 and info["tokens"] == estimate_tokens(300, 200)
    status, headers, body = me.request("GET", f"/api/attachments/{info['id']}/content")
    assert status == 200 and body == picture
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert headers["Content-Disposition"].startswith("inline") and "private" in headers["Cache-Control"]
    # a name that says otherwise changes nothing: served as what its bytes are
    status, gif = upload(me, "not-a-gif.html", GIF, "text/html")
    assert status == 201 and gif["mime"] == "image/gif"
    assert me.request("GET", f"/api/attachments/{gif['id']}/content")[1]["Content-Type"] == "image/gif"
    # an image has no text to read; a text file has no bytes to serve
    assert me.json("GET", f"/api/attachments/{info['id']}/text")[0] == 400
    status, text = upload(me, "a.txt", b"plain words")
    assert me.request("GET", f"/api/attachments/{text['id']}/content")[0] == 404
    # only its owner can fetch it
    assert server.session().request("GET", f"/api/attachments/{info['id']}/content")[0] == 404
    # SVG is never an image here; a broken PNG is refused; BMP is not sent to models
    status, body = upload(me, "x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")
    assert status == 415 and body["error"]["code"] == "unsupported_file"
    status, body = upload(me, "x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png")
    assert status == 400 and body["error"]["code"] == "bad_file"
    status, body = upload(me, "x.bmp", b"BM" + b"\0" * 60, "image/bmp")
    assert status == 415 and "PNG, JPEG, WebP or GIF" in body["error"]["message"]
    # the size limit and the visitor's quota count images like any file
    status, body = upload(me, "big.png", png(300, 200) + b"\0" * 50_000)
    assert status == 413 and body["error"]["code"] == "file_too_large"
    noisy = png(120, 120, (1, 2, 3))[:-12] + bytes(range(256)) * 175 + png(1, 1)[-12:]
    assert upload(me, "first.png", noisy)[0] == 201
    status, body = upload(me, "second.png", noisy)
    assert status == 413 and body["error"]["code"] == "storage_quota_exceeded", body


class VisionUpstream(BaseHTTPRequestHandler):
    """THE FAKE (see the module's docstring): an OpenAI-compatible server that records each
    chat request and streams a short answer. Its models: "seer" and "blind"."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        raw = json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                      for m in ("seer", "blind")]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        VisionUpstream.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for delta, finish in (({"content": "A red square."}, None), ({}, "stop")):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0,
                     "model": body["model"], "choices": [{"index": 0, "delta": delta,
                                                          "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def vision_upstream(tmp_path):
    """The vision upstream on a real socket, and the upstreams file naming it."""
    VisionUpstream.requests = []
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), VisionUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(f"""
[[upstream]]
name = "eyes"
base_url = "http://127.0.0.1:{upstream.server_port}/v1"
vision = ["seer"]
""")
    return upstream, upstreams


@pytest.fixture
def vision_app(make_app, make_live_server, tmp_path):
    upstream, upstreams = vision_upstream(tmp_path)
    app = make_app(UPSTREAMS_FILE=str(upstreams))
    yield app, make_live_server(app)
    upstream.shutdown()


def turn(ws, content: str, conversation_id: str | None = None, **extra) -> tuple[dict, dict]:
    ws.chat(content, conversation_id, options=GREEDY, **extra)
    first, _ = ws.until("started", "error")
    if first["type"] == "error":
        return first, first
    done, _ = ws.until("done", "error")
    return first, done


def test_images_go_to_a_vision_upstream_as_image_url_parts(vision_app):
    app, server = vision_app
    me = server.session()
    listed = {m["id"]: m["images"] for m in me.json("GET", "/api/models")[1]["models"]}
    assert listed["seer"] == {"accepted": True, "reason": None, "types": list(TYPES)}
    assert listed["blind"]["accepted"] is False and listed["tiny-chat"]["accepted"] is False
    assert listed["tiny-chat"]["reason"] == "it does not take images"
    picture = png(64, 32)
    status, info = upload(me, "red.png", picture)
    assert status == 201
    ws = me.ws()

    # a model that does not take images is refused the message, nothing stored: the embedded
    # tiny model and the upstream's other model alike
    for model in ("tiny-chat", "blind"):
        error, _ = turn(ws, "What is this?", model=model, attachments=[info["id"]])
        assert error["type"] == "error" and error["code"] == "images_not_supported", error
        assert "red.png" in error["message"] and model in error["message"]
    assert me.json("GET", "/api/conversations")[1]["conversations"] == []

    # compared side by side, every model must take images: the one that does not is named
    ws.send({"type": "compare", "conversation_id": None, "content": "What is this?",
             "targets": [{"model": "seer"}, {"model": "blind"}], "options": GREEDY,
             "attachments": [info["id"]]})
    error, _ = ws.until("error")
    assert error["code"] == "images_not_supported" and "blind does not" in error["message"]
    assert VisionUpstream.requests == []

    started, done = turn(ws, "What is this?", model="seer", attachments=[info["id"]])
    assert done["type"] == "done", done
    assert done["message"]["content"] == "A red square."
    (sent,) = VisionUpstream.requests
    user = sent["messages"][-1]
    assert user["role"] == "user" and isinstance(user["content"], list)
    text, image = user["content"]
    assert text == {"type": "text", "text": "What is this?"}
    assert image["type"] == "image_url"
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == picture

    # the next turn keeps the image in the history the model sees
    conv = started["conversation_id"]
    _, done = turn(ws, "And its size?", conv, model="seer")
    assert done["type"] == "done"
    history = VisionUpstream.requests[-1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[0]["content"][1]["image_url"]["url"] == url
    assert history[2]["content"] == "And its size?"
    # a model without vision, later in the same conversation: told of the image in a line
    _, done = turn(ws, "Describe it again.", conv, model="blind")
    assert done["type"] == "done", done
    older = VisionUpstream.requests[-1]["messages"][0]["content"]
    assert isinstance(older, str) and older.startswith('<image name="red.png" width="64"') \
        and "does not take images" in older and "base64" not in older
    # regenerating the image's reply with a model that does not take images is refused
    reply_id = done["message"]["id"]
    ws.send({"type": "regenerate", "message_id": reply_id, "model": "tiny-chat",
             "options": GREEDY})
    after, _ = ws.until("done", "error")
    assert after["type"] == "done"  # (its user message holds no image)
    data = me.json("GET", f"/api/conversations/{conv}")[1]
    first_reply = next(m for m in data["messages"] if m["role"] == "assistant")
    ws.send({"type": "regenerate", "message_id": first_reply["id"], "model": "tiny-chat",
             "options": GREEDY})
    refused, _ = ws.until("done", "error")
    assert refused["type"] == "error" and refused["code"] == "images_not_supported"
    ws.close()

    # the page's own engine takes no images: the server refuses its user message too
    status, again = upload(me, "again.png", picture)
    status, body = me.json("POST", f"/api/conversations/{conv}/messages",
                           {"role": "user", "content": "look", "attachments": [again["id"]]})
    assert status == 400 and body["error"]["code"] == "images_not_supported"
    assert "page's engine" in body["error"]["message"]


def test_only_the_newest_images_are_sent(vision_app):
    app, server = vision_app
    me = server.session()
    ws = me.ws()
    conv = None
    for i in range(MAX_IMAGES_SENT + 1):
        _, info = upload(me, f"p{i}.png", png(8 + i, 8))
        started, done = turn(ws, f"picture {i}", conv, model="seer", attachments=[info["id"]])
        assert done["type"] == "done", done
        conv = started["conversation_id"]
    ws.close()
    users = [m for m in VisionUpstream.requests[-1]["messages"] if m["role"] == "user"]
    parts = [p for m in users for p in m["content"]]
    assert sum(p["type"] == "image_url" for p in parts) == MAX_IMAGES_SENT
    assert 'name="p0.png"' in users[0]["content"][1]["text"] and "not shown again" in \
        users[0]["content"][1]["text"]


def test_export_share_continue_and_deletion_carry_the_bytes(vision_app):
    app, server = vision_app
    me = server.session()
    picture = png(40, 30, (10, 200, 10))
    _, info = upload(me, "green.png", picture)
    ws = me.ws()
    started, done = turn(ws, "Colour?", model="seer", attachments=[info["id"]])
    ws.close()
    assert done["type"] == "done"
    conv = started["conversation_id"]
    exported = json.loads(me.request("GET", f"/api/conversations/{conv}/export")[2])
    (file,) = next(m for m in exported["messages"] if m["role"] == "user")["attachments"]
    assert base64.b64decode(file["data"]) == picture and file["width"] == 40

    other = server.session()
    other.visit()
    status, copy = other.json("POST", "/api/conversations/import", exported)
    assert status == 201, copy
    (mine,) = next(m for m in copy["messages"] if m["role"] == "user")["attachments"]
    assert mine["id"] != info["id"] and (mine["width"], mine["height"]) == (40, 30)
    status, headers, body = other.request("GET", f"/api/attachments/{mine['id']}/content")
    assert status == 200 and body == picture and headers["Content-Type"] == "image/png"
    # an import's image is read from its bytes: a disguised SVG is refused, nothing stored
    bad = json.loads(json.dumps(exported))
    bad_file = next(m for m in bad["messages"] if m["role"] == "user")["attachments"][0]
    bad_file["data"] = base64.b64encode(b"<svg onload='alert(1)'/>").decode()
    status, body = other.json("POST", "/api/conversations/import", bad)
    assert status == 400 and body["error"]["code"] == "bad_import"

    # a share names the image (its bytes stay out of the page), and continuing copies it
    status, share = me.json("POST", f"/api/conversations/{conv}/share", {})
    path = share["url"].replace(server.url, "")
    visitor = server.session()
    page = visitor.request("GET", path)[2].decode()
    assert "green.png" in page and "image · 40×30" in page and "base64" not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    status, copy_id = visitor.continue_share(path, csrf)
    assert status == 303 and copy_id
    copied = visitor.json("GET", f"/api/conversations/{copy_id}")[1]
    (theirs,) = next(m for m in copied["messages"] if m["role"] == "user")["attachments"]
    assert visitor.request("GET", f"/api/attachments/{theirs['id']}/content")[2] == picture
    assert me.request("GET", f"/api/attachments/{theirs['id']}/content")[0] == 404

    # deleting the conversation deletes the image's row and bytes
    db = app.extensions["bchat"].db
    with db.read() as session:
        before = session.scalar(select(func.count()).select_from(Attachment))
    assert me.request("DELETE", f"/api/conversations/{conv}")[0] == 204
    assert me.request("GET", f"/api/attachments/{info['id']}/content")[0] == 404
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Attachment)) == before - 1
        assert session.scalar(select(func.count()).select_from(Attachment)
                              .where(Attachment.public_id == info["id"])) == 0


@pytest.mark.databases("sqlite")
def test_a_projector_beside_a_gguf_is_found_and_a_broken_one_refused(make_app, make_live_server,
                                                                    tiny_model, tmp_path):
    """llama.cpp's convention: an ``mmproj`` GGUF beside the model. The catalogue finds it
    (and never lists it as a model); a file by that name that is no projector says so."""
    folder = tmp_path / "models"
    folder.mkdir()
    model = folder / "tiny-chat-Q8_0.gguf"
    shutil.copy(tiny_model, model)
    assert projector_for(model) is None
    (folder / "mmproj-tiny-chat-f16.gguf").write_bytes(b"GGUF")  # a name, not a projector
    assert projector_for(model).name == "mmproj-tiny-chat-f16.gguf"
    assert is_projector(folder / "mmproj-tiny-chat-f16.gguf") and not is_projector(model)
    assert [m.projector for m in discover(folder)] == ["mmproj-tiny-chat-f16.gguf"]
    server = make_live_server(make_app(MODEL_PATH=str(folder)))
    me = server.session()
    (listed,) = me.json("GET", "/api/models")[1]["models"]
    assert listed["facts"]["projector"] == "mmproj-tiny-chat-f16.gguf"
    assert listed["images"]["accepted"] is False
    assert "projector cannot be run" in listed["images"]["reason"]
    _, info = upload(me, "red.png", png(4, 4))
    ws = me.ws()
    error, _ = turn(ws, "What is this?", attachments=[info["id"]])
    ws.close()
    assert error["code"] == "images_not_supported"


IMAGE_TOKENS = 16  # tiny_model.write_tiny_projector: (32 / 8)² embeddings an image


@pytest.fixture
def seeing_folder(tiny_model, tmp_path):
    """The tiny model with a tiny projector beside it."""
    from tiny_model import write_tiny_projector

    folder = tmp_path / "seeing"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "tiny-chat.gguf")
    write_tiny_projector(folder / "mmproj-tiny-chat.gguf")
    return folder


@pytest.mark.databases("sqlite")
def test_an_older_webp_is_named_to_an_embedded_model_not_sent(make_app, make_live_server,
                                                             seeing_folder, tmp_path):
    """A WebP shown to a vision upstream, then the conversation goes on with an embedded
    model with a projector (whose decoder reads no WebP): it is told of it in a line, and the
    conversation goes on; compared side by side, the two are sent only what both read."""
    upstream, upstreams = vision_upstream(tmp_path)
    server = make_live_server(make_app(UPSTREAMS_FILE=str(upstreams),
                                       MODEL_PATH=str(seeing_folder)))
    me = server.session()
    webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0" + (9).to_bytes(3, "little") + \
        (9).to_bytes(3, "little")
    _, info = upload(me, "old.webp", webp)
    ws = me.ws()
    started, done = turn(ws, "What is this?", model="seer", attachments=[info["id"]])
    assert done["type"] == "done", done
    _, later = turn(ws, "Go on.", started["conversation_id"], model="tiny-chat")
    assert later["type"] == "done", later  # not bad_image: the WebP was not sent to it
    # compared side by side, a WebP goes to neither when one of them cannot read it
    _, again = upload(me, "again.webp", webp)
    ws.send({"type": "compare", "conversation_id": None, "content": "What is this?",
             "targets": [{"model": "seer"}, {"model": "tiny-chat"}], "options": GREEDY,
             "attachments": [again["id"]]})
    error, _ = ws.until("error")
    ws.close()
    upstream.shutdown()
    assert error["code"] == "images_not_supported", error
    assert "tiny-chat takes PNG, JPEG or GIF images" in error["message"]


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("runner", ["inline", "process"])
def test_an_embedded_model_with_a_projector_is_shown_images(make_app, make_live_server,
                                                           tiny_model, tmp_path, runner,
                                                           monkeypatch):
    """Real parts end to end: the tiny model and a tiny random projector beside it, run by
    llama.cpp's libmtmd in the embedded engine, in the web process and in a model's own
    supervised process (the default). The reply's prompt holds the image's embeddings (its
    prompt_tokens grow by the projector's image tokens), and is stored."""
    from llama_cpp import Llama
    from tiny_model import write_tiny_projector

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "tiny-chat.gguf")
    write_tiny_projector(folder / "mmproj-tiny-chat.gguf")
    server = make_live_server(make_app(MODEL_PATH=str(folder), MODEL_RUNNER=runner))
    me = server.session()
    (listed,) = me.json("GET", "/api/models")[1]["models"]
    assert listed["facts"]["vision"] is True
    assert listed["images"] == {"accepted": True, "reason": None,
                                "types": ["image/png", "image/jpeg", "image/gif"]}

    ws = me.ws()
    _, alone = turn(ws, "What is this?")
    assert alone["type"] == "done", alone
    _, info = upload(me, "red.png", png(20, 12))
    started, done = turn(ws, "What is this?", attachments=[info["id"]])
    assert done["type"] == "done", done
    # the image's line ("\n" before its marker) and its embeddings
    newline = len(Llama(model_path=str(tiny_model), vocab_only=True, verbose=False)
                  .tokenize(b"\n", add_bos=False, special=True))
    with_image = done["message"]["usage"]["prompt_tokens"]
    assert with_image == alone["message"]["usage"]["prompt_tokens"] + newline + IMAGE_TOKENS
    assert done["message"]["content"]
    conv = started["conversation_id"]
    stored = me.json("GET", f"/api/conversations/{conv}")[1]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == done["message"]["content"]

    # the next turn sees the image again, from its slot's cache
    _, again = turn(ws, "And its colour?", conv)
    assert again["type"] == "done", again
    assert again["message"]["usage"]["prompt_tokens"] > with_image
    assert again["message"]["meta"]["prompt_cached"] >= with_image
    # a WebP is taken by the server but not by the decoder inside llama.cpp: refused when it
    # is sent, nothing stored
    assert listed["facts"]["image_types"] == ["image/png", "image/jpeg", "image/gif"]
    webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0" + (9).to_bytes(3, "little") + \
        (9).to_bytes(3, "little")
    status, other = upload(me, "x.webp", webp)
    assert status == 201
    error, _ = turn(ws, "And this?", conv, attachments=[other["id"]])
    assert error["type"] == "error" and error["code"] == "images_not_supported", error
    assert "x.webp is a WebP image" in error["message"] and "PNG, JPEG or GIF" in error["message"]
    assert len(me.json("GET", f"/api/conversations/{conv}")[1]["messages"]) == 4  # two turns
    if runner == "process":
        # a request the runner would not read (images in base64 over its line limit) is
        # refused before it is sent, never a runner that seems to have died
        import webapp.engines.runner

        monkeypatch.setattr(webapp.engines.runner, "MAX_REQUEST_BYTES", 400)
        _, error = turn(ws, "Once more?", conv)
        assert error["type"] == "error" and error["code"] == "images_too_large", error
    ws.close()
