// What the browser engine is doing: the model's size and the browser's free storage before a
// download (with a Download button), a progress bar (bytes, percent, speed) during it, and the
// backend that actually runs, as a one-line chip once the model is ready.
// Nothing downloads until the visitor asks (Download, or the first message); a large model,
// or a browser that asks to save data, is confirmed first in the page's own dialog.

import { parameters, percent, seconds, size } from "../format.js";
import { ask } from "./dialog.js";

// Above this a download is confirmed first: a phone's data plan notices 100 MiB, and the
// smallest useful chat models (SmolLM2-135M at Q8_0: 138 MiB) are already past it.
export const LARGE_DOWNLOAD_BYTES = 100 * 1024 * 1024;

// Resolves true when the model may be downloaded: at once for a small one, else when the
// visitor confirms (false when they cancel).
export async function confirmDownload(model) {
  const bytes = model.browser?.size ?? 0;
  const saveData = Boolean(navigator.connection?.saveData);
  if (!saveData && bytes <= LARGE_DOWNLOAD_BYTES) return true;
  const why = saveData ? "Your browser asks to save data. " : "";
  return Boolean(await ask({
    title: `Download ${size(bytes)}?`,
    message: `${why}${model.id} (${size(bytes)}) is downloaded once from this server and kept in ` +
      "this browser, so it can run here, on your device.",
    confirmLabel: `Download ${size(bytes)}`,
    testid: "download-dialog",
  }));
}

export class BrowserStatus {
  // onDownload(): the visitor pressed Download.
  constructor(container, { onDownload = () => {} } = {}) {
    this.container = container;
    this.text = container.querySelector('[data-testid="browser-status-text"]');
    this.progress = container.querySelector('[data-testid="model-progress"]');
    this.download = container.querySelector('[data-testid="model-download"]');
    this.toggle = container.querySelector('[data-testid="browser-status-toggle"]');
    this.download.addEventListener("click", () => onDownload());
    // The ready chip opens to its whole line, and closes again.
    this.toggle.addEventListener("click", () => {
      if (this.container.dataset.state === "ready") this.collapse(!("collapsed" in this.container.dataset));
    });
  }

  collapse(collapsed) {
    if (collapsed) this.container.dataset.collapsed = "";
    else delete this.container.dataset.collapsed;
    this.toggle.setAttribute("aria-expanded", String(!collapsed));
  }

  hide() {
    this.container.hidden = true;
  }

  show(text, state = "idle") {
    this.container.hidden = false;
    this.text.textContent = text;
    if (state !== "ready") this.collapse(false);
    this.container.dataset.state = state;
    if (state !== "idle") this.download.hidden = true;
  }

  // cached: the model is in this browser's storage (loading it moves no bytes); null: not
  // known yet (no Download button until it is). data-stored says which, for tests and styles.
  describe(model, loaded, { cached = null } = {}) {
    this.container.dataset.stored = cached === null ? "" : String(cached);
    if (!model) return this.hide();
    if (!model.browser) {
      this.download.hidden = true;
      return this.show(`${model.id} cannot run in the browser; pick another model or the server.`, "unavailable");
    }
    if (loaded?.modelId === model.id) return this.ready(loaded);
    this.progress.hidden = true;
    const f = model.facts ?? {};
    // The page may run another format than the server (model.browser.reason says why).
    const where = { true: " is in this browser's storage;", false: " is downloaded once, when you ask, and " +
      "kept in this browser;" }[cached] ?? "";
    this.show(`${model.id}: ${size(model.browser.size)} (${model.browser.format ?? f.quantization ?? "?"}, ` +
      `${parameters(f.parameters ?? 0)} parameters)${where} it runs on your device.`);
    this.download.hidden = cached !== false;
    this.download.textContent = `Download ${size(model.browser.size)}`;
  }

  ready(loaded) {
    const wasReady = this.container.dataset.state === "ready";
    this.progress.hidden = true;
    this.download.hidden = true;
    const where = loaded.fromCache ? "from this browser's cache" : "downloaded";
    const note = loaded.note ? ` — ${loaded.note}` : "";
    this.show(`${loaded.modelId} runs in this browser: ${loaded.backend}, ` +
      `${loaded.threads} thread${loaded.threads === 1 ? "" : "s"} (${where}, ` +
      `loaded in ${seconds(loaded.loadSeconds)})${note}`, "ready");
    // collapsed to a chip when it turns ready; a chip the reader opened stays open
    if (!wasReady) this.collapse(true);
    this.container.dataset.backend = loaded.backend;
  }

  update(model, progress) {
    if (progress.phase === "checking") {
      this.progress.hidden = true;
      const free = progress.quota != null ? size(progress.quota - progress.usage) : "unknown";
      this.show(`Preparing ${model.id} (${size(progress.size)}); this browser can store ${free} ` +
        `more for this site${progress.persisted ? ", kept persistently" : ""}.`, "loading");
    } else if (progress.phase === "downloading") {
      const fraction = progress.total ? progress.loaded / progress.total : 0;
      this.progress.hidden = false;
      this.progress.value = fraction;
      // wllama reports reading its own storage as a download too: say which it is.
      if (this.container.dataset.stored === "true") {
        this.show(`Loading ${model.id} from this browser's storage (${percent(fraction)})`, "loading");
      } else {
        this.show(`Downloading ${model.id}: ${size(progress.loaded)} of ${size(progress.total)} ` +
          `(${percent(fraction)}) at ${size(progress.bytesPerSecond)}/s`, "loading");
      }
    } else if (progress.phase === "ready") {
      this.ready(progress);
    } else if (progress.phase === "reading") {
      // The history is evaluated into the model's cache (prompt speed), not a download.
      this.progress.hidden = false;
      this.progress.value = progress.total ? progress.processed / progress.total : 0;
      this.show(`Reading the conversation: ${progress.processed}/${progress.total} tokens`, "loading");
    }
  }
}
