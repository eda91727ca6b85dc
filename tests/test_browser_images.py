"""Images in the chat page, in a real chromium at both sizes and both schemes: the paperclip
refuses an image for a model that does not take images (the embedded tiny model) and says why,
takes chromium's own JPEG and WebP (drawn on a canvas here) for a vision upstream's model,
shows them as thumbnails before and after sending, and the model is sent them; an embedded
model with a projector beside it takes chromium's JPEG (decoded and run by llama.cpp), and
refuses a WebP before upload, saying which kinds it reads.

The vision upstream is tests/test_images.py's VisionUpstream, the one fake (no vision model can
run here): a real HTTP server on a socket that records what bchat sends it."""

from __future__ import annotations

import base64
import re

import pytest
from test_browser_attachments import AXE, SIZES, axe_violations
from test_images import VisionUpstream, seeing_folder, vision_app  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

# A picture drawn by chromium and encoded by its own JPEG or WebP encoder, dropped on `zone`.
DROP_DRAWN = """async ([zone, name, type, width, height]) => {
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  const g = canvas.getContext("2d");
  g.fillStyle = "#c03030"; g.fillRect(0, 0, width, height);
  g.fillStyle = "#f0d040"; g.beginPath(); g.arc(width / 2, height / 2, height / 3, 0, 7); g.fill();
  const blob = await new Promise((done) => canvas.toBlob(done, type, 0.9));
  const data = new DataTransfer();
  data.items.add(new File([blob], name, { type }));
  for (const kind of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(kind, { dataTransfer: data, bubbles: true, cancelable: true }));
  }
}"""


def open_chat(server, pages, size: str, scheme: str):
    """The chat page of a new visitor, connected, axe loaded: (page, its uploads, the
    paperclip, the drop zone, the composer's file chips)."""
    from playwright.sync_api import expect

    page = pages(SIZES[size], scheme)
    page.context.add_init_script(path=str(AXE))
    uploads = []
    page.on("request", lambda r: uploads.append(r) if r.url.endswith("/api/attachments") else None)
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    return (page, uploads, page.get_by_test_id("attach"),
            page.locator("main.chat").element_handle(),
            page.get_by_test_id("composer-files").get_by_test_id("file-chip"))


