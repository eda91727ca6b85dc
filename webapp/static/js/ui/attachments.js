// Files for the next message: picked (the paperclip), dropped on the composer or pasted into
// it. Each uploads at once (the server extracts its text: webapp/attachments.py) and shows as
// a chip with its size in tokens and a × that takes it back; the context meter counts them.
// A file over the server's limit, or an image for a model that does not take images (the
// models listing's `images`: a vision upstream's do; the page's engine never does), is
// refused before any byte is sent. The sent message shows its files as chips too
// (fileChips), an image as a thumbnail served to its owner only.
import { api } from "../api.js";
import { count, size } from "../format.js";
import { icon, iconButton } from "./icons.js";
import { el } from "./panel.js";

const IMAGE = /^image\//;
const IMAGE_NAME = /\.(png|jpe?g|gif|webp|bmp|heic|avif|svg|tiff?|ico)$/i;
// The images a model can be sent (webapp/images.py TYPES); SVG never (it can carry script).
const SENDABLE = /^image\/(png|jpeg|webp|gif)$/;
const SENDABLE_NAME = /\.(png|jpe?g|gif|webp)$/i;
const KINDS = "text, code, Markdown, CSV, JSON, HTML or PDF";
const IMAGE_KINDS = "PNG, JPEG, WebP or GIF";
// Image types as people say them: "PNG, JPEG or GIF".
function kinds(types) {
  const names = types.map((type) => type.split("/")[1].toUpperCase().replace("WEBP", "WebP"));
  return names.length > 1 ? `${names.slice(0, -1).join(", ")} or ${names.at(-1)}` : names[0];
}
// A file's image type, from what the browser says or else its name.
function imageType(file) {
  if (SENDABLE.test(file.type)) return file.type;
  const ext = SENDABLE_NAME.exec(file.name)?.[1].toLowerCase();
  return ext ? `image/${ext === "jpg" ? "jpeg" : ext}` : null;
}
// Why an image cannot go with a message to `model`: `reason` as the models listing gives it.
export function noImages(model, reason = "it does not take images") {
  return `Images can't be used with ${model || "the models here"}: ${reason} ` +
    `(no vision). Attach ${KINDS} files.`;
}

// A file's chip: its name and tokens; with onRemove, a × (the composer's, before sending).
export function fileChip(file, { onRemove = null, state = "ready" } = {}) {
  const chip = el("li", "file-chip", null, { testid: "file-chip" });
  chip.dataset.state = state;
  const name = el("span", "file-name", file.filename ?? file.name);
  name.title = file.filename ?? file.name;
  const image = file.width != null;
  const facts = state === "uploading" ? "reading…"
    : image ? `${file.width}×${file.height} · ~${count(file.tokens ?? 0)} tokens`
      : `${count(file.tokens ?? 0)} tokens${file.pages ? ` · ${file.pages} p.` : ""}`;
  const picture = image ? thumbnail(file) : icon("file", { size: 14 });
  chip.append(picture, name, el("span", "file-size", facts));
  if (onRemove) {
    chip.append(iconButton("x", `Remove ${file.filename ?? file.name}`, {
      testid: "file-remove", className: "icon-button file-remove", onClick: onRemove, ui: true,
    }));
  }
  return chip;
}

// An image's thumbnail, from the server (GET /api/attachments/<id>/content: its owner only).
function thumbnail(file) {
  const img = el("img", "file-thumb", null, { testid: "file-thumb" });
  img.alt = "";
  img.loading = "lazy";
  img.src = `/api/attachments/${encodeURIComponent(file.id)}/content`;
  return img;
}

// A sent message's files, read-only.
export function fileChips(files) {
  const list = el("ul", "file-chips sent", null, { testid: "message-files", "aria-label": "Attached files" });
  list.append(...files.map((file) => fileChip(file)));
  return list;
}

// What a reply was given of the files (meta.files), grouped by file: "notes.md (whole)",
// "report.pdf: pages 2, 3", "log.txt: lines 1-40, 290-330".
export function describeGiven(given) {
  const byFile = new Map();
  for (const part of given ?? []) {
    const key = part.id ?? part.file;
    if (!byFile.has(key)) byFile.set(key, { name: part.file, whole: false, pages: [], lines: [] });
    const entry = byFile.get(key);
    if (part.whole) entry.whole = true;
    else if (part.page != null) entry.pages.push(part.page);
    else if (part.lines) entry.lines.push(part.lines[0] === part.lines[1] ? `${part.lines[0]}` : `${part.lines[0]}-${part.lines[1]}`);
  }
  return [...byFile.values()].map((f) => {
    if (f.whole) return `${f.name} (whole)`;
    const pages = [...new Set(f.pages)];
    if (pages.length) return `${f.name}: page${pages.length > 1 ? "s" : ""} ${pages.join(", ")}`;
    return `${f.name}: lines ${f.lines.join(", ")}`;
  });
}

