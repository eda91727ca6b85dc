// What the browser engine is doing: the model's size and the browser's free storage before a
// download, a progress bar (bytes, percent, speed) during it, and the backend that actually runs.

import { parameters, percent, seconds, size } from "../format.js";

export class BrowserStatus {
  constructor(container) {
    this.container = container;
    this.text = container.querySelector('[data-testid="browser-status-text"]');
    this.progress = container.querySelector('[data-testid="model-progress"]');
  }

  hide() {
    this.container.hidden = true;
  }

  show(text) {
    this.container.hidden = false;
    this.text.textContent = text;
  }

  describe(model, loaded) {
    if (!model) return this.hide();
    if (!model.browser) {
      return this.show(`${model.id} cannot run in the browser; pick another model or the server.`);
    }
    if (loaded?.modelId === model.id) return this.ready(loaded);
    this.progress.hidden = true;
    const f = model.facts ?? {};
    // The page may run another format than the server (model.browser.reason says why).
    this.show(`${model.id}: ${size(model.browser.size)} (${model.browser.format ?? f.quantization ?? "?"}, ` +
      `${parameters(f.parameters ?? 0)} parameters) is downloaded once from this ` +
      "server and kept in this browser; it runs here, on your device.");
  }

  ready(loaded) {
    this.progress.hidden = true;
    const where = loaded.fromCache ? "from this browser's cache" : "downloaded";
    const note = loaded.note ? ` — ${loaded.note}` : "";
    this.show(`${loaded.modelId} runs in this browser: ${loaded.backend}, ` +
      `${loaded.threads} thread${loaded.threads === 1 ? "" : "s"} (${where}, ` +
      `loaded in ${seconds(loaded.loadSeconds)})${note}`);
    this.container.dataset.backend = loaded.backend;
  }

  update(model, progress) {
    if (progress.phase === "checking") {
      this.progress.hidden = true;
      const free = progress.quota != null ? size(progress.quota - progress.usage) : "unknown";
      this.show(`Preparing ${model.id} (${size(progress.size)}); this browser can store ${free} ` +
        `more for this site${progress.persisted ? ", kept persistently" : ""}.`);
    } else if (progress.phase === "downloading") {
      const fraction = progress.total ? progress.loaded / progress.total : 0;
      this.progress.hidden = false;
      this.progress.value = fraction;
      this.show(`Downloading ${model.id}: ${size(progress.loaded)} of ${size(progress.total)} ` +
        `(${percent(fraction)}) at ${size(progress.bytesPerSecond)}/s`);
    } else if (progress.phase === "ready") {
      this.ready(progress);
    } else if (progress.phase === "reading") {
      // The history is evaluated into the model's cache (prompt speed), not a download.
      this.progress.hidden = false;
      this.progress.value = progress.total ? progress.processed / progress.total : 0;
      this.show(`Reading the conversation: ${progress.processed}/${progress.total} tokens`);
    }
  }
}
