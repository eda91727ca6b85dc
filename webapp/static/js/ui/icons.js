// Inline SVG icons, drawn here rather than taken from an emoji font (which a server or a phone
// may not have: 🔗 showed as a box). Stroked with currentColor so they follow the theme.
// Elements with data-icon="name" in the templates get theirs filled in by fillIcons().

const SVG = "http://www.w3.org/2000/svg";

// name -> shapes, each [tag, attributes]; a 24×24 box, 2px strokes.
const SHAPES = {
  menu: [["path", { d: "M4 6h16M4 12h16M4 18h16" }]],
  plus: [["path", { d: "M12 5v14M5 12h14" }]],
  search: [["circle", { cx: 11, cy: 11, r: 7 }], ["path", { d: "m20 20-3.5-3.5" }]],
  sun: [["circle", { cx: 12, cy: 12, r: 4 }],
    ["path", { d: "M12 2v2M12 20v2M4.9 4.9l1.4 1.4M17.7 17.7l1.4 1.4M2 12h2M20 12h2M4.9 19.1l1.4-1.4M17.7 6.3l1.4-1.4" }]],
  moon: [["path", { d: "M20 14.5A8 8 0 0 1 9.5 4a8 8 0 1 0 10.5 10.5z" }]],
  copy: [["rect", { x: 9, y: 9, width: 11, height: 11, rx: 2 }],
    ["path", { d: "M5 15H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1h10a1 1 0 0 1 1 1v1" }]],
  check: [["path", { d: "m5 12 5 5L20 7" }]],
  pencil: [["path", { d: "M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4z" }]],
  trash: [["path", { d: "M3 6h18M8 6V4h8v2M6 6l1 14h10l1-14" }]],
  link: [["path", { d: "M10 14a4 4 0 0 0 5.7 0l3-3a4 4 0 0 0-5.7-5.7l-1 1" }],
    ["path", { d: "M14 10a4 4 0 0 0-5.7 0l-3 3a4 4 0 0 0 5.7 5.7l1-1" }]],
  download: [["path", { d: "M12 3v12M7 10l5 5 5-5M4 20h16" }]],
  upload: [["path", { d: "M12 16V4M7 9l5-5 5 5M4 20h16" }]],
  sliders: [["path", { d: "M4 6h10M18 6h2M4 12h4M12 12h8M4 18h12M20 18h0" }],
    ["circle", { cx: 16, cy: 6, r: 2 }], ["circle", { cx: 10, cy: 12, r: 2 }],
    ["circle", { cx: 18, cy: 18, r: 2 }]],
  send: [["path", { d: "M12 19V5M5 12l7-7 7 7" }]],
  stop: [["rect", { x: 6, y: 6, width: 12, height: 12, rx: 2 }]],
  x: [["path", { d: "M6 6l12 12M18 6 6 18" }]],
  keyboard: [["rect", { x: 2, y: 6, width: 20, height: 12, rx: 2 }],
    ["path", { d: "M6 10h0M10 10h0M14 10h0M18 10h0M7 14h10" }]],
  user: [["circle", { cx: 12, cy: 8, r: 4 }], ["path", { d: "M4 21a8 8 0 0 1 16 0" }]],
  spark: [["path", { d: "M12 3l1.8 5.2L19 10l-5.2 1.8L12 17l-1.8-5.2L5 10l5.2-1.8z" }],
    ["path", { d: "M19 16l.7 2 2 .7-2 .7-.7 2-.7-2-2-.7 2-.7z" }]],
  chat: [["path", { d: "M21 12a8 8 0 0 1-11.6 7.1L4 20l1-4.6A8 8 0 1 1 21 12z" }]],
  alert: [["path", { d: "M12 3 2 20h20z" }], ["path", { d: "M12 10v4M12 17h0" }]],
  chevron: [["path", { d: "m9 6 6 6-6 6" }]],
  "chevron-left": [["path", { d: "m15 6-6 6 6 6" }]],
  refresh: [["path", { d: "M20 11a8 8 0 1 0-2.3 5.7" }], ["path", { d: "M20 4v7h-7" }]],
  forward: [["path", { d: "M5 12h12M13 7l5 5-5 5" }]],
  info: [["circle", { cx: 12, cy: 12, r: 9 }], ["path", { d: "M12 11v6M12 7.5h0" }]],
  brain: [["path", { d: "M9 4a3 3 0 0 0-3 3 3 3 0 0 0-2 5 3 3 0 0 0 2 5 3 3 0 0 0 6 1V5a3 3 0 0 0-3-1z" }],
    ["path", { d: "M15 4a3 3 0 0 1 3 3 3 3 0 0 1 2 5 3 3 0 0 1-2 5 3 3 0 0 1-6 1" }]],
  more: [["path", { d: "M5 12h0M12 12h0M19 12h0", "stroke-width": 3 }]],
  columns: [["rect", { x: 3, y: 4, width: 18, height: 16, rx: 2 }], ["path", { d: "M12 4v16" }]],
  gauge: [["path", { d: "M4 18a8 8 0 1 1 16 0" }], ["path", { d: "M12 14l4-5" }]],
  key: [["circle", { cx: 8, cy: 14, r: 4 }], ["path", { d: "M11 11l8-8M16 6l3 3" }]],
  layers: [["path", { d: "M12 3 3 8l9 5 9-5z" }], ["path", { d: "m3 13 9 5 9-5" }]],
  paperclip: [["path", { d: "M21 11.5 12.5 20a5 5 0 0 1-7-7l8.5-8.5a3.3 3.3 0 0 1 4.7 4.7L10.2 17.7a1.7 1.7 0 0 1-2.4-2.4L15.5 7.6" }]],
  file: [["path", { d: "M14 3H6v18h12V7z" }], ["path", { d: "M14 3v4h4M9 13h6M9 17h6" }]],
};

// An SVG element (icons, the benchmark's charts) with its attributes and text.
export function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function icon(name, { size = 18 } = {}) {
  const node = svg("svg", { viewBox: "0 0 24 24", width: size, height: size, "aria-hidden": "true", focusable: "false",
                            class: "icon" });
  node.append(...(SHAPES[name] ?? []).map(([tag, attributes]) => svg(tag, attributes)));
  return node;
}

export function fillIcons(root = document) {
  for (const slot of root.querySelectorAll("[data-icon]")) {
    if (slot.querySelector("svg")) continue;
    slot.prepend(icon(slot.dataset.icon, { size: Number(slot.dataset.iconSize) || 18 }));
  }
}

// A button with an icon and an accessible name; the name shows as a tooltip too. ui: the
// button sits among a message's own content and is marked as the page's (see render.js).
export function iconButton(name, label, { testid, className = "icon-button", onClick, ui = false } = {}) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.title = label;
  button.setAttribute("aria-label", label);
  if (testid) button.dataset.testid = testid;
  if (ui) button.dataset.ui = "";
  button.append(icon(name, { size: 16 }));
  if (onClick) button.addEventListener("click", onClick);
  return button;
}

// Copy text and show a tick on the button for a moment; says so on failure.
export async function copyWithFeedback(button, text) {
  let ok = true;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    ok = false;
  }
  const label = button.getAttribute("aria-label");
  button.replaceChildren(icon(ok ? "check" : "x", { size: 16 }));
  button.setAttribute("aria-label", ok ? "Copied" : "Could not copy");
  button.dataset.copied = String(ok);
  setTimeout(() => {
    button.replaceChildren(icon("copy", { size: 16 }));
    button.setAttribute("aria-label", label);
    delete button.dataset.copied;
  }, 1500);
  return ok;
}
