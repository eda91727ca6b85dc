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
import { marked } from "../vendor/marked/marked.esm.js";
import createDOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/highlight.min.js";

marked.setOptions({ gfm: true, breaks: false });

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

export function renderMarkdown(element, text) {
  const source = typeof text === "string" ? text : String(text ?? "");
  let fragment;
  try {
    fragment = purifier.sanitize(marked.parse(source), SANITIZE);
    if (!(fragment instanceof DocumentFragment)) throw new Error(`sanitiser returned ${fragment}`);
    for (const link of fragment.querySelectorAll("a[href]")) {
      link.setAttribute("rel", "noopener noreferrer nofollow");
      link.setAttribute("target", "_blank");
    }
  } catch (error) {
    console.warn("rendering a message as plain text:", error);
    renderPlain(element, source);
    return;
  }
  for (const block of fragment.querySelectorAll("pre code")) {
    try {
      hljs.highlightElement(block);
    } catch {
      /* unknown language: leave it plain */
    }
  }
  element.classList.remove("plain");
  element.replaceChildren(fragment);
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
