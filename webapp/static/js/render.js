// The one place model output becomes HTML: markdown -> marked -> DOMPurify -> DOM nodes.
// Streaming text is re-rendered at most once per animation frame.
//
// Model output is untrusted. Besides DOMPurify's defaults (no scripts, no event handlers, no
// javascript: URLs) the renderer keeps nothing that reaches off the site or restyles the page:
// no <style>, no style attributes, no form parts, and no src/srcset/poster/action/background
// outside this origin (data: images stay; they make no request). The CSP blocks those too, but
// a renderer that relies on it alone leaks whenever the CSP is loosened. And a message must
// never stop the page: if the sanitiser returns nothing or throws (DOMPurify returns null for a
// top-level <frameset>), the message is shown as plain text and the next one renders as usual.
//
// Besides markdown: TeX math ($…$, $$…$$, \(…\), \[…\]) is laid out by KaTeX (its HTML, CSS
// and fonts, plus hidden MathML for screen readers), each formula sanitised on its own (see
// mathNode); a reasoning model's leading <think>…</think> becomes a folded "Thinking" block
// (its text rendered through the same sanitiser); code blocks get a header with their language
// and a copy button. highlight.js and KaTeX (module, stylesheet, fonts) are loaded on first
// need, and what was rendered without them is rendered again once they are here.
import { marked } from "../vendor/marked/marked.esm.js";
import createDOMPurify from "../vendor/dompurify/purify.es.mjs";
import { copyWithFeedback, icon, iconButton } from "./ui/icons.js";
import { el } from "./ui/panel.js";

const LIBRARIES = {
  hljs: "../vendor/highlight/highlight.min.js",
  katex: "../vendor/katex/katex.mjs",
};
// A library's stylesheet, loaded with it (KaTeX's lays out its HTML and names its fonts).
const STYLESHEETS = { katex: "../vendor/katex/katex.min.css" };
const loaded = { hljs: null, katex: null };
const loading = {};
const waiting = new Set(); // elements rendered before a library they needed was here
const sources = new WeakMap(); // element -> the text it shows, to render it again
let rendering = null; // the element renderMarkdown is working on

// The versioned URL the page's import map gives a file (webapp/assets.py), so a stylesheet is
// cached for good like the modules; the plain URL (revalidated) where import.meta.resolve is
// missing.
function resolved(path) {
  const url = new URL(path, import.meta.url).href;
  try {
    return import.meta.resolve?.(url) ?? url;
  } catch {
    return url;
  }
}

function stylesheet(path) {
  return new Promise((resolve) => {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = resolved(path);
    link.addEventListener("load", resolve);
    link.addEventListener("error", () => {
      console.warn(`could not load ${path}`);
      resolve(); // the formulas still show, crudely: better than never re-rendering
    });
    document.head.append(link);
  });
}

function need(name) {
  if (rendering) waiting.add(rendering);
  if (loading[name]) return;
  const css = STYLESHEETS[name] ? stylesheet(STYLESHEETS[name]) : null;
  loading[name] = Promise.all([import(resolved(LIBRARIES[name])), css]).then(([module]) => {
    loaded[name] = module.default;
    const again = [...waiting];
    waiting.clear();
    for (const element of again) {
      if (element.isConnected && sources.has(element)) renderMarkdown(element, sources.get(element));
    }
    // Highlighted code and laid-out math change heights: a view following the end re-scrolls.
    document.dispatchEvent(new CustomEvent("bchat:rerendered"));
  }, (error) => console.warn(`could not load ${name}:`, error));
}

// Math goes through marked as a slot: an element with a class unique to this page load (model
// output cannot guess it, so cannot forge a slot) holding the index of the formula in
// mathQueue. Once the markdown is sanitised, each slot is replaced with the formula's own
// sanitised KaTeX output (mathNode).
const MATH_SLOT = `math-slot-${Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16)).join("")}`;
let mathQueue = [];

function mathSlot(tex, display, raw) {
  mathQueue.push({ tex, display, raw });
  const slot = `<span class="${MATH_SLOT}">${mathQueue.length - 1}</span>`;
  return display ? `<div class="math-display">${slot}</div>` : slot;
}

const BLOCK_MATH = [/^\$\$([\s\S]+?)\$\$[^\S\n]*(?:\n|$)/, /^\\\[([\s\S]+?)\\\][^\S\n]*(?:\n|$)/];
// $…$ must hug its text and not be followed by a digit, so "$5 and $10" stays prices.
const INLINE_MATH = [
  [/^\$\$([^$]+?)\$\$/, true],
  [/^\$(?![\s$])((?:\\.|[^\\$\n])+?)(?<!\s)\$(?![0-9])/, false],
  [/^\\\((.+?)\\\)/, false],
];

