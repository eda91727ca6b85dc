"""The page, second pass (issue 23, items 6–11), in chromium at a desktop and a phone size:
the header's tools menu and the System / Light / Dark theme, the settings sheet's one Save,
a reply's model named once with its facts a tap away, compare showing the file each engine
really runs with its question kept, and a benchmark that can be cancelled and fits the screen.

Screenshots go to $BCHAT_SCREENSHOTS (default: a pytest temporary folder), both sizes, both
themes (the page follows the system's scheme, so one page is shot in each by emulating it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"width": 1366, "height": 850}
PHONE = {"width": 390, "height": 844}
REPLY_MS = 120_000
SIZES = [pytest.param(DESKTOP, "light", id="desktop-light"), pytest.param(PHONE, "dark", id="phone-dark")]


@pytest.fixture
def server(make_app, make_live_server):
    return make_live_server(make_app(MAX_QUEUED_PER_VISITOR=8, RATE_LIMIT="1000/minute"))


@pytest.fixture
def two_models(make_app, make_live_server, tmp_path, tiny_model, bundled_model):
    """The bundled SmolLM2 Q4_1 (pages get its derived Q8_0 copy) and the tiny test model."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny-chat.gguf").symlink_to(tiny_model)
    (folder / bundled_model.name).symlink_to(bundled_model)
    return make_live_server(make_app(MODEL_PATH=str(folder), BROWSER_MODELS_DIR=str(tmp_path / "bm"),
                                     MAX_QUEUED_PER_VISITOR=8, RATE_LIMIT="1000/minute"))


def open_chat(page, url: str, model: str = "tiny-chat") -> None:
    page.goto(url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.get_by_test_id("model-select")).to_have_value(model)


def fetch_json(page, path: str):
    return page.evaluate("async (path) => (await fetch(path)).json()", path)


def both_schemes(page, scheme: str, shots: Path, name: str, viewport: dict) -> None:
    """Shoot the page in its scheme and in the other one (the theme follows the system)."""
    size = "desktop" if viewport == DESKTOP else "phone"
    other = "dark" if scheme == "light" else "light"
    page.screenshot(path=str(shots / f"{name}-{size}-{scheme}.png"))
    for current in (other, scheme):  # the other scheme, then back to the page's own
        page.emulate_media(color_scheme=current)
        page.wait_for_function("(dark) => matchMedia('(prefers-color-scheme: dark)').matches === dark",
                               arg=current == "dark")
        if current == other:
            page.screenshot(path=str(shots / f"{name}-{size}-{current}.png"))


def on_screen(page, locator, viewport) -> None:
    box = locator.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] + 0.5, box


# -- 10. navigation, 8. theme --------------------------------------------------------------------


@pytest.mark.parametrize(("viewport", "scheme"), SIZES)
def test_the_header_menu_reaches_the_tools_by_keyboard(server, pages, shots, viewport, scheme):
    page = pages(viewport, scheme)
    open_chat(page, server.url)
    # the tools are no longer at the bottom of the conversation's reply settings
    expect(page.get_by_test_id("settings").get_by_test_id("compare")).to_have_count(0)
    summary = page.get_by_test_id("tools-menu").locator("summary")
    expect(summary).to_be_visible()
    on_screen(page, summary, viewport)
    summary.focus()
    page.keyboard.press("Enter")
    for testid in ("compare", "benchmark", "api-keys", "theme-system", "theme-light", "theme-dark"):
        expect(page.get_by_test_id(testid)).to_be_visible()
        on_screen(page, page.get_by_test_id(testid), viewport)
    expect(page.get_by_test_id("theme-system")).to_have_attribute("aria-checked", "true")
    both_schemes(page, scheme, shots, "menu-open", viewport)
    page.keyboard.press("Tab")
    expect(page.get_by_test_id("compare")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("benchmark-panel")).to_be_visible()
    expect(page.get_by_test_id("tools-menu")).not_to_have_attribute("open", "")
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("benchmark-panel")).to_be_hidden()
    # Escape closes the menu itself too, back on its button
    summary.click()
    expect(page.get_by_test_id("api-keys")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("api-keys")).to_be_hidden()
    expect(summary).to_be_focused()
    page.get_by_test_id("tools-menu").locator("summary").click()
    page.get_by_test_id("api-keys").click()
    expect(page.get_by_test_id("api-keys-panel")).to_be_visible()


