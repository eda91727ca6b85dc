// The model picker's entries and the welcome state's model card: what will answer, and where
// it runs.
import { icon } from "./icons.js";

const MiB = 2 ** 20;

function size(bytes) {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${Math.round(bytes / MiB)} MiB`;
}

function parameterCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(n >= 1e10 ? 0 : 1)}B`;
  if (n >= 1e6) return `${Math.round(n / 1e6)}M`;
  if (n >= 1e3) return `${Math.round(n / 1e3)}K`;
  return `${n}`;
}

export function modelOption(m) {
  const option = document.createElement("option");
  option.value = m.id;
  const f = m.facts ?? {};
  const bytes = f.file_size ? ` · ${(f.file_size / MiB).toFixed(0)} MiB` : "";
  option.textContent = `${m.id}${f.quantization ? ` (${f.quantization}${bytes})` : ""}`;
  return option;
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
    ["Parameters", f.parameters ? parameterCount(f.parameters) : null],
    ["Quantisation", f.quantization],
    ["Size", f.file_size ? size(f.file_size) : null],
    ["Context", contextLength ? `${contextLength.toLocaleString("en")} tokens` : null],
    ["Runs", engine === "browser" ? "in this browser" : `on the server${model.served_by && model.served_by !== "llamacpp" ? ` (${model.served_by})` : ""}`],
  ].filter(([, value]) => value);
  card.querySelector('[data-testid="model-facts"]').replaceChildren(...facts.map(([term, value]) => {
    const row = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    row.append(dt, dd);
    return row;
  }));
  card.hidden = false;
}
