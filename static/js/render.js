// The one place model output becomes HTML: markdown -> marked -> DOMPurify -> DOM nodes.
// Streaming text is re-rendered at most once per animation frame.
import { marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/highlight.min.js";

marked.setOptions({ gfm: true, breaks: false });

export function renderMarkdown(element, text) {
  const html = marked.parse(text ?? "");
  const fragment = DOMPurify.sanitize(html, { RETURN_DOM_FRAGMENT: true });
  for (const link of fragment.querySelectorAll("a[href]")) {
    link.setAttribute("rel", "noopener noreferrer nofollow");
    link.setAttribute("target", "_blank");
  }
  for (const block of fragment.querySelectorAll("pre code")) {
    try {
      hljs.highlightElement(block);
    } catch {
      /* unknown language: leave it plain */
    }
  }
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
