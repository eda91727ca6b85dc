"""The page's tools in chromium: compare (a browser reply beside a server one, the pick becomes
the branch), the benchmark panel (both engines' figures, the chart, the stored server row),
API keys (a token shown once that works on /v1 until revoked) and the JSON schema reply format.

The tiny test model runs both on the server and in the page (wllama), fast. Screenshots go to
$BCHAT_SCREENSHOTS (default: a pytest temporary folder), at a desktop and a phone size, light
and dark.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"width": 1366, "height": 850}
PHONE = {"width": 390, "height": 844}
REPLY_MS = 120_000
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "mood": {"enum": ["happy", "sad", "calm"]}},
          "required": ["name", "mood"], "additionalProperties": False}


@pytest.fixture
def server(make_app, make_live_server):
    return make_live_server(make_app(MAX_QUEUED_PER_VISITOR=8, RATE_LIMIT="1000/minute"))


def open_chat(page, url: str, path: str = "/") -> None:
    page.goto(url + path)
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.get_by_test_id("model-select")).to_have_value("tiny-chat")


def open_tool(page, testid: str) -> None:
    page.get_by_test_id("tools-menu").locator("summary").click()
    page.get_by_test_id(testid).click()
    expect(page.get_by_test_id(f"{testid}-panel")).to_be_visible()


def fetch_json(page, path: str):
    return page.evaluate("(path) => fetch(path).then((r) => r.json())", path)


def rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def test_compare_the_browser_and_the_server_then_pick_the_browser_reply(server, pages, shots):
    page = pages()
    open_chat(page, server.url)
    open_tool(page, "compare")
    panel = page.get_by_test_id("compare-panel")
    engines = panel.get_by_test_id("compare-engine")
    expect(engines).to_have_count(2)
    expect(engines.nth(0)).to_have_value("server")
    expect(engines.nth(1)).to_have_value("browser")
    panel.get_by_test_id("compare-max-tokens").fill("12")
    panel.get_by_test_id("compare-prompt").fill("which engine is faster?")
    panel.get_by_test_id("compare-send").click()
    columns = panel.get_by_test_id("compare-column")
    expect(columns).to_have_count(2)
    for i in range(2):
        expect(columns.nth(i)).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    expect(panel.get_by_test_id("compare-send")).to_be_visible()
    # each column shows its speeds and the model's facts
    for i in range(2):
        stats = columns.nth(i).get_by_test_id("compare-stats")
        for figure in ("ttft", "decode-tps", "prompt-tps", "tokens"):
            expect(stats.locator(f'[data-figure="{figure}"] dd')).not_to_have_text("–")
        expect(stats.locator('[data-figure="quant"] dd')).to_have_text("F32")
    page.screenshot(path=str(shots / "compare-desktop-light.png"))

    ids = {columns.nth(i).get_attribute("data-engine"): columns.nth(i).get_attribute("data-message-id")
           for i in range(2)}
    assert set(ids) == {"server", "browser"} and all(ids.values())
    cid = page.evaluate(
        "() => document.querySelector('[data-testid=compare-columns]').dataset.conversationId")
    conversation = fetch_json(page, f"/api/conversations/{cid}")
    replies = {m["id"]: m for m in conversation["messages"] if m["role"] == "assistant"}
    server_reply, browser_reply = replies[ids["server"]], replies[ids["browser"]]
    assert server_reply["engine"] == "server" and browser_reply["engine"] == "browser"
    assert server_reply["parent_id"] == browser_reply["parent_id"], "siblings under one user message"
    users = [m["content"] for m in conversation["messages"] if m["role"] == "user"]
    assert users == ["which engine is faster?"]
    assert browser_reply["tokens_per_second"] > 0 and server_reply["tokens_per_second"] > 0

    browser_column = panel.locator('[data-testid="compare-column"][data-engine="browser"]')
    browser_column.get_by_test_id("compare-use").click()
    expect(panel).to_be_hidden()
    expect(page).to_have_url(f"{server.url}/c/{cid}")
    page.reload()
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    assert fetch_json(page, f"/api/conversations/{cid}")["current_message_id"] == ids["browser"]
    expect(page.locator(f'[data-testid="message"][data-message-id="{ids["browser"]}"]')).to_be_visible()


def test_compare_on_a_phone_shows_tabs(server, pages, shots):
    for scheme in ("light", "dark"):
        page = pages(PHONE, scheme)
        open_chat(page, server.url)
        open_tool(page, "compare")
        panel = page.get_by_test_id("compare-panel")
        panel.get_by_test_id("compare-engine").nth(1).select_option("server")
        panel.get_by_test_id("compare-max-tokens").fill("8")
        panel.get_by_test_id("compare-prompt").fill("hello")
        panel.get_by_test_id("compare-send").click()
        columns = panel.get_by_test_id("compare-column")
        for i in range(2):
            expect(columns.nth(i)).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
        expect(columns.nth(0)).to_be_visible()
        expect(columns.nth(1)).to_be_hidden()
        panel.get_by_role("tab").nth(1).click()
        expect(columns.nth(1)).to_be_visible()
        expect(columns.nth(0)).to_be_hidden()
        page.screenshot(path=str(shots / f"compare-phone-{scheme}.png"))


def test_benchmark_runs_both_engines_and_draws_them(server, pages, shots):
    page = pages()
    open_chat(page, server.url)
    open_tool(page, "benchmark")
    panel = page.get_by_test_id("benchmark-panel")
    expect(panel.get_by_test_id("benchmark-server-model")).to_be_checked()
    backends = panel.get_by_test_id("benchmark-backend")
    expect(backends).to_have_count(3)
    expect(panel.locator('[data-testid="benchmark-backend"][value="webgpu"]')).to_be_disabled()
    enabled = [backends.nth(i).get_attribute("value") for i in range(3) if backends.nth(i).is_enabled()]
    assert "wasm-st" in enabled
    panel.get_by_test_id("benchmark-tokens").fill("8")
    panel.get_by_test_id("benchmark-run").click()
    expect(panel.get_by_test_id("benchmark-status")).to_contain_text("Done", timeout=240_000)

    listing = fetch_json(page, "/api/benchmarks")
    prompts = [p["name"] for p in listing["prompts"]]
    runs = listing["benchmarks"]
    assert {r["engine"] for r in runs} == {"server", "browser"}
    for run in runs:
        assert run["mine"] and [r["prompt"] for r in run["results"]] == prompts
        assert all(r["prompt_tps"] > 0 and r["decode_tps"] > 0 for r in run["results"]), run
    labels = {f"{r['engine']} ({r['backend']})" for r in runs}
    assert len(labels) == len(runs) == 1 + len(enabled)
    for metric in ("prompt_tps", "decode_tps"):
        bars = panel.locator(f'[data-testid="benchmark-chart"][data-metric="{metric}"] '
                             '[data-testid="benchmark-bar"]')
        expect(bars).to_have_count(len(runs) * len(prompts))
        drawn = bars.evaluate_all("(bars) => bars.map((b) => [b.dataset.label, b.dataset.prompt])")
        assert sorted(map(tuple, drawn)) == sorted((label, p) for label in labels for p in prompts)
    # the server's row shows what the API stored
    stored = next(r for r in runs if r["engine"] == "server")
    for result in stored["results"]:
        row = panel.locator(f'[data-testid="benchmark-table"] [data-testid="benchmark-row"]'
                            f'[data-engine="server"][data-prompt="{result["prompt"]}"]')
        expect(row.locator('[data-figure="prompt-tps"]')).to_have_text(rate(result["prompt_tps"]))
        expect(row.locator('[data-figure="decode-tps"]')).to_have_text(rate(result["decode_tps"]))
    expect(panel.locator('[data-testid="benchmark-stored"] [data-testid="benchmark-row"]')).to_have_count(
        len(runs) * len(prompts))
    page.screenshot(path=str(shots / "benchmark-desktop-light.png"), full_page=True)
    panel.get_by_test_id("benchmark-results").screenshot(path=str(shots / "benchmark-results-light.png"))
    for viewport, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
        other = pages(viewport, "dark")
        open_chat(other, server.url)
        open_tool(other, "benchmark")
        expect(other.locator('[data-testid="benchmark-stored"] [data-testid="benchmark-row"]')).to_have_count(
            len(runs) * len(prompts))
        other.screenshot(path=str(shots / f"benchmark-{name}-dark.png"))


def v1_status(url: str, token: str) -> int:
    request = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            json.load(response)
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_api_keys_token_shown_once_works_then_revoked(server, pages, shots):
    page = pages()
    open_chat(page, server.url)
    open_tool(page, "api-keys")
    panel = page.get_by_test_id("api-keys-panel")
    expect(panel.get_by_test_id("api-base-url")).to_have_text(f"{server.url}/v1")
    panel.get_by_test_id("api-key-name").fill("my notebook")
    panel.get_by_test_id("api-key-create").click()
    box = panel.get_by_test_id("api-key-token-box")
    expect(box).to_be_visible()
    expect(box).to_contain_text("you will not see it again")
    token = panel.get_by_test_id("api-key-token").input_value()
    assert len(token) > 20
    row = panel.get_by_test_id("api-key-row")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("my notebook")
    assert token not in row.inner_text()
    page.screenshot(path=str(shots / "api-keys-desktop-light.png"))
    assert v1_status(server.url, token) == 200
    # shown once: closing the panel drops it, reopening does not bring it back
    panel.get_by_test_id("api-keys-panel-close").click()
    open_tool(page, "api-keys")
    expect(box).to_be_hidden()
    assert panel.get_by_test_id("api-key-token").input_value() == ""
    assert token not in page.content()
    # revoke, through the page's own confirm dialog
    row.get_by_test_id("api-key-revoke").click()
    page.get_by_test_id("revoke-key-dialog-confirm").click()
    expect(row).to_have_attribute("data-revoked", "true")
    assert v1_status(server.url, token) == 401
    for viewport, name, scheme in ((PHONE, "phone", "dark"), (DESKTOP, "desktop", "dark"),
                                   (PHONE, "phone", "light")):
        other = pages(viewport, scheme)
        open_chat(other, server.url)
        open_tool(other, "api-keys")
        other.get_by_test_id("api-key-name").fill("ci")
        other.get_by_test_id("api-key-create").click()
        expect(other.get_by_test_id("api-key-token-box")).to_be_visible()
        other.screenshot(path=str(shots / f"api-keys-{name}-{scheme}.png"))


def test_a_json_schema_reply_renders_as_valid_formatted_json(server, pages, shots):
    page = pages()
    open_chat(page, server.url)
    page.get_by_test_id("settings").locator("summary").click()
    page.get_by_test_id("max-tokens").fill("200")
    page.get_by_test_id("max-tokens").dispatch_event("change")
    page.get_by_test_id("settings").locator("summary").click()
    page.get_by_test_id("composer").fill("hello")
    page.get_by_test_id("composer").press("Enter")
    first = page.locator('[data-testid="message"][data-role="assistant"]').first
    expect(first).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    expect(first.get_by_test_id("structured-mark")).to_have_count(0)

    page.get_by_test_id("settings").locator("summary").click()
    page.get_by_test_id("reply-format").select_option("json_schema")
    schema = page.get_by_test_id("reply-schema")
    schema.fill("{not json")
    expect(page.get_by_test_id("reply-schema-note")).to_contain_text("Invalid schema")
    expect(page.get_by_test_id("settings-save")).to_be_disabled()
    # Within the server's limits is the server's verdict, the same a chat or /v1 gets.
    schema.fill('{"type": "string", "maxLength": 1000000000}')
    page.get_by_test_id("settings-save").click()
    expect(page.get_by_test_id("reply-schema-note")).to_contain_text("Refused by the server")
    expect(page.get_by_test_id("reply-schema-note")).to_contain_text("maxLength")
    schema.fill(json.dumps(SCHEMA, indent=2))
    page.get_by_test_id("settings-save").click()
    expect(page.get_by_test_id("reply-schema-note")).to_contain_text("Saved")
    page.screenshot(path=str(shots / "reply-format-desktop-light.png"))
    cid = page.url.rsplit("/", 1)[1]
    settings = fetch_json(page, f"/api/conversations/{cid}")["settings"]
    assert settings["response_format"] == {"type": "json_schema",
                                           "json_schema": {"name": "reply", "schema": SCHEMA}}
    page.get_by_test_id("settings").locator("summary").click()

    page.get_by_test_id("composer").fill("a person, please")
    page.get_by_test_id("composer").press("Enter")
    second = page.locator('[data-testid="message"][data-role="assistant"]').nth(1)
    expect(second).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    mark = second.get_by_test_id("structured-mark")
    expect(mark).to_have_attribute("data-valid", "true")
    code = second.locator(".structured-code pre code")
    expect(code).to_be_visible()
    shown = json.loads(code.inner_text())
    assert set(shown) == {"name", "mood"} and shown["mood"] in SCHEMA["properties"]["mood"]["enum"]
    assert "\n  " in code.inner_text(), "pretty-printed"
    page.screenshot(path=str(shots / "structured-desktop-light.png"))
    # after a reload the stored reply is shown the same way
    page.reload()
    second = page.locator('[data-testid="message"][data-role="assistant"]').nth(1)
    expect(second.get_by_test_id("structured-mark")).to_have_attribute("data-valid", "true")
    plain = page.locator('[data-testid="message"][data-role="assistant"]').first
    expect(plain.get_by_test_id("structured-mark")).to_have_count(0)
    # the settings menu shows the conversation's format
    page.get_by_test_id("settings").locator("summary").click()
    expect(page.get_by_test_id("reply-format")).to_have_value("json_schema")
    for viewport, name, scheme in ((PHONE, "phone", "dark"), (DESKTOP, "desktop", "dark"),
                                   (PHONE, "phone", "light")):
        other = pages(viewport, scheme)
        other.context.add_cookies(page.context.cookies())
        open_chat(other, server.url, f"/c/{cid}")
        expect(other.get_by_test_id("structured-mark")).to_have_attribute("data-valid", "true")
        other.screenshot(path=str(shots / f"structured-{name}-{scheme}.png"))