def test_the_theme_is_system_light_or_dark_and_system_follows_live(server, pages):
    page = pages(DESKTOP, "light")
    open_chat(page, server.url)
    background = "() => getComputedStyle(document.body).backgroundColor"
    light = page.evaluate(background)
    page.emulate_media(color_scheme="dark")  # System (the default) follows the change at once
    page.wait_for_function("(light) => getComputedStyle(document.body).backgroundColor !== light", arg=light)
    dark = page.evaluate(background)

    page.get_by_test_id("tools-menu").locator("summary").click()
    page.get_by_test_id("theme-light").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    assert page.evaluate(background) == light  # chosen: the dark system no longer decides
    page.reload()
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    page.get_by_test_id("tools-menu").locator("summary").click()
    expect(page.get_by_test_id("theme-light")).to_have_attribute("aria-checked", "true")
    expect(page.get_by_test_id("theme-system")).to_have_attribute("aria-checked", "false")
    # the arrow keys move within the choice (a radio group)
    page.get_by_test_id("theme-light").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(page.get_by_test_id("theme-dark")).to_be_focused()
    # back to System: nothing remembered, the system's scheme decides again, live
    page.get_by_test_id("theme-system").click()
    expect(page.locator("html")).not_to_have_attribute("data-theme", "dark")
    assert page.evaluate("() => document.documentElement.dataset.theme") is None
    assert page.evaluate("() => localStorage.getItem('bchat.theme')") is None
    assert page.evaluate(background) == dark
    page.emulate_media(color_scheme="light")
    page.wait_for_function("(dark) => getComputedStyle(document.body).backgroundColor !== dark", arg=dark)
    assert page.evaluate(background) == light
    page.reload()
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    page.get_by_test_id("tools-menu").locator("summary").click()
    expect(page.get_by_test_id("theme-system")).to_have_attribute("aria-checked", "true")
    # the sidebar's quick toggle shows what the menu set, and the menu what it sets
    page.get_by_test_id("theme-toggle").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.get_by_test_id("tools-menu").locator("summary").click()
    expect(page.get_by_test_id("theme-dark")).to_have_attribute("aria-checked", "true")


# -- 11. settings, 9. model names ------------------------------------------------------------------


@pytest.mark.parametrize(("viewport", "scheme"), SIZES)
def test_the_settings_sheet_saves_once_and_a_reply_names_its_model_once(server, pages, shots,
                                                                      viewport, scheme):
    page = pages(viewport, scheme)
    open_chat(page, server.url)
    select = page.get_by_test_id("model-select")
    expect(select.locator("option")).to_have_text(["tiny chat · F32"])  # the id stays the value
    sheet = page.get_by_test_id("settings")
    status = page.get_by_test_id("settings-status")
    # a new chat: Save keeps the sheet for this chat's first message
    sheet.locator("summary").click()
    page.get_by_test_id("system-prompt").fill("Answer like a pirate.")
    page.get_by_test_id("max-tokens").fill("7")
    page.get_by_test_id("temperature").fill("0")
    expect(status).to_have_text("Unsaved changes.")
    page.get_by_test_id("settings-save").click()
    expect(status).to_have_text("Saved: used when you send this chat's first message.")
    both_schemes(page, scheme, shots, "settings-saved-new", viewport)
    sheet.locator("summary").click()
    page.get_by_test_id("composer").fill("hello")
    page.get_by_test_id("composer").press("Enter")
    reply = page.locator('[data-testid="message"][data-role="assistant"]').first
    expect(reply).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    cid = page.url.rsplit("/c/", 1)[1]
    stored = fetch_json(page, f"/api/conversations/{cid}")
    assert stored["settings"]["system"] == "Answer like a pirate." and stored["settings"]["max_tokens"] == 7
    assert stored["messages"][1]["usage"]["completion_tokens"] <= 7

    # an existing conversation: an edit is unsaved until Save, then stored, and said
    sheet.locator("summary").click()
    expect(page.get_by_test_id("system-prompt")).to_have_value("Answer like a pirate.")
    page.get_by_test_id("max-tokens").fill("5")
    expect(status).to_have_text("Unsaved changes.")
    assert fetch_json(page, f"/api/conversations/{cid}")["settings"]["max_tokens"] == 7
    page.get_by_test_id("reply-format").select_option("json_schema")
    page.get_by_test_id("reply-schema").fill("{not json")
    expect(page.get_by_test_id("settings-save")).to_be_disabled()
    page.get_by_test_id("reply-format").select_option("text")
    page.get_by_test_id("settings-save").click()
    expect(status).to_have_text("Saved for this conversation.")
    settings = fetch_json(page, f"/api/conversations/{cid}")["settings"]
    assert settings["max_tokens"] == 5 and "response_format" not in settings
    both_schemes(page, scheme, shots, "settings-saved", viewport)
    # closing the sheet with an unsaved edit saves it the same way (typed text is never lost)
    page.get_by_test_id("temperature").fill("0.5")
    expect(status).to_have_text("Unsaved changes.")
    sheet.locator("summary").click()
    expect(status).to_have_text("Saved for this conversation.")
    assert fetch_json(page, f"/api/conversations/{cid}")["settings"]["temperature"] == 0.5

    # the reply names its model once, by its display name; the file's facts are a tap away
    chip = reply.get_by_test_id("model-chip")
    expect(chip).to_have_text("tiny chat · F32")
    assert reply.evaluate("(n) => n.textContent.split('tiny chat').length - 1") == 1
    expect(reply.locator(".meta")).not_to_contain_text("tiny")
    chip.click()
    facts = reply.get_by_test_id("model-chip-facts")
    expect(facts).to_be_visible()
    for text in ("tiny-chat.gguf", "F32", "Parameters", "on the server"):
        expect(facts).to_contain_text(text)
    on_screen(page, facts, viewport)
    both_schemes(page, scheme, shots, "reply-model", viewport)
    chip.click()
    expect(facts).to_be_hidden()
    chip.click()
    expect(facts).to_be_visible()
    page.keyboard.press("Escape")
    expect(facts).to_be_hidden()
    expect(chip).to_be_focused()
    chip.click()
    expect(facts).to_be_visible()
    page.get_by_test_id("composer").click()  # a click elsewhere closes it
    expect(facts).to_be_hidden()


