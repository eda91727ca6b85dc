"""The Models panel (issue 27) in chromium at a desktop and a phone size, light and dark: a
family's table and its quality-against-size plot, and Compare opened from a variant with the
family's variants side by side, each column naming the variant that wrote it.

Screenshots go to $BCHAT_SCREENSHOTS (default: a pytest temporary folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect
from tiny_model import write_tiny_model

from webapp.catalogue import discover, read_model_file
from webapp.quant import EVAL_TEXT, evaluate_family, quantize

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"width": 1366, "height": 850}
PHONE = {"width": 390, "height": 844}
REPLY_MS = 120_000


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """tiny-F32 and its Q8_0 and Q4_0, measured on the start of the shipped text."""
    folder = tmp_path_factory.mktemp("family")
    source = read_model_file(write_tiny_model(folder / "tiny-F32.gguf", dim=256, ff=512, name="tiny"))
    for qtype in ("Q8_0", "Q4_0"):
        quantize(source, qtype, folder, nthread=1)
    text = tmp_path_factory.mktemp("text") / "start.txt"
    text.write_text(EVAL_TEXT.read_text()[:3000])
    evaluate_family(discover(folder), "tiny", text_path=text, n_ctx=128, n_threads=1)
    return folder


@pytest.fixture
def server(family, make_app, make_live_server, tmp_path):
    return make_live_server(make_app(MODEL_PATH=str(family), BROWSER_MODELS_DIR=str(tmp_path / "bm"),
                                     RATE_LIMIT="1000/minute"))


def shoot(page, shots: Path, name: str) -> None:
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        page.wait_for_function("(dark) => matchMedia('(prefers-color-scheme: dark)').matches === dark",
                               arg=scheme == "dark")
        page.screenshot(path=str(shots / f"{name}-{scheme}.png"))


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_models_page_shows_each_variants_cost_and_plot(server, pages, shots, viewport):
    page = pages(viewport)
    page.goto(server.url + "/models")
    panel = page.get_by_test_id("models-panel")
    expect(panel).to_be_visible()
    expect(panel.get_by_test_id("models-families")).to_have_attribute("data-loaded", "true")
    rows = panel.get_by_test_id("models-row")
    expect(rows).to_have_count(3)
    expect(rows.locator('[data-figure="type"]')).to_have_text(["F32 (reference)", "Q8_0", "Q4_0"])
    quality = page.evaluate("async () => (await fetch('/api/models/quality')).json()")
    members = {m["model"]: m for m in quality["families"][0]["members"]}
    for i, model in enumerate(["tiny-F32", "tiny-Q8_0", "tiny-Q4_0"]):
        row = rows.nth(i)
        expect(row.locator('[data-figure="bpw"]')).to_have_text(f"{members[model]['bits_per_weight']:.2f}")
        expect(row.locator('[data-figure="kld"]')).to_have_text(f"{members[model]['quality']['kld']:.4f}")
        expect(row.locator('[data-figure="fits-server"]')).to_have_attribute("data-fits", "true")
        expect(row.locator('[data-figure="fits-browser"]')).to_have_attribute("data-fits", "true")
        expect(row.locator('[data-figure="server-tps"]')).not_to_have_text("–")
    assert members["tiny-Q8_0"]["quality"]["kld"] < members["tiny-Q4_0"]["quality"]["kld"]
    expect(panel.get_by_test_id("models-facts")).to_contain_text("parameters")

    plot = panel.get_by_test_id("models-plot")
    expect(plot).to_have_attribute("data-metric", "kld")
    # KLD on a log scale: the reference (0) has no place on it; the variants do
    points = plot.get_by_test_id("models-plot-point")
    expect(points).to_have_count(2)
    expect(plot.get_by_test_id("models-plot-reference")).to_have_count(1)
    y = {m: float(points.and_(page.locator(f'[data-model="{m}"]')).get_attribute("cy"))
         for m in ("tiny-Q8_0", "tiny-Q4_0")}
    assert y["tiny-Q4_0"] < y["tiny-Q8_0"]  # the larger divergence is drawn higher
    # no label sits on another (the reference's, at its line, beside the variants' own)
    overlaps = plot.evaluate("""(svg) => {
      const boxes = [...svg.querySelectorAll('.plot-label, [data-testid="models-plot-reference-label"]')]
        .map((t) => [t.textContent, t.getBBox()]);
      return boxes.flatMap(([a, p], i) => boxes.slice(i + 1).filter(([, q]) =>
        p.x < q.x + q.width && q.x < p.x + p.width && p.y < q.y + q.height && q.y < p.y + p.height)
        .map(([b]) => `${a} / ${b}`));
    }""")
    assert overlaps == []
    box = plot.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] + 0.5, box
    panel.get_by_test_id("models-metric").select_option("top1")
    expect(panel.get_by_test_id("models-plot").get_by_test_id("models-plot-point")).to_have_count(3)
    panel.get_by_test_id("models-metric").select_option("kld")
    size = "desktop" if viewport == DESKTOP else "phone"
    shoot(page, shots, f"models-{size}")
    plot.scroll_into_view_if_needed()
    shoot(page, shots, f"models-plot-{size}")


def test_compare_opens_from_a_variant_with_the_family_side_by_side(server, pages, shots):
    page = pages(DESKTOP)
    page.goto(server.url + "/")
    expect(page.get_by_test_id("connection")).to_have_text("connected")
    # a browser benchmark of one variant, as the benchmark panel posts it, shows in its row
    posted = page.evaluate("""async () => (await fetch('/api/benchmarks', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({backend: 'wasm-st',
        model: 'tiny-Q8_0', results: [{prompt: 'short', prompt_tokens: 9, decode_tps: 123.4}]})})).status""")
    assert posted == 201
    page.get_by_test_id("tools-menu").locator("summary").click()
    page.get_by_test_id("models").click()
    rows = page.get_by_test_id("models-row")
    expect(rows).to_have_count(3)
    expect(rows.locator('[data-figure="browser-tps"]')).to_have_text(["–", "123 (wasm-st)", "–"])
    note = page.get_by_test_id("models-family").locator(".field-help").first
    expect(note).to_contain_text("Each token reads")
    rows.nth(2).get_by_test_id("models-compare").click()
    expect(page.get_by_test_id("models-panel")).to_be_hidden()
    panel = page.get_by_test_id("compare-panel")
    expect(panel).to_be_visible()
    targets = panel.get_by_test_id("compare-model")
    expect(targets).to_have_count(3)
    assert [targets.nth(i).input_value() for i in range(3)] == ["tiny-Q4_0", "tiny-F32", "tiny-Q8_0"]
    engines = panel.get_by_test_id("compare-engine")
    assert [engines.nth(i).input_value() for i in range(3)] == ["server"] * 3
    panel.get_by_test_id("compare-max-tokens").fill("8")
    panel.get_by_test_id("compare-prompt").fill("Tell me about the cat.")
    panel.get_by_test_id("compare-send").click()
    columns = panel.get_by_test_id("compare-column")
    for i in range(3):
        expect(columns.nth(i)).to_have_attribute("data-status", "complete", timeout=REPLY_MS)
    # each reply says which variant wrote it
    expect(columns.locator(".compare-model")).to_have_text(["tiny · Q4_0", "tiny · F32", "tiny · Q8_0"])
    quant = columns.nth(0).get_by_test_id("compare-stats").locator('[data-figure="quant"] dd')
    expect(quant).to_have_text("Q4_0")
    shoot(page, shots, "models-compare-desktop")
