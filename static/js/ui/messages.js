// The message view: one element per message, with its provenance line.
import { createStreamRenderer, renderMarkdown } from "../render.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function describeProvenance(message) {
  if (message.role !== "assistant") return "";
  const parts = [];
  if (message.engine) parts.push(message.backend ? `${message.engine} (${message.backend})` : message.engine);
  if (message.model) parts.push(message.model);
  if (message.tokens_per_second) parts.push(`${message.tokens_per_second.toFixed(1)} tok/s`);
  const n = message.usage?.completion_tokens;
  if (n != null) parts.push(`${n} tokens`);
  if (message.meta?.trimmed_messages) {
    parts.push(`${message.meta.trimmed_messages} older messages left out to fit the context`);
  }
  return parts.join(" · ");
}

export class MessageView {
  constructor(container) {
    this.container = container;
  }

  clear() {
    this.container.replaceChildren();
  }

  scrollToEnd() {
    this.container.scrollTop = this.container.scrollHeight;
  }

  setMeta(node, message) {
    const meta = node.querySelector(".meta");
    meta.replaceChildren();
    if (message.status && message.status !== "complete" && message.status !== "streaming") {
      meta.append(el("span", "status", message.status));
      const error = message.meta?.error?.message;
      if (error) meta.append(` — ${error}`);
      meta.append(" · ");
    }
    meta.append(describeProvenance(message));
  }

  add(message) {
    const node = el("article", "message");
    node.dataset.testid = "message";
    node.dataset.role = message.role;
    node.dataset.status = message.status ?? "complete";
    if (message.id) node.dataset.messageId = message.id;
    const body = el("div", "body");
    if (message.role === "assistant") renderMarkdown(body, message.content);
    else body.textContent = message.content; // what the user typed is shown as typed
    node.append(body, el("div", "meta"));
    this.setMeta(node, message);
    this.container.append(node);
    this.scrollToEnd();
    return node;
  }

  // A reply being written (from its start, or picked up mid-way with the text so far):
  // returns handles to append tokens and to settle it.
  startReply(model, { id = null, text = "" } = {}) {
    const node = this.add({ id, role: "assistant", content: "", status: "streaming", model });
    const renderer = createStreamRenderer(node.querySelector(".body"));
    if (text) renderer.append(text);
    return {
      node,
      append: (text) => {
        renderer.append(text);
        this.scrollToEnd();
      },
      queued: (position) => {
        node.querySelector(".meta").textContent = `waiting for the model (${position} ahead)…`;
      },
      loading: (progress) => {
        node.querySelector(".meta").textContent = progress?.phase === "reading"
          ? `reading the conversation: ${progress.processed}/${progress.total} tokens…`
          : "loading the model in this browser…";
      },
      settle: (message) => {
        renderer.finish(message.content);
        node.dataset.status = message.status;
        if (message.id) node.dataset.messageId = message.id;
        this.setMeta(node, message);
        this.scrollToEnd();
      },
      get text() {
        return renderer.text;
      },
    };
  }
}
