// The composer's limits, said before sending rather than enforced by cutting: a counter near
// the server's character limit, and a note when the message (with the reply asked for) cannot
// fit the model's context, or will push older messages out of it, or when its files are larger
// than the context holds (the model is then given their most relevant passages). Sending is
// blocked only for what the server or the model would refuse.
import { count } from "../format.js";

// Rough tokens for text not yet tokenised: ~4 characters a token in English prose, fewer for
// code and other scripts. Blocking uses the optimistic estimate, warning the cautious one.
const CHARS_PER_TOKEN = { optimistic: 4, cautious: 3 };
// The share of the context (after the reply's room) a branch's files may fill before the
// server gives only their most relevant passages (webapp/attachments.py FILES_SHARE).
const FILES_SHARE = 0.5;

export class Composer {
  constructor(textarea, { counter, note, maxChars, contextLength, replyTokens, usedTokens, onChange,
                          fileTokens = () => 0 }) {
    Object.assign(this, { textarea, counter, note, maxChars, contextLength, replyTokens, usedTokens, onChange,
                          fileTokens });
    this.canSend = false;
    this.estimate = 0;
    this.autoSize = !CSS.supports("field-sizing", "content");
    textarea.addEventListener("input", () => this.changed());
  }

  // Grows with its text up to the CSS max-height (rows, not a style attribute: the CSP).
  resize() {
    if (!this.autoSize) return;
    const t = this.textarea;
    t.rows = 1;
    while (t.scrollHeight > t.clientHeight && t.rows < 12) t.rows += 1;
  }

  changed() {
    const text = this.textarea.value;
    const length = text.length;
    this.estimate = Math.ceil(length / CHARS_PER_TOKEN.cautious);
    this.resize();
    const problem = this.problem(text);
    this.canSend = Boolean(text.trim()) && !problem?.blocks;
    this.counter.hidden = length < this.maxChars * 0.8;
    this.counter.textContent = `${count(length)} / ${count(this.maxChars)}`;
    this.counter.dataset.level = length > this.maxChars ? "over" : "warn";
    this.note.hidden = !problem;
    this.note.textContent = problem?.message ?? "";
    this.note.dataset.level = problem?.blocks ? "over" : "warn";
    this.textarea.setAttribute("aria-invalid", String(Boolean(problem?.blocks)));
    this.onChange();
  }

  problem(text) {
    const length = text.length;
    if (length > this.maxChars) {
      return { blocks: true, message: `This message is ${count(length)} characters; the most ` +
        `this server takes is ${count(this.maxChars)}. Shorten it by ` +
        `${count(length - this.maxChars)} to send it.` };
    }
    const limit = this.contextLength();
    if (!limit || !length) return null;
    const reply = Math.min(this.replyTokens(), Math.floor(limit / 2));
    const least = Math.ceil(length / CHARS_PER_TOKEN.optimistic);
    if (least + reply > limit) {
      return { blocks: true, message: `This message is about ${count(least)} tokens: with room ` +
        `for a ${count(reply)}-token reply it cannot fit the model's context of ` +
        `${count(limit)} tokens. Shorten it (or lower Max reply tokens) to send it.` };
    }
    const files = this.fileTokens();
    if (files > Math.floor((limit - Math.min(this.replyTokens(), Math.floor(limit / 4))) * FILES_SHARE)) {
      return { blocks: false, message: `These files are about ${count(files)} tokens, more than the ` +
        "model's context can hold: it will be given the passages most relevant to your message " +
        "(the reply's info button lists them)." };
    }
    const after = this.usedTokens() + Math.ceil(length / CHARS_PER_TOKEN.cautious) + reply;
    if (after > limit) {
      return { blocks: false, message: "This conversation is near the model's context limit: the oldest " +
        "messages will be left out of what the model sees. A new chat starts with a clear context." };
    }
    return null;
  }

  // Before sending: false (and the note shown) when the message cannot be sent.
  check() {
    this.changed();
    if (this.canSend) return true;
    this.textarea.focus();
    return false;
  }
}
