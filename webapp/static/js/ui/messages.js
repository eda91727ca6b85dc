// The message view: one element per message: who wrote it, the text, the provenance line,
// and a toolbar (.message-actions) with copy; edit/regenerate/branch controls go there too.
import { createStreamRenderer, renderMarkdown } from "../render.js";
import { renderStructured } from "./reply_format.js";
import { copyWithFeedback, icon, iconButton } from "./icons.js";
import { el, factRows } from "./panel.js";
import { modelChip } from "./model_card.js";
import { describeGiven, fileChips } from "./attachments.js";
import { ms, tokens, tokensPerSecond } from "../format.js";
import { fillToolBlock, liveToolBlock, toolBlocksOf } from "./tools.js";

export function describeProvenance(message) {
  if (message.role !== "assistant") return "";
  const parts = [];
  if (message.engine) parts.push(message.backend ? `${message.engine} (${message.backend})` : message.engine);
  // (the model is named once, in the reply's label: ui/model_card.js modelChip)
  if (message.tokens_per_second) parts.push(tokensPerSecond(message.tokens_per_second));
  const n = message.usage?.completion_tokens;
  if (n != null) parts.push(tokens(n));
  if (message.meta?.trimmed_messages) {
    // Which ones: the oldest N, up to the one quoted (server replies say which that was).
    const through = message.meta.trimmed_through ? `, up to “${message.meta.trimmed_through}”` : "";
    // trimmed_more: a browser reply read only the branch's last windows; more lay above them.
    const left = `${message.meta.trimmed_messages}${message.meta.trimmed_more ? "+" : ""}`;
    parts.push(`the ${left} oldest messages were left out to fit the context${through}`);
  }
  return parts.join(" · ");
}