export class Attachments {
  // list: the chips' <ul>; input: the hidden <input type=file>; button: the paperclip;
  // zone: where files may be dropped; maxBytes: the server's BCHAT_MAX_ATTACHMENT_BYTES.
  // A file dropped anywhere else on the page is not opened by the browser in its place.
  constructor({ list, input, button, zone, paste, maxBytes, onChange, onError }) {
    Object.assign(this, { list, input, button, maxBytes, onChange, onError });
    this.items = [];
    this.model = "";
    this.imagesWhy = "it does not take images"; // null: the model takes images
    button.addEventListener("click", () => input.click());
    input.addEventListener("change", () => {
      this.add([...input.files]);
      input.value = ""; // the same file can be picked again
    });
    zone.addEventListener("dragover", (event) => {
      if (![...(event.dataTransfer?.types ?? [])].includes("Files")) return;
      event.preventDefault();
      zone.dataset.dropping = "";
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) delete zone.dataset.dropping;
    });
    zone.addEventListener("drop", (event) => {
      delete zone.dataset.dropping;
      const files = [...(event.dataTransfer?.files ?? [])];
      if (!files.length) return;
      event.preventDefault();
      this.add(files);
    });
    for (const type of ["dragover", "drop"]) {
      document.addEventListener(type, (event) => {
        if ([...(event.dataTransfer?.types ?? [])].includes("Files")) event.preventDefault();
      });
    }
    paste.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData?.files ?? [])];
      if (!files.length) return; // text pastes as text
      event.preventDefault();
      this.add(files);
    });
  }

  // The model picked (its name as the page shows it), whether it takes images (the models
  // listing's `images`) and the engine: the paperclip says what it can take.
  setModel(name, { images = null, engine = "server" } = {}) {
    this.model = name;
    this.imagesWhy = engine === "browser" ? "the page's engine does not take images"
      : images?.accepted ? null : (images?.reason ?? "it does not take images");
    // the kinds it reads (an embedded model's decoder has no WebP), when not all of them
    this.imageTypes = this.imagesWhy ? null : (images?.types ?? null);
    this.button.title = this.imagesWhy
      ? `Attach files: ${KINDS} (or drop or paste them here). ${noImages(name, this.imagesWhy)}`
      : `Attach files: ${this.imageTypes ? kinds(this.imageTypes) : IMAGE_KINDS} images, ` +
        `${KINDS} (or drop or paste them here). ` +
        `${name} takes images.`;
    this.button.dataset.images = this.imagesWhy ? "no" : "yes";
  }

  // Refused here, before upload: too large, or an image the model cannot be sent.
  problem(file) {
    if (IMAGE.test(file.type) || IMAGE_NAME.test(file.name)) {
      if (this.imagesWhy) return `${file.name}: ${noImages(this.model, this.imagesWhy)}`;
      if (!SENDABLE.test(file.type) && !SENDABLE_NAME.test(file.name)) {
        return `${file.name}: this kind of image can't be sent to a model. Attach ${IMAGE_KINDS} images.`;
      }
      if (this.imageTypes && !this.imageTypes.includes(imageType(file))) {
        return `${file.name}: ${this.model} takes ${kinds(this.imageTypes)} images.`;
      }
    }
    if (file.size > this.maxBytes) {
      return `${file.name} is ${size(file.size)}; the most this server takes is ${size(this.maxBytes)}.`;
    }
    if (!file.size) return `${file.name} is empty.`;
    return null;
  }

  add(files) {
    for (const file of files) {
      const problem = this.problem(file);
      if (problem) {
        this.onError(problem);
        continue;
      }
      const item = { file, name: file.name, state: "uploading", info: null, controller: new AbortController() };
      this.items.push(item);
      item.done = api.uploadFile(file, item.controller.signal).then((info) => {
        item.info = info;
        item.state = "ready";
      }, (err) => {
        this.items = this.items.filter((other) => other !== item);
        if (err.name !== "AbortError") this.onError(`${file.name} was not attached: ${err.message}`);
      }).finally(() => this.changed());
    }
    this.changed();
  }

  remove(item) {
    this.items = this.items.filter((other) => other !== item);
    item.controller.abort();
    if (item.info) api.deleteFile(item.info.id).catch(() => {}); // unsent: gone with it
    this.changed();
  }

  // Uploads still being read: sending waits for them.
  get uploading() {
    return this.items.some((item) => item.state === "uploading");
  }

  async ready() {
    await Promise.all(this.items.map((item) => item.done));
  }

  ids() {
    return this.items.filter((item) => item.info).map((item) => item.info.id);
  }

  // The files as the sent message will show them (before the server says so).
  files() {
    return this.items.filter((item) => item.info).map((item) => item.info);
  }

  tokens() {
    return this.items.reduce((n, item) => n + (item.info?.tokens ?? 0), 0);
  }

  // Sent: the files belong to the message now.
  clear() {
    this.items = [];
    this.changed();
  }

  changed() {
    this.list.replaceChildren(...this.items.map((item) => fileChip(item.info ?? { name: item.name },
      { state: item.state, onRemove: () => this.remove(item) })));
    this.list.hidden = !this.items.length;
    this.onChange();
  }
}
