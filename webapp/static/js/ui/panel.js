// A large in-page panel (a modal <dialog> with a title and a close button) and the small DOM
// helpers the compare, benchmark and API key panels share.
import { ApiError } from "../api.js";
import { iconButton } from "./icons.js";

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// A labelled control: <label class="field"><span class="field-label">…</span>control</label>
export function field(label, control) {
  const wrap = el("label", "field");
  wrap.append(el("span", "field-label", label), control);
  return wrap;
}

export function option(value, text, selected = false) {
  const node = el("option", "", text);
  node.value = value;
  node.selected = selected;
  return node;
}

export function selectBox(label, options, testid) {
  const wrap = el("label", "select");
  const select = el("select");
  select.setAttribute("aria-label", label);
  if (testid) select.dataset.testid = testid;
  select.append(...options);
  wrap.append(select);
  return { wrap, select };
}

let panels = 0;

export function createPanel({ title, testid, className = "" }) {
  const dialog = el("dialog", `modal panel ${className}`.trim());
  dialog.dataset.testid = testid;
  const heading = el("h2", "modal-title", title);
  heading.id = `panel-title-${++panels}`;
  dialog.setAttribute("aria-labelledby", heading.id);
  const head = el("div", "panel-head");
  const close = iconButton("x", "Close", { testid: `${testid}-close`, onClick: () => dialog.close() });
  head.append(heading, close);
  const body = el("div", "panel-body");
  const alert = el("p", "panel-problem");
  alert.setAttribute("role", "alert");
  alert.dataset.testid = `${testid}-problem`;
  alert.hidden = true;
  dialog.append(head, alert, body);
  // A problem is said inside the panel: the page's banner is behind the modal.
  const problem = (message) => {
    alert.textContent = message || "";
    alert.hidden = !message;
  };
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click on the backdrop
  });
  document.body.append(dialog);
  return { dialog, body, problem, open: () => {
    problem("");
    dialog.showModal();
  } };
}

// JSON requests for the endpoints api.js has no method for (benchmarks, keys, settings).
export async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", `the server could not be reached (${err.message})`);
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data?.error?.code ?? "http_error",
      data?.error?.message ?? `${method} ${path} failed with HTTP ${response.status}`);
  }
  return data;
}