marked.use({
  gfm: true,
  breaks: false,
  extensions: [
    {
      name: "mathBlock",
      level: "block",
      start: (src) => src.match(/\$\$|\\\[/)?.index,
      tokenizer(src) {
        for (const pattern of BLOCK_MATH) {
          const match = pattern.exec(src);
          if (match) return { type: "mathBlock", raw: match[0], text: match[1].trim() };
        }
        return undefined;
      },
      renderer: (token) => mathSlot(token.text, true, token.raw.trim()),
    },
    {
      name: "mathInline",
      level: "inline",
      start: (src) => src.match(/\$|\\\(/)?.index,
      tokenizer(src) {
        for (const [pattern, display] of INLINE_MATH) {
          const match = pattern.exec(src);
          if (match) return { type: "mathInline", raw: match[0], text: match[1], display };
        }
        return undefined;
      },
      renderer: (token) => mathSlot(token.text, token.display, token.raw),
    },
  ],
});

// Our own instance: hooks added here do not change DOMPurify for any other code on the page.
const purifier = createDOMPurify(window);

const FORBID_TAGS = [
  "style", "link", "meta", "base", "form", "input", "button", "textarea", "select", "option",
  "frame", "frameset", "iframe", "object", "embed", "portal", "dialog",
];
const FORBID_ATTR = ["style", "srcset", "action", "formaction", "background", "poster", "ping"];
// Attributes that make the browser fetch something by themselves (no click needed).
const FETCHING_ATTRS = ["src", "href", "xlink:href", "poster", "action", "background", "data"];
const FETCHING_ON_SIGHT = new Set(["IMG", "IMAGE", "VIDEO", "AUDIO", "SOURCE", "TRACK", "USE", "FEIMAGE"]);

function offSite(value) {
  const trimmed = value.trim();
  if (/^data:image\//i.test(trimmed)) return false;
  try {
    return new URL(trimmed, document.baseURI).origin !== window.location.origin;
  } catch {
    return true; // not a URL we understand: not worth the risk
  }
}

// SVG paint and filter attributes may point at other documents: fill="url(https://…#x)".
const EXTERNAL_CSS_URL = /url\s*\(\s*['"]?\s*[^\s'"#]/i;

purifier.addHook("afterSanitizeAttributes", (node) => {
  for (const attr of Array.from(node.attributes ?? [])) {
    if (EXTERNAL_CSS_URL.test(attr.value)) node.removeAttribute(attr.name);
  }
  for (const name of FETCHING_ATTRS) {
    if (!node.hasAttribute?.(name)) continue;
    // Links are followed only when clicked (and open safely below); anything else fetches.
    const fetches = name !== "href" || FETCHING_ON_SIGHT.has(node.nodeName.toUpperCase());
    if (fetches && offSite(node.getAttribute(name))) node.removeAttribute(name);
  }
});

const SANITIZE = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS,
  FORBID_ATTR,
  ALLOW_DATA_ATTR: false,
  // id="x" and name="x" would otherwise clobber window.x and document.x for the page's own
  // code; DOMPurify prefixes them with "user-content-".
  SANITIZE_NAMED_PROPS: true,
};

// KaTeX's HTML sizes and shifts its boxes with style attributes (heights, vertical-align, top,
// margins, border widths, colour), which the sanitiser drops and the CSP refuses as markup
// (even parsing them in the sanitiser's inert document logs a violation per attribute). So
// mathNode renames them to data-katex-style before parsing, the hook below reads each one
// while the sanitiser drops it (no data attributes survive), and only these properties, with
// plain values (lengths, numbers, colour names: no url(), quotes or escapes), are set again
// through CSSOM (which the CSP allows) on the sanitised element.
const MATH_STYLE_PROPERTIES = new Set([
  "height", "width", "min-width", "vertical-align", "top", "bottom", "left", "margin", "margin-left",
  "margin-right", "margin-top", "padding-left", "border-width", "border-top-width",
  "border-bottom-width", "border-right-width", "border-style", "border-right-style", "border-color",
  "color", "background-color",
]);
const MATH_STYLE_VALUE = /^[-+\w.#%, ]*(?:calc\([-+*/\w.%, ]*\))?[-+\w.#%, ]*$/;
let mathStyles = null; // Map: element -> its style text, while mathNode sanitises
const KATEX_STYLE = "data-katex-style";

purifier.addHook("uponSanitizeAttribute", (node, data) => {
  if (mathStyles && data.attrName === KATEX_STYLE) mathStyles.set(node, data.attrValue);
});

function applyMathStyle(node, text) {
  for (const declaration of text.split(";")) {
    const colon = declaration.indexOf(":");
    if (colon < 0) continue;
    const property = declaration.slice(0, colon).trim().toLowerCase();
    const value = declaration.slice(colon + 1).trim();
    if (MATH_STYLE_PROPERTIES.has(property) && MATH_STYLE_VALUE.test(value) && !/url|expression/i.test(value)) {
      node.style.setProperty(property, value);
    }
  }
}

// KaTeX with its safe defaults (trust: false: no \href, \includegraphics or \htmlStyle), sizes
// capped (maxSize, in em) so a formula cannot cover the page, then the same sanitiser as the
// rest of the message. <annotation> (the TeX source inside the hidden MathML) is dropped: the
// sanitiser would unwrap it into text.
function mathNode({ tex, display, raw }) {
  if (!loaded.katex) {
    need("katex");
    return el("code", "math-pending", raw);
  }
  let html;
  try {
    html = loaded.katex.renderToString(tex, {
      displayMode: display, output: "htmlAndMathml", throwOnError: false, trust: false,
      maxSize: 10, maxExpand: 200, strict: "ignore",
    });
  } catch {
    return el("code", null, raw);
  }
  // KaTeX escapes every quote in text and attribute values, so ' style="' is only ever an
  // attribute of its own; and whatever this matched would still meet the sanitiser.
  html = html.replace(/<annotation[^>]*>[\s\S]*?<\/annotation>/g, "").replaceAll(' style="', ` ${KATEX_STYLE}="`);
  const styles = new Map();
  mathStyles = styles;
  let fragment;
  try {
    fragment = purifier.sanitize(html, SANITIZE);
  } finally {
    mathStyles = null;
  }
  if (!(fragment instanceof DocumentFragment)) return el("code", null, raw);
  document.adoptNode(fragment); // into this document first: its CSP governs the CSSOM below
  for (const [node, text] of styles) applyMathStyle(node, text);
  return fragment;
}

function fillMathSlots(fragment, queue) {
  for (const slot of fragment.querySelectorAll(`.${MATH_SLOT}`)) {
    const entry = queue[Number(slot.textContent)];
    slot.replaceWith(entry ? mathNode(entry) : "");
  }
}

function renderPlain(element, text) {
  element.classList.add("plain");
  element.textContent = text;
}

function toFragment(source) {
  mathQueue = [];
  const markup = marked.parse(source);
  const queue = mathQueue;
  mathQueue = [];
  const fragment = purifier.sanitize(markup, SANITIZE);
  if (!(fragment instanceof DocumentFragment)) throw new Error(`sanitiser returned ${fragment}`);
  fillMathSlots(fragment, queue);
  for (const link of fragment.querySelectorAll("a[href]")) {
    link.setAttribute("rel", "noopener noreferrer nofollow");
    link.setAttribute("target", "_blank");
  }
  return fragment;
}

// Controls the renderer adds are marked data-ui: model output cannot carry data attributes
// (the sanitiser drops them), so the mark tells our buttons from anything a message brings.
function dressCodeBlocks(fragment) {
  const blocks = fragment.querySelectorAll("pre > code");
  if (blocks.length && !loaded.hljs) need("hljs");
  for (const code of blocks) {
    if (loaded.hljs) {
      try {
        loaded.hljs.highlightElement(code);
      } catch {
        /* unknown language: leave it plain */
      }
    }
    const pre = code.parentElement;
    const language = /\blanguage-([\w+#.-]+)/.exec(code.className)?.[1] ?? "";
    const frame = el("div", "code-block");
    const head = el("div", "code-head");
    head.dataset.lang = language || "text"; // shown by CSS, so it is not part of the copied text
    const copy = iconButton("copy", `Copy ${language || "code"}`, {
      testid: "copy-code", ui: true,
      // marked ends every code block with a newline the author did not write
      onClick: () => copyWithFeedback(copy, code.textContent.replace(/\n$/, "")),
    });
    copy.title = "Copy code";
    head.append(copy);
    pre.replaceWith(frame);
    frame.append(head, pre);
  }
  for (const table of fragment.querySelectorAll("table")) {
    const scroller = el("div", "table-scroll"); // wide tables scroll on their own, not the page
    table.replaceWith(scroller);
    scroller.append(table);
  }
}

// A reasoning model starts with <think>…</think> (unclosed while it is still thinking).
const THINKING = /^\s*<think>([\s\S]*?)(?:<\/think>\s*|$)/;
const thinkingOpen = new WeakMap(); // element -> the reader's choice, kept across re-renders

function thinkingBlock(element, thought, done) {
  const details = el("details", "thinking", null, { testid: "thinking", open: thinkingOpen.get(element) ?? !done });
  const summary = el("summary");
  summary.dataset.ui = "";
  summary.append(icon("brain", { size: 16 }), done ? "Thinking" : "Thinking…");
  const body = el("div", "thinking-body");
  body.append(toFragment(thought));
  details.append(summary, body);
  details.addEventListener("toggle", () => thinkingOpen.set(element, details.open));
  return details;
}

export function renderMarkdown(element, text) {
  const source = typeof text === "string" ? text : String(text ?? "");
  sources.set(element, source);
  rendering = element;
  const parts = [];
  try {
    const thinking = THINKING.exec(source);
    if (thinking) {
      const done = thinking[0].includes("</think>");
      parts.push(thinkingBlock(element, thinking[1], done));
      parts.push(toFragment(source.slice(thinking[0].length)));
    } else {
      parts.push(toFragment(source));
    }
    for (const part of parts) dressCodeBlocks(part);
  } catch (error) {
    console.warn("rendering a message as plain text:", error);
    renderPlain(element, source);
    return;
  } finally {
    rendering = null;
  }
  element.classList.remove("plain");
  element.replaceChildren(...parts);
}

export function createStreamRenderer(element) {
  let text = "";
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    renderMarkdown(element, text);
  };
  return {
    append(piece) {
      text += piece;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(flush);
      }
    },
    get text() {
      return text;
    },
    finish(finalText = text) {
      text = finalText;
      flush();
    },
  };
}
