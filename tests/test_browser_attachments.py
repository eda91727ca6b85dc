"""Files in the chat page, in a real chromium at both sizes and both schemes: the paperclip,
drag and drop and paste; chips with their tokens and a ×; files over the limit and images
refused before upload; the context meter counting them; the sent message showing its files;
ⓘ listing what the reply was given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pdfs import make_pdf

pytestmark = pytest.mark.browser

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
SIZES = {"wide": {"width": 1366, "height": 850}, "phone": {"width": 390, "height": 844}}

DROP = """([zone, name, text]) => {
  const data = new DataTransfer();
  data.items.add(new File([text], name, { type: "text/markdown" }));
  for (const type of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
  }
}"""
PASTE = """([box, name, text]) => {
  const data = new DataTransfer();
  data.items.add(new File([text], name, { type: "text/plain" }));
  box.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
}"""


@pytest.fixture
def server(make_app, make_live_server):
    # a small context, so a file of a few thousand characters is more than it holds
    return make_live_server(make_app(MAX_ATTACHMENT_BYTES=6000, MAX_TOKENS=6, N_CTX=1024))


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", list(SIZES))
def test_attach_drop_paste_and_send(server, pages, shots, tmp_path, size, scheme):
    from playwright.sync_api import expect

    page = pages(SIZES[size], scheme)
    page.context.add_init_script(path=str(AXE))  # the harness's, not the page's (its CSP)
    uploads = []
    page.on("request", lambda r: uploads.append(r) if r.url.endswith("/api/attachments") else None)
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.get_by_test_id("model-select")).to_have_value("tiny-chat")
    attach = page.get_by_test_id("attach")
    expect(attach).to_have_attribute("title", re.compile(r"Images can't be used with tiny chat · F32: "
                                                         r"it does not take images \(no vision\)"))
    chips = page.get_by_test_id("composer-files").get_by_test_id("file-chip")
    meter = page.get_by_test_id("context-meter")
    before = int(meter.get_attribute("data-used"))

    # the paperclip: a PDF written here
    pdf = tmp_path / "harbour-report.pdf"
    pdf.write_bytes(make_pdf([["The harbour master is named Ingrid Solberg."],
                              ["Tides were normal all week."]]))
    page.get_by_test_id("attach-input").set_input_files(str(pdf))
    expect(chips).to_have_count(1)
    expect(chips.first).to_have_attribute("data-state", "ready")
    expect(chips.first).to_contain_text("harbour-report.pdf")
    expect(chips.first).to_contain_text("2 p.")
    # the context meter counts the file
    page.wait_for_function("([el, n]) => Number(el.dataset.used) > n",
                           arg=[meter.element_handle(), before])

    # dropped and pasted files
    zone = page.locator("main.chat")  # the chat column: a drop on its messages attaches too
    page.evaluate(DROP, [zone.element_handle(), "otters.md", "# Otters\n\nOtters hold hands."])
    expect(chips).to_have_count(2)
    page.evaluate(PASTE, [page.get_by_test_id("composer").element_handle(), "pasted.txt",
                          "a pasted note"])
    expect(chips).to_have_count(3)
    expect(chips.nth(2)).to_have_attribute("data-state", "ready")
    sent_so_far = len(uploads)

    # refused before upload: too large, and an image
    big = tmp_path / "big.txt"
    big.write_text("x" * 7000)
    page.get_by_test_id("attach-input").set_input_files(str(big))
    expect(page.get_by_test_id("error-text")).to_contain_text("the most this server takes is")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    page.get_by_test_id("attach-input").set_input_files(str(photo))
    expect(page.get_by_test_id("error-text")).to_contain_text("no vision")
    assert len(uploads) == sent_so_far
    expect(chips).to_have_count(3)

    # × takes the pasted one back
    chips.nth(2).get_by_test_id("file-remove").click()
    expect(chips).to_have_count(2)
    page.get_by_test_id("composer").fill("Who is the harbour master?")

    # files larger than the context: the note says the model gets the relevant passages
    note = page.get_by_test_id("composer-note")
    expect(note).to_be_hidden()
    log = tmp_path / "harbour-log.txt"
    log.write_text("\n".join(f"day {i}: calm water, grey sky" for i in range(200)))
    page.get_by_test_id("attach-input").set_input_files(str(log))
    expect(chips).to_have_count(3)
    expect(note).to_contain_text("passages most relevant to your message")
    expect(page.get_by_test_id("send")).to_be_enabled()
    page.locator(".composer-form").screenshot(path=str(shots / f"composer-retrieval-{size}-{scheme}.png"))
    chips.nth(2).get_by_test_id("file-remove").click()
    expect(note).to_be_hidden()
    assert axe_violations(page) == []  # the chips, their × and the paperclip
    page.locator(".composer-form").screenshot(path=str(shots / f"composer-files-{size}-{scheme}.png"))
    page.screenshot(path=str(shots / f"composer-page-{size}-{scheme}.png"))

    page.get_by_test_id("composer").press("Enter")
    user = page.locator('[data-testid="message"][data-role="user"]').last
    expect(user.get_by_test_id("file-chip")).to_have_count(2)
    expect(user.get_by_test_id("message-files")).to_contain_text("harbour-report.pdf")
    expect(chips).to_have_count(0)
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)
    page.wait_for_function("() => !document.querySelector('[data-testid=stop]:not([hidden])')")
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    reply.get_by_test_id("reply-options").click()
    given = reply.get_by_test_id("reply-files")
    expect(given).to_contain_text("harbour-report.pdf (whole)")
    expect(given).to_contain_text("otters.md (whole)")
    page.screenshot(path=str(shots / f"sent-files-{size}-{scheme}.png"))
    assert axe_violations(page) == []  # the sent message's files, ⓘ's list

    # after a reload the message still shows its files
    page.reload()
    user = page.locator('[data-testid="message"][data-role="user"]').last
    expect(user.get_by_test_id("file-chip")).to_have_count(2)

    # an edited message keeps its files
    user.hover()
    user.get_by_test_id("edit").click()
    user.get_by_test_id("edit-text").fill("Who keeps the harbour?")
    user.get_by_test_id("edit-send").click()
    user = page.locator('[data-testid="message"][data-role="user"]').last
    expect(user.locator(".body")).to_have_text("Who keeps the harbour?")
    expect(user.get_by_test_id("file-chip")).to_have_count(2)
    expect(user.get_by_test_id("branch-pos")).to_have_text("2/2")
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)


def axe_violations(page) -> list[dict]:
    return page.evaluate("""async () => {
      const result = await axe.run(document, {resultTypes: ["violations"]});
      return result.violations.filter((v) => ["serious", "critical"].includes(v.impact))
        .map((v) => ({id: v.id, help: v.help, nodes: v.nodes.slice(0, 4).map((n) => n.target.join(" "))}));
    }""")
