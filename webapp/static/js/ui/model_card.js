// The model picker's entries and the welcome state's model card: what will answer, and where
// it runs.
import { count, parameters, size } from "../format.js";
import { icon } from "./icons.js";
import { factRows, option } from "./panel.js";

export function modelOption(m) {
  const f = m.facts ?? {};
  const bytes = f.file_size ? ` · ${size(f.file_size)}` : "";
  return option(m.id, `${m.id}${f.quantization ? ` (${f.quantization}${bytes})` : ""}`);
}

// card: the card's element (with the name and facts inside); model: its /api/models entry.
export function showModelCard(card, model, { contextLength, engine }) {
  if (!model) {
    card.hidden = true;
    return;
  }
  const f = model.facts ?? {};
  const name = card.querySelector('[data-testid="model-card-name"]');
  name.replaceChildren(icon("spark", { size: 18 }), f.name && f.name !== model.id ? `${f.name} (${model.id})` : model.id);
  const facts = [
    ["Parameters", f.parameters ? parameters(f.parameters) : null],
    ["Quantisation", f.quantization],
    ["Size", f.file_size ? size(f.file_size) : null],
    ["Context", contextLength ? `${count(contextLength)} tokens` : null],
    ["Runs", engine === "browser" ? "in this browser" : `on the server${model.served_by && model.served_by !== "llamacpp" ? ` (${model.served_by})` : ""}`],
  ].filter(([, value]) => value);
  card.querySelector('[data-testid="model-facts"]').replaceChildren(...factRows(facts));
  card.hidden = false;
}
