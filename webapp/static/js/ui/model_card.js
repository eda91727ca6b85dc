// The model picker's entries, the welcome state's model card, and a reply's model name with
// its facts a tap away: what answers, and where it runs. People see a model's display name
// (/api/models display_name: the admin's, or one made from the file); the id stays what the
// API and the stored messages use.
import { count, parameters, size } from "../format.js";
import { modelInfo } from "../state.js";
import { icon } from "./icons.js";
import { el, factRows, option } from "./panel.js";

export function displayName(id) {
  return modelInfo(id)?.display_name ?? id;
}

// The name with the quantisation the engine really ran (a page runs its own copy, Q8_0 by
// default, where the name says the server file's Q4_1); `ran`: the one a stored reply says.
export function runName(id, engine, ran = null) {
  const info = modelInfo(id);
  const name = displayName(id);
  const served = info?.facts?.quantization;
  const actual = ran ?? runFacts(info, engine).quantization;
  return served && actual && actual !== served && name.endsWith(` · ${served}`)
    ? `${name.slice(0, -served.length)}${actual}` : name;
}

// The facts of the file `engine` runs: pages run their own copy (/api/models "browser": the
// Q8_0 derived for WASM by default), the server the file as configured.
export function runFacts(model, engine) {
  const f = model?.facts ?? {};
  if (engine !== "browser" || !model?.browser) return f;
  const b = model.browser;
  return { ...f, quantization: b.format, file_size: b.size, bits_per_weight: b.bits_per_weight,
           file_name: b.url ? decodeURIComponent(b.url.split("/").pop()) : f.file_name };
}

export function modelOption(m) {
  return option(m.id, displayName(m.id));
}

function factList(model, { contextLength = null, engine = "server" } = {}) {
  const f = runFacts(model, engine);
  return [
    ["File", f.file_name ?? model?.id],
    ["Quantisation", f.quantization ? `${f.quantization}${f.bits_per_weight ? ` (${f.bits_per_weight.toFixed(2)} bits/weight)` : ""}` : null],
    ["Size", f.file_size ? size(f.file_size) : null],
    ["Parameters", f.parameters ? parameters(f.parameters) : null],
    ["Context", contextLength ? `${count(contextLength)} tokens` : f.context_length ? `${count(f.context_length)} tokens` : null],
    ["Runs", engine === "browser" ? "in this browser" : `on the server${model?.served_by && model.served_by !== "llamacpp" ? ` (${model.served_by})` : ""}`],
  ].filter(([, value]) => value);
}

// card: the card's element (with the name and facts inside); model: its /api/models entry.
export function showModelCard(card, model, { contextLength, engine }) {
  if (!model) {
    card.hidden = true;
    return;
  }
  const name = card.querySelector('[data-testid="model-card-name"]');
  name.replaceChildren(icon("spark", { size: 18 }), displayName(model.id));
  card.querySelector('[data-testid="model-facts"]').replaceChildren(...factRows(factList(model, { contextLength, engine })));
  card.hidden = false;
}

// A reply's model: its display name, a button that shows the file's facts below it (once per
// reply: the provenance line leaves the name out). engine: the engine that wrote the reply.
export function modelChip(id, engine = "server", ran = null) {
  const wrap = el("span", "role-model");
  const button = el("button", "model-chip", runName(id, engine, ran), { type: "button", testid: "model-chip",
                    "aria-expanded": "false", title: `${id}: tap for the model's facts` });
  button.dataset.ui = "";
  const facts = el("dl", "model-chip-facts", null, { testid: "model-chip-facts", hidden: true });
  const show = (open) => {
    if (open) facts.replaceChildren(...factRows(factList(modelInfo(id) ?? { id }, { engine })));
    facts.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    // Like the page's menus: a click elsewhere or Escape closes it.
    if (open) setTimeout(() => document.addEventListener("click", outside, { capture: true }));
    else document.removeEventListener("click", outside, { capture: true });
  };
  const outside = (event) => {
    if (!wrap.contains(event.target)) show(false);
  };
  button.addEventListener("click", () => show(facts.hidden));
  wrap.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !facts.hidden) {
      event.stopPropagation(); // not the page's Escape (stop a reply, close the drawer)
      show(false);
      button.focus();
    }
  });
  wrap.append(button, facts);
  return wrap;
}
