// A large in-page panel (a modal <dialog> with a title and a close button) and the small DOM
// helpers the page's views share.
import { iconButton } from "./icons.js";

// props: the element's properties (type, rows, hidden, …) and ARIA attributes (role, aria-*);
// testid becomes data-testid.
export function el(tag, className, text, { testid, ...props } = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  if (testid) node.dataset.testid = testid;
  for (const [name, value] of Object.entries(props)) {
    if (name === "role" || name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  return node;
}

// A labelled control: <label class="field"><span class="field-label">…</span>control</label>
export function field(label, control, extraClass = "") {
  const wrap = el("label", `field ${extraClass}`.trim());
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

// The rows of a <dl>: [term, value, figure?] each, a missing value left out.
export function factRows(rows) {
  return rows.filter(([, value]) => value !== null && value !== undefined).map(([term, value, figure]) => {
    const row = el("div");
    if (figure) row.dataset.figure = figure;
    row.append(el("dt", "", term), el("dd", "", String(value)));
    return row;
  });
}

// A table with a header row of `columns`, in a box that scrolls it sideways on a phone.
export function dataTable(className, columns, testid) {
  const table = el("table", `data-table ${className}`, null, { testid });
  const head = el("tr");
  head.append(...columns.map((name) => el("th", "", name)));
  table.createTHead().append(head);
  table.createTBody();
  const scroll = el("div", "table-scroll");
  scroll.append(table);
  return { table, scroll };
}

let panels = 0;

// opener: the menu item that opens it (and closes its menu); onOpen(): what follows opening.
export function createPanel({ title, testid, className = "", opener, onOpen }) {
  const titleId = `panel-title-${++panels}`;
  const dialog = el("dialog", `modal panel ${className}`.trim(), null, { testid, "aria-labelledby": titleId });
  const head = el("div", "panel-head");
  const close = iconButton("x", "Close", { testid: `${testid}-close`, onClick: () => dialog.close() });
  head.append(el("h2", "modal-title", title, { id: titleId }), close);
  const body = el("div", "panel-body");
  const alert = el("p", "panel-problem", null, { role: "alert", testid: `${testid}-problem`, hidden: true });
  dialog.append(head, alert, body);
  // A problem is said inside the panel: the page's banner is behind the modal.
  const problem = (message) => {
    alert.textContent = message || "";
    alert.hidden = !message;
  };
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click on the backdrop
  });
  opener.addEventListener("click", () => {
    opener.closest("details")?.removeAttribute("open");
    problem("");
    dialog.showModal();
    onOpen();
  });
  document.body.append(dialog);
  return { dialog, body, problem };
}
