// The context meter: how much of the model's context the conversation fills. The last stored
// reply's usage (prompt + completion tokens) is what the model saw; a message being typed adds
// an estimate. Past 80% it warns, past 100% the server will leave older messages out.

import { compactCount, count } from "../format.js";

export class ContextMeter {
  constructor(element, { contextLength }) {
    this.element = element;
    this.fill = element.querySelector(".meter-fill");
    this.text = element.querySelector(".meter-text");
    this.contextLength = contextLength;
    this.used = 0;
    this.pending = 0;
    this.update();
  }

  reset() {
    this.used = 0;
    this.update();
  }

  // From a stored reply: the tokens the model had in view when it finished.
  fromMessage(message) {
    const usage = message?.usage ?? {};
    const total = (usage.prompt_tokens ?? 0) + (usage.completion_tokens ?? 0);
    if (total > 0) this.used = total;
    this.update();
  }

  fromMessages(messages) {
    this.used = 0;
    for (const message of messages) if (message.role === "assistant") this.fromMessage(message);
    this.update();
  }

  update(pending = this.pending) {
    this.pending = pending;
    const limit = this.contextLength();
    const total = this.used + pending;
    const el = this.element;
    el.hidden = !limit;
    if (!limit) return;
    const share = total / limit;
    const level = share > 1 ? "full" : share > 0.8 ? "warn" : "ok";
    el.dataset.level = level;
    el.dataset.used = String(total);
    el.setAttribute("aria-valuemax", String(limit));
    el.setAttribute("aria-valuenow", String(Math.min(total, limit)));
    const words = `${count(total)} of ${count(limit)} context tokens`;
    el.setAttribute("aria-valuetext", words);
    el.title = level === "ok" ? words
      : `${words}: older messages will be left out for the model to see the rest`;
    this.fill.dataset.pct = String(Math.min(100, Math.ceil((share * 100) / 5) * 5));
    this.text.textContent = `${compactCount(total)} / ${compactCount(limit)}`;
  }
}
