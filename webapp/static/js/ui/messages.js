// The message view: one element per message: who wrote it, the text, the provenance line,
// and a toolbar (.message-actions) with copy; edit/regenerate/branch controls go there too.
import { createStreamRenderer, renderMarkdown } from "../render.js";
import { copyWithFeedback, icon, iconButton } from "./icons.js";

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

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System" };
let labelCount = 0;

// The exact text a message holds (what copy puts on the clipboard), by its element.
const texts = new WeakMap();

export class MessageView {
  // scroller: the element that scrolls (the messages' column sits inside it);
  // onChange(count): after a message is added or the view is cleared (the welcome state).
  constructor(container, { scroller = container, onChange = () => {} } = {}) {
    this.container = container;
    this.scroller = scroller;
    this.onChange = onChange;
    this.pinned = true; // following the end, until the reader scrolls up
    scroller.addEventListener("scroll", () => {
      this.pinned = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
    }, { passive: true });
    document.addEventListener("bchat:rerendered", () => this.scrollToEnd());
  }

  get count() {
    return this.container.querySelectorAll('[data-testid="message"]').length;
  }

  clear() {
    this.container.replaceChildren();
    this.onChange(0);
  }

  // Follow the end only while the reader is there: scrolling up to read stops the following.
  scrollToEnd({ force = false } = {}) {
    if (!force && !this.pinned) return;
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.pinned = true;
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

  add(message, { follow = true } = {}) {
    const node = el("article", "message");
    node.dataset.testid = "message";
    node.dataset.role = message.role;
    node.dataset.status = message.status ?? "complete";
    if (message.id) node.dataset.messageId = message.id;
    // Screen readers announce each message with who wrote it.
    const label = el("div", "role-label");
    label.id = `message-label-${++labelCount}`;
    label.append(icon(message.role === "user" ? "user" : "spark", { size: 16 }),
      el("span", "role-name", ROLE_NAMES[message.role] ?? message.role));
    if (message.role === "assistant" && message.model) label.append(el("span", "role-model", message.model));
    node.setAttribute("aria-labelledby", label.id);
    const body = el("div", "body");
    if (message.role === "assistant") renderMarkdown(body, message.content);
    else body.textContent = message.content; // what the user typed is shown as typed
    texts.set(node, message.content ?? "");
    const actions = el("div", "message-actions");
    const copy = iconButton("copy", "Copy message", {
      testid: "copy",
      onClick: () => copyWithFeedback(copy, texts.get(node) ?? ""),
    });
    copy.dataset.ui = ""; // ours, not the message's: see render.js
    actions.append(copy);
    node.append(label, body, el("div", "meta"), actions);
    this.setMeta(node, message);
    this.container.append(node);
    this.onChange(this.count);
    this.scrollToEnd({ force: follow });
    return node;
  }

  // A reply being written (from its start, or picked up mid-way with the text so far):
  // returns handles to append tokens and to settle it.
  startReply(model, { id = null, text = "" } = {}) {
    const node = this.add({ id, role: "assistant", content: "", status: "streaming", model });
    const renderer = createStreamRenderer(node.querySelector(".body"));
    if (text) renderer.append(text);
    texts.set(node, text);
    return {
      node,
      append: (piece) => {
        renderer.append(piece);
        texts.set(node, renderer.text);
        this.scrollToEnd();
      },
      queued: (position) => {
        node.querySelector(".meta").textContent = `waiting for the model (${position} ahead)…`;
      },
      loading: () => {
        node.querySelector(".meta").textContent = "loading the model in this browser…";
      },
      settle: (message) => {
        renderer.finish(message.content);
        texts.set(node, message.content ?? "");
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