def refused_before_upload(page, zone, uploads, chips, drawn: list, message: str) -> None:
    """Drop a drawn picture (DROP_DRAWN's arguments): the page says ``message`` and sends
    nothing."""
    from playwright.sync_api import expect

    page.evaluate(DROP_DRAWN, [zone, *drawn])
    expect(page.get_by_test_id("error-text")).to_contain_text(message)
    assert uploads == [] and chips.count() == 0


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", list(SIZES))
def test_attach_images_for_a_vision_model_only(vision_app, pages, shots, size, scheme):  # noqa: F811
    from playwright.sync_api import expect

    _app, server = vision_app
    page, uploads, attach, zone, chips = open_chat(server, pages, size, scheme)
    expect(page.get_by_test_id("model-select")).to_have_value("tiny-chat")
    expect(attach).to_have_attribute("data-images", "no")
    expect(attach).to_have_attribute(
        "title", "Attach files: text, code, Markdown, CSV, JSON, HTML or PDF (or drop or paste "
        "them here). Images can't be used with tiny chat · F32: it does not take images (no "
        "vision). Attach text, code, Markdown, CSV, JSON, HTML or PDF files.")

    # the embedded model: refused before upload, saying why
    refused_before_upload(page, zone, uploads, chips, ["sunset.jpg", "image/jpeg", 320, 200],
                          "sunset.jpg: Images can't be used with tiny chat · F32: it does not "
                          "take images (no vision)")

    # the vision upstream's model takes them
    page.get_by_test_id("model-select").select_option("seer")
    expect(attach).to_have_attribute("data-images", "yes")
    expect(attach).to_have_attribute("title", "Attach files: PNG, JPEG, WebP or GIF images, text, "
                                     "code, Markdown, CSV, JSON, HTML or PDF (or drop or paste "
                                     "them here). seer takes images.")
    page.evaluate(DROP_DRAWN, [zone, "sunset.jpg", "image/jpeg", 320, 200])
    # one stored before the other: the model is sent them in the order the server took them
    expect(chips.nth(0)).to_have_attribute("data-state", "ready")
    page.evaluate(DROP_DRAWN, [zone, "badge.webp", "image/webp", 96, 96])
    expect(chips).to_have_count(2)
    expect(chips.nth(0)).to_have_attribute("data-state", "ready")
    expect(chips.nth(1)).to_have_attribute("data-state", "ready")
    expect(chips.nth(0)).to_contain_text("320×200")
    expect(chips.nth(1)).to_contain_text("96×96")
    # the thumbnails are the server's copies, read back (its owner's only)
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=composer-files] "
                           "img')].filter((i) => i.complete && i.naturalWidth > 0).length === 2")
    page.locator(".composer-form").screenshot(path=str(shots / f"images-composer-{size}-{scheme}.png"))
    assert axe_violations(page) == []

    page.get_by_test_id("composer").fill("What is in these pictures?")
    page.get_by_test_id("composer").press("Enter")
    user = page.locator('[data-testid="message"][data-role="user"]').last
    expect(user.get_by_test_id("file-chip")).to_have_count(2)
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)
    expect(reply.locator(".body")).to_have_text("A red square.")
    page.wait_for_function("() => [...document.querySelectorAll('[data-role=user] "
                           "[data-testid=file-thumb]')].filter((i) => i.complete && "
                           "i.naturalWidth > 0).length === 2")
    page.screenshot(path=str(shots / f"images-sent-{size}-{scheme}.png"))
    assert axe_violations(page) == []

    # what the model was sent: chromium's own encodings, as image_url parts
    parts = VisionUpstream.requests[-1]["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": "What is in these pictures?"}
    urls = [p["image_url"]["url"] for p in parts[1:]]
    assert [u.split(";")[0] for u in urls] == ["data:image/jpeg", "data:image/webp"]
    assert base64.b64decode(urls[0].split(",", 1)[1])[:3] == b"\xff\xd8\xff"

    # the upstream's other model does not take images: the paperclip says so again
    page.get_by_test_id("model-select").select_option("blind")
    expect(attach).to_have_attribute("data-images", "no")
    expect(attach).to_have_attribute("title", re.compile(
        r"Images can't be used with blind: it does not take images \(no vision\)"))


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", list(SIZES))
def test_an_embedded_model_with_a_projector_takes_a_photo(make_app, make_live_server,
                                                         seeing_folder, pages, shots,  # noqa: F811
                                                         size, scheme):
    from playwright.sync_api import expect

    server = make_live_server(make_app(MODEL_PATH=str(seeing_folder)))
    page, uploads, attach, zone, chips = open_chat(server, pages, size, scheme)
    expect(attach).to_have_attribute("data-images", "yes")
    expect(attach).to_have_attribute("title", "Attach files: PNG, JPEG or GIF images, text, code, "
                                     "Markdown, CSV, JSON, HTML or PDF (or drop or paste them "
                                     "here). tiny chat · F32 takes images.")

    # a WebP: its decoder inside llama.cpp has none, so it is refused before upload
    refused_before_upload(page, zone, uploads, chips, ["badge.webp", "image/webp", 96, 96],
                          "badge.webp: tiny chat · F32 takes PNG, JPEG or GIF images.")

    page.evaluate(DROP_DRAWN, [zone, "sunset.jpg", "image/jpeg", 320, 200])
    expect(chips).to_have_count(1)
    expect(chips.nth(0)).to_have_attribute("data-state", "ready")
    page.get_by_test_id("composer").fill("What is in this picture?")
    page.get_by_test_id("composer").press("Enter")
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)
    page.wait_for_function("() => [...document.querySelectorAll('[data-role=user] "
                           "[data-testid=file-thumb]')].filter((i) => i.complete && "
                           "i.naturalWidth > 0).length === 1")
    page.screenshot(path=str(shots / f"images-embedded-{size}-{scheme}.png"))
    assert axe_violations(page) == []
    # the model's prompt held the photo: its 16 embeddings (tiny_model.write_tiny_projector)
    # between the message's text and the end of its turn
    from llama_cpp import Llama

    conv = page.evaluate("async () => (await (await fetch('/api/conversations')).json())"
                         ".conversations[0].id")
    data = page.evaluate(f"async () => (await (await fetch('/api/conversations/{conv}'))"
                         ".json()).messages")
    vocab = Llama(model_path=str(seeing_folder / "tiny-chat.gguf"), vocab_only=True, verbose=False)
    text = sum(len(vocab.tokenize(piece, add_bos=False, special=True)) for piece in (
        b"<|im_start|>user\nWhat is in this picture?\n", b"<|im_end|>\n<|im_start|>assistant\n"))
    assert data[-1]["usage"]["prompt_tokens"] == text + 16