// What a reply was generated with (meta.options), shown on demand.
function describeOptions(options, message) {
  const box = el("dl", "reply-options", null, { testid: "reply-options-box" });
  box.append(...factRows([
    ["System prompt", options.system || "(none)"],
    ["Temperature", options.temperature],
    ["Top p", options.top_p],
    ["Max tokens", options.max_tokens],
    ["Seed", options.seed ?? "random"],
    ["Reply format", options.response_format ? options.response_format.type : "text"],
    ["Prompt", message.usage?.prompt_tokens != null ? tokens(message.usage.prompt_tokens) +
      (message.meta?.prompt_cached ? ` (${message.meta.prompt_cached} from cache)` : "") : null],
    ["Time to first token", message.meta?.prompt_ms != null ? ms(message.meta.prompt_ms) : null],
    // how it ran: the same facts for either engine (the browser's from wllama's timings)
    ["Ran on", message.engine ? (message.backend ? `${message.engine} (${message.backend})` : message.engine) : null],
    ["Model", message.model],
    ["Reply", message.usage?.completion_tokens != null ? tokens(message.usage.completion_tokens) : null],
    ["Speed", message.tokens_per_second ? tokensPerSecond(message.tokens_per_second) : null],
    ["Writing time", message.meta?.predicted_ms != null ? ms(message.meta.predicted_ms) : null],
    ["Threads", message.meta?.threads],
  ]));
  // The files it was given: whole, or the passages retrieval chose (file, page or lines).
  const given = describeGiven(message.meta?.files);
  if (given.length) {
    const list = el("ul", "reply-files", null, { testid: "reply-files" });
    list.append(...given.map((line) => el("li", "", line)));
    const value = el("dd");
    value.append(list);
    const row = el("div");
    row.append(el("dt", "", message.meta.files.some((f) => !f.whole) ? "Passages given" : "Files given"), value);
    box.append(row);
  }
  return box;
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool" };
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
    this.earlier(null);
    this.container.replaceChildren();
    this.onChange(0);
  }

  // A window of a long branch: onEarlier() loads the messages above it when the top of the
  // list comes into view (a little before: the reader rarely waits); null: the first message
  // is shown, nothing is above.
  earlier(onEarlier) {
    this.observer?.disconnect();
    if (!onEarlier) {
      this.sentinel?.remove();
      this.sentinel = null;
      return;
    }
    if (!this.sentinel?.isConnected) {
      this.sentinel = el("p", "messages-earlier", "Loading earlier messages…", { testid: "messages-earlier" });
      this.container.prepend(this.sentinel);
    }
    // A fresh observer reports at once whether the top is in view (a short window loads on);
    // after a failure, scrolling the top into view again tries again.
    this.observer = new IntersectionObserver((entries) => {
      if (!entries.some((entry) => entry.isIntersecting)) return;
      this.sentinel.textContent = "Loading earlier messages…";
      onEarlier();
    }, { root: this.scroller, rootMargin: "600px 0px 0px 0px" });
    this.observer.observe(this.sentinel);
  }

  earlierFailed(message) {
    if (this.sentinel) this.sentinel.textContent = `Could not load earlier messages: ${message}. Scroll up to try again.`;
  }

  // Messages above those shown ([message, controls] pairs, oldest first), the reader's place
  // kept: what was on screen stays where it was, the new ones grow above it.
  prepend(items) {
    const first = this.container.querySelector('[data-testid="message"]');
    const fromBottom = this.scroller.scrollHeight - this.scroller.scrollTop;
    for (const [message, controls] of items) this.add(message, { controls, before: first });
    this.scroller.scrollTop = this.scroller.scrollHeight - fromBottom;
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
    if (message.role === "assistant" && message.finish_reason === "length" && message.status === "complete") {
      meta.append(el("span", "status cut-off", "cut off at the token limit", { testid: "cut-off" }), " · ");
    }
    meta.append(describeProvenance(message));
  }

  // controls (optional): the conversation-tree actions of this message:
  //   siblings: {position, count, prev(), next()}   the ‹ 2/3 › switcher, when it has siblings
  //   edit(text)        a user message: resend an edited copy beside it
  //   regenerate()      a reply: another one beside it
  //   continue()        a reply cut off by the token limit, a stop or an interruption
  // before: the node to insert it above (prepend); else it goes at the end.
  add(message, { follow = true, controls = null, before = null } = {}) {
    const labelId = `message-label-${++labelCount}`;
    const node = el("article", "message", null, { testid: "message", "aria-labelledby": labelId });
    node.dataset.role = message.role;
    node.dataset.status = message.status ?? "complete";
    if (message.id) node.dataset.messageId = message.id;
    // Screen readers announce each message with who wrote it.
    const label = el("div", "role-label", null, { id: labelId });
    label.append(icon(message.role === "user" ? "user" : "spark", { size: 16 }),
      el("span", "role-name", ROLE_NAMES[message.role] ?? message.role));
    if (message.role === "assistant" && message.model) label.append(modelChip(message.model, message.engine, message.quantization));
    const body = el("div", "body");
    // A reply made under a JSON schema shows as formatted JSON, checked against it.
    if (message.role === "assistant") {
      if (!renderStructured(body, message)) renderMarkdown(body, message.content);
    } else if (message.role !== "tool") {
      body.textContent = message.content; // what the user typed is shown as typed
    }
    // A tool step: the calls a reply made, or a tool's result, as blocks that fold (text only).
    const steps = toolBlocksOf(message);
    if (steps.length) body.append(el("div", "tool-steps", null, { testid: "tool-steps" }));
    body.querySelector(".tool-steps")?.append(...steps);
    texts.set(node, message.content ?? "");
    const files = message.attachments?.length ? fileChips(message.attachments) : null;
    const actions = el("div", "message-actions");
    const copy = iconButton("copy", "Copy message", {
      testid: "copy", ui: true, onClick: () => copyWithFeedback(copy, texts.get(node) ?? ""),
    });
    actions.append(copy);
    node.append(label, body, ...(files ? [files] : []), el("div", "meta"), actions);
    if (controls) this.addControls(node, message, controls);
    this.setMeta(node, message);
    if (before) {
      this.container.insertBefore(node, before);
      this.onChange(this.count);
      return node;
    }
    this.container.append(node);
    this.onChange(this.count);
    this.scrollToEnd({ force: follow });
    return node;
  }

  addControls(node, message, controls) {
    const actions = node.querySelector(".message-actions");
    const button = (name, label, testid, onClick) => actions.appendChild(iconButton(name, label, { testid, onClick, ui: true }));
    if (controls.edit) button("pencil", "Edit and resend", "edit", () => this.editInline(node, message, controls.edit));
    if (controls.regenerate) button("refresh", "Regenerate this reply", "regenerate", controls.regenerate);
    if (controls.continue) button("forward", "Continue this reply", "continue", controls.continue);
    const options = message.meta?.options;
    if (message.role === "assistant" && options) {
      const info = button("info", "How this reply was made", "reply-options", () => {
        const open = node.querySelector(".reply-options");
        info.setAttribute("aria-expanded", String(!open));
        if (open) {
          open.remove();
        } else {
          const box = describeOptions(options, message);
          node.insertBefore(box, actions.nextSibling);
          box.scrollIntoView({ block: "nearest" });
        }
      });
      info.setAttribute("aria-expanded", "false");
    }
    const siblings = controls.siblings;
    if (siblings && siblings.count > 1) {
      const nav = el("div", "branch-nav", null, { role: "group", "aria-label": "Versions of this message" });
      const prev = iconButton("chevron-left", "Previous version", { testid: "branch-prev", onClick: siblings.prev, ui: true });
      const next = iconButton("chevron", "Next version", { testid: "branch-next", onClick: siblings.next, ui: true });
      prev.disabled = siblings.position <= 1;
      next.disabled = siblings.position >= siblings.count;
      const pos = el("span", "branch-pos", `${siblings.position}/${siblings.count}`, { testid: "branch-pos" });
      nav.append(prev, pos, next);
      actions.prepend(nav);
    }
  }

  // Edit in place: the message becomes a text box; "Send" stores the new text as a sibling
  // (the old one stays reachable with ‹ ›).
  editInline(node, message, onSend) {
    if (node.querySelector(".edit-box")) return;
    const body = node.querySelector(".body");
    const box = el("form", "edit-box");
    const area = el("textarea", "text-input", null, { value: message.content, "aria-label": "Edited message", testid: "edit-text",
                                                      rows: Math.min(12, Math.max(2, message.content.split("\n").length)) });
    const send = el("button", "button primary", "Send", { type: "submit", testid: "edit-send" });
    const cancel = el("button", "button", "Cancel", { type: "button" });
    const close = () => {
      box.remove();
      body.hidden = false;
    };
    cancel.addEventListener("click", close);
    box.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!area.value.trim()) return;
      close();
      onSend(area.value);
    });
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        close();
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        box.requestSubmit();
      }
    });
    const buttons = el("div", "edit-actions");
    buttons.append(cancel, send);
    box.append(area, buttons);
    body.hidden = true;
    body.after(box);
    area.focus();
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
      // A tool call of this reply is running (tool_call), or has run (tool_result).
      tool: (frame) => {
        let box = node.querySelector(".live-tools");
        if (!box) {
          box = el("div", "tool-steps live-tools", null, { testid: "tool-steps" });
          node.querySelector(".body").after(box);
        }
        const key = String(frame.index);
        let block = box.querySelector(`[data-index="${key}"]`);
        if (!block) {
          block = liveToolBlock(frame);
          block.dataset.index = key;
          box.append(block);
        }
        if (frame.type === "tool_result") fillToolBlock(block, frame);
        this.scrollToEnd();
      },
      loading: (progress) => {
        node.querySelector(".meta").textContent = progress?.phase === "reading"
          ? `reading the conversation: ${progress.processed}/${progress.total} tokens…`
          : "loading the model in this browser…";
      },
      settle: (message) => {
        renderer.finish(message.content);
        renderStructured(node.querySelector(".body"), message);
        texts.set(node, message.content ?? "");
        node.dataset.status = message.status;
        if (message.id) node.dataset.messageId = message.id;
        this.setMeta(node, message);
        this.scrollToEnd();
      },
    };
  }
}
