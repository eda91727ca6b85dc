"""Tools in the chat, in a real chromium: the Tools section of the settings sheet, tool steps as
blocks that fold and unfold, and a hostile MCP result shown as text (never HTML)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

MCP_SERVER = Path(__file__).with_name("mcp_server.py")
SIZES = [("wide", {"width": 1366, "height": 850}), ("phone", {"width": 390, "height": 844})]


@pytest.fixture
def server(tmp_path, make_app, make_live_server):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": [
        {"name": "t", "command": sys.executable, "args": [str(MCP_SERVER), "stdio"]}]}))
    return make_live_server(make_app(MCP_FILE=str(path), TOOL_STEPS=1, MAX_TOKENS=160))


def enable_tools(page, names, required=True):
    from playwright.sync_api import expect

    page.get_by_test_id("settings").locator("summary").click()
    page.get_by_test_id("temperature").fill("0")  # the tiny model's call, greedy: short and whole
    for name in names:
        box = page.get_by_test_id(f"tool-{name}")
        expect(box).to_be_visible(timeout=30_000)  # a stdio server starts to be listed
        box.check()
    if required:
        page.get_by_test_id("tools-required").check()
    page.get_by_test_id("settings-save").click()
    expect(page.get_by_test_id("settings-status")).to_contain_text("Saved")


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size, viewport", SIZES)
def test_tool_steps_fold_and_a_hostile_result_stays_text(server, pages, shots, size, viewport, scheme):
    from playwright.sync_api import expect

    page = pages(viewport, scheme)
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    enable_tools(page, ["t__hostile"])
    page.screenshot(path=str(shots / f"tools-settings-{size}-{scheme}.png"))
    page.get_by_test_id("settings").locator("summary").click()  # closed again
    page.get_by_test_id("composer").fill("Show me something hostile.")
    page.get_by_test_id("composer").press("Enter")
    result = page.get_by_test_id("tool-result").first
    try:
        expect(result).to_be_visible(timeout=60_000)
    finally:
        page.screenshot(path=str(shots / f"tools-sent-{size}-{scheme}.png"))
    last = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(last).to_have_attribute("data-status", "complete", timeout=60_000)
    expect(page.get_by_test_id("tool-call").first).to_be_visible()
    # Folded at first; a click unfolds it and shows the result as the very text it was.
    text = result.get_by_test_id("tool-text")
    expect(text).to_be_hidden()
    result.locator("summary").click()
    expect(text).to_be_visible()
    assert "<script>window.pwned=1</script>" in text.inner_text()
    assert result.locator("img, script, a, svg, iframe, style").count() == 0
    assert page.evaluate("() => window.pwned === undefined && document.title !== 'pwned'")
    assert "<iframe srcdoc=" in text.inner_text()
    page.get_by_test_id("tool-call").first.locator("summary").click()
    page.screenshot(path=str(shots / f"tools-steps-{size}-{scheme}.png"))
    result.locator("summary").click()
    expect(text).to_be_hidden()
    # After a reload the stored steps show the same way.
    page.reload()
    expect(page.get_by_test_id("tool-result").first).to_be_visible()
    assert page.get_by_test_id("tool-result").first.locator("img, script, a").count() == 0