# -- 6. compare ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("viewport", "scheme"), SIZES)
def test_compare_keeps_its_question_and_shows_the_file_each_engine_runs(two_models, pages, shots,
                                                                       viewport, scheme):
    page = pages(viewport, scheme)
    open_chat(page, two_models.url, model="SmolLM2-135M-Instruct.Q4_1")
    smol = next(m for m in fetch_json(page, "/api/models")["models"] if m["id"].startswith("SmolLM2"))
    assert smol["browser"]["format"] == "Q8_0"
    page.get_by_test_id("tools-menu").locator("summary").click()
    page.get_by_test_id("compare").click()
    panel = page.get_by_test_id("compare-panel")
    models = panel.get_by_test_id("compare-model")
    expect(models).to_have_count(2)
    expect(models.nth(0).locator("option")).to_have_text(["SmolLM2 135M Instruct · Q4_1", "tiny chat · F32"])
    models.nth(0).select_option("tiny-chat")
    expect(panel.get_by_test_id("compare-engine").nth(1)).to_have_value("browser")
    models.nth(1).select_option("tiny-chat")
    panel.get_by_test_id("compare-max-tokens").fill("8")
    question = "Which colour is the sky?"
    panel.get_by_test_id("compare-prompt").fill(question)
    panel.get_by_test_id("compare-send").click()
    columns = panel.get_by_test_id("compare-column")
    for i in range(2):
        expect(columns.nth(i)).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    # the question stays with its answers, and in the box to ask other models
    expect(panel.get_by_test_id("compare-question")).to_contain_text(question)
    expect(panel.get_by_test_id("compare-prompt")).to_have_value(question)
    expect(columns.nth(0).locator(".compare-model")).to_have_text("tiny chat · F32")
    if viewport == PHONE:
        panel.get_by_role("tab").nth(1).click()
    both_schemes(page, scheme, shots, "compare-results", viewport)

    # the browser column gives the copy pages run (Q8_0), the server column the file as configured
    models.nth(0).select_option(smol["id"])
    models.nth(1).select_option(smol["id"])
    panel.get_by_test_id("compare-send").click()

    def figure(engine: str, name: str):
        column = panel.locator(f'[data-testid="compare-column"][data-engine="{engine}"]')
        return column.get_by_test_id("compare-stats").locator(f'[data-figure="{name}"] dd')

    expect(figure("server", "quant")).to_have_text("Q4_1")
    expect(figure("server", "bpw")).to_have_text(f"{smol['facts']['bits_per_weight']:.2f}")
    expect(figure("browser", "quant")).to_have_text("Q8_0")
    expect(figure("browser", "bpw")).to_have_text(f"{smol['browser']['bits_per_weight']:.2f}")
    expect(figure("browser", "size")).to_have_text(f"{smol['browser']['size'] / 2**20:.0f} MiB")
    expect(panel.get_by_test_id("compare-question")).to_contain_text(question)
    panel.get_by_test_id("compare-stop").click()
    expect(panel.get_by_test_id("compare-send")).to_be_visible(timeout=REPLY_MS)


