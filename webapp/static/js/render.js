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
// Besides markdown: TeX math ($…$, $$…$$, \(…\), \[…\]) becomes MathML through KaTeX, inside the
// HTML the sanitiser sees; a reasoning model's leading <think>…</think> becomes a folded
// "Thinking" block (its text rendered through the same sanitiser); code blocks get a header
// with their language and a copy button. highlight.js and KaTeX are loaded on first need, and
// what was rendered without them is rendered again once they are here.
import { marked } from "../vendor/marked/marked.esm.js";
import createDOMPurify from "../vendor/dompurify/purify.es.mjs";
import { copyWithFeedback, icon, iconButton } from "./ui/icons.js";
import { el } from "./ui/panel.js";

const LIBRARIES = {
  hljs: "../vendor/highlight/highlight.min.js",
  katex: "../vendor/katex/katex.mjs",
};
const loaded = { hljs: null, katex: null };
const loading = {};
const waiting = new Set(); // elements rendered before a library they needed was here
const sources = new WeakMap(); // element -> the text it shows, to render it again
let rendering = null; // the element renderMarkdown is working on

function need(name) {
  if (rendering) waiting.add(rendering);
  if (loading[name]) return;
  loading[name] = import(new URL(LIBRARIES[name], import.meta.url).href).then((module) => {
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

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// KaTeX's MathML output: no style attributes (the CSP refuses them) and no fonts to fetch.
// <annotation> (the TeX source) is dropped here because the sanitiser unwraps it, which would
// show the source next to the formula.
function renderMath(tex, display, raw) {
  if (!loaded.katex) {
    need("katex");
    return `<code class="math-pending">${escapeHtml(raw)}</code>`;
  }
  let html;
  try {
    html = loaded.katex.renderToString(tex, { output: "mathml", displayMode: display, throwOnError: false });
  } catch {
    return `<code>${escapeHtml(raw)}</code>`;
  }
  html = html.replace(/<annotation[^>]*>[\s\S]*?<\/annotation>/g, "");
  return display ? `<div class="math-display">${html}</div>` : html;
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
      renderer: (token) => renderMath(token.text, true, token.raw.trim()),
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
      renderer: (token) => renderMath(token.text, token.display, token.raw),
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

function renderPlain(element, text) {
  element.classList.add("plain");
  element.textContent = text;
}

function toFragment(source) {
  const fragment = purifier.sanitize(marked.parse(source), SANITIZE);
  if (!(fragment instanceof DocumentFragment)) throw new Error(`sanitiser returned ${fragment}`);
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