# -- 7. benchmark ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("viewport", "scheme"), SIZES)
def test_a_benchmark_can_be_cancelled_and_its_figures_fit(two_models, pages, shots, viewport, scheme):
    page = pages(viewport, scheme)
    open_chat(page, two_models.url, model="SmolLM2-135M-Instruct.Q4_1")
    page.get_by_test_id("tools-menu").locator("summary").click()
    page.get_by_test_id("benchmark").click()
    panel = page.get_by_test_id("benchmark-panel")
    run = panel.get_by_test_id("benchmark-run")
    server_models = panel.get_by_test_id("benchmark-server-model")
    expect(server_models).to_have_count(2)
    expect(server_models.nth(0)).to_be_checked()  # SmolLM2 on the server: long enough to cancel
    browser_model = panel.get_by_test_id("benchmark-browser-model")
    expect(browser_model.locator("option").nth(1)).to_contain_text("runs as Q8_0")
    browser_model.select_option("")
    panel.get_by_test_id("benchmark-tokens").fill("256")
    run.click()
    # A run refused at once (its POST answered an error) never shows Cancel: say what it said.
    try:
        expect(run).to_have_attribute("data-state", "running")
        expect(run).to_have_text("Cancel")
    except AssertionError as exc:
        said = [panel.get_by_test_id(t).text_content()
                for t in ("benchmark-panel-problem", "benchmark-status")]
        raise AssertionError(f"{exc}\nthe panel said: {said}") from None
    both_schemes(page, scheme, shots, "benchmark-running", viewport)
    run.click()
    expect(panel.get_by_test_id("benchmark-status")).to_contain_text("Cancelled. Nothing was stored.")
    expect(run).to_have_text("Run the benchmark")
    assert fetch_json(page, "/api/benchmarks")["benchmarks"] == []

    # the server side stopped too: a new run is not refused as busy, and finishes
    server_models.nth(0).uncheck()
    server_models.nth(1).check()
    panel.get_by_test_id("benchmark-browser-model").select_option("tiny-chat")
    for i in range(panel.get_by_test_id("benchmark-backend").count()):
        box = panel.get_by_test_id("benchmark-backend").nth(i)
        if box.is_enabled() and box.get_attribute("value") != "wasm-st":
            box.uncheck()
    panel.get_by_test_id("benchmark-tokens").fill("8")
    run.click()
    expect(panel.get_by_test_id("benchmark-status")).to_contain_text("Done", timeout=240_000)
    expect(panel.get_by_test_id("benchmark-panel-problem")).to_be_hidden()
    runs = fetch_json(page, "/api/benchmarks")["benchmarks"]
    assert sorted(r["engine"] for r in runs) == ["browser", "server"]
    # every value label is inside its chart, and nothing runs off the panel's right edge
    charts = panel.locator('[data-testid="benchmark-chart"]')
    overflow = charts.evaluate_all("""(charts) => charts.flatMap((c) => {
      const width = c.viewBox.baseVal.width;
      return [...c.querySelectorAll('.bench-value')].filter((t) => t.getBBox().x + t.getBBox().width > width)
        .map((t) => t.textContent);
    })""")
    assert overflow == []
    body = panel.locator(".panel-body")
    assert body.evaluate("(b) => b.scrollWidth <= b.clientWidth + 1")
    for box in (panel.get_by_test_id("benchmark-results"), panel.locator(".table-scroll").first):
        on_screen(page, box, viewport)
    panel.get_by_test_id("benchmark-results").scroll_into_view_if_needed()
    both_schemes(page, scheme, shots, "benchmark-done", viewport)
