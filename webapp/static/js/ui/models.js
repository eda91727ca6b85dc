// The Models panel ("Pick your quant"): each family of models (a model and its quantised
// variants, GET /api/models/quality) as a table of what each variant costs and gains (size,
// bits per weight, ΔPPL, KL divergence and top-1 agreement from `bchat models eval`, server
// and browser tok/s) and a plot of quality against size, drawn here as SVG. The facts a class
// learns from: parameters (and for a mixture of experts, the active ones), memory estimated
// from all of them, speed from the bytes each token reads. Compare opens the compare panel
// with the family's variants on one prompt.
import { parameters, percent, rate, size } from "../format.js";
import { request } from "../api.js";
import { svg } from "./icons.js";
import { createPanel, dataTable, el, option, selectBox } from "./panel.js";

const GiB = 2 ** 30;
// A page's llama.cpp is 32-bit WebAssembly: 4 GiB is all the memory it can address.
const WASM_LIMIT = 4 * GiB;
const WEIGHTS_OVERHEAD = 1.2; // as catalogue.py: compute buffers and runtime on top of the weights

const METRICS = {
  kld: { label: "KL divergence (log scale, lower is better)", log: true, value: (q) => q?.kld,
         text: (v) => v.toPrecision(2) },
  top1: { label: "Top-1 agreement with the reference (higher is better)", log: false,
          value: (q) => q?.top1, text: (v) => percent(v) },
  delta_ppl_pct: { label: "Perplexity change (%, lower is better)", log: false,
                   value: (q) => q?.delta_ppl_pct, text: (v) => `${v >= 0 ? "+" : ""}${v.toFixed(1)}%` },
};

// The page's own fit: the browser copy plus its KV cache at the server's context, against the
// 4 GiB WASM can address and half the memory the browser says the device has (it is shared
// with the OS and the browser; navigator.deviceMemory is rounded and capped at 8).
export function browserFit(member) {
  if (!member.browser) return { fits: null, text: "not offered to browsers" };
  const context = member.fits_server?.n_ctx ?? 4096;
  const needed = member.browser.size * WEIGHTS_OVERHEAD + (member.kv_bytes_per_token ?? 0) * context;
  const device = navigator.deviceMemory ? navigator.deviceMemory * GiB / 2 : null;
  const limit = Math.min(WASM_LIMIT, device ?? WASM_LIMIT);
  const fits = needed <= limit;
  const copy = member.browser.format !== member.quantization ? `, its ${member.browser.format} copy` : "";
  return { fits, text: `${fits ? "yes" : "no"} (~${size(needed)}${copy})`,
           detail: `needs ~${size(needed)} of the ${size(limit)} a page can use here` };
}

function serverFit(member) {
  const f = member.fits_server;
  if (!f) return { fits: null, text: "–" };
  const needed = `~${size(f.memory_needed)}`;
  if (f.fits === null) return { fits: null, text: `? (${needed})`, detail: "free memory unknown" };
  return { fits: f.fits, text: `${f.fits ? "yes" : "no"} (${needed})`,
           detail: `needs ${needed} with ${f.parallel} chats of ${f.n_ctx} tokens; ${size(f.mem_available)} free now` };
}

// The newest stored benchmark run of each (engine, model): its short prompt's decode tok/s.
function benchmarkSpeeds(runs) {
  const speeds = new Map();
  for (const run of runs) { // newest first
    const key = `${run.engine}:${run.model}`;
    if (speeds.has(key)) continue;
    const result = run.results.find((r) => r.prompt === "short") ?? run.results[0];
    if (result?.decode_tps) speeds.set(key, { tps: result.decode_tps, backend: run.backend });
  }
  return speeds;
}

function familyFacts(family) {
  const total = family.parameters;
  const moe = family.experts && family.experts_used;
  const parts = [`${parameters(total)} parameters`, family.architecture];
  if (moe) {
    parts.push(`mixture of ${family.experts} experts, ${family.experts_used} used per token: ${parameters(family.active_parameters)} active`);
  }
  const note = moe
    ? "Memory follows all the parameters (every expert must be loaded); speed follows the active ones (each token reads only its experts' weights)."
    : "Dense: every parameter is loaded, and every one is read for each token, so both memory and speed follow the bits per weight.";
  // What each token reads, for the lightest and heaviest variant: decode speed is about the
  // memory bandwidth divided by it.
  const reads = family.members.map((m) => m.bytes_per_token).filter(Number.isFinite);
  const lo = family.members.find((m) => m.bytes_per_token === Math.min(...reads));
  const hi = family.members.find((m) => m.bytes_per_token === Math.max(...reads));
  const speed = lo && hi && lo !== hi
    ? ` Each token reads ~${size(lo.bytes_per_token)} of weights at ${lo.quantization}, ~${size(hi.bytes_per_token)} at ${hi.quantization}: decode speed is roughly memory bandwidth divided by that.`
    : "";
  return { line: parts.filter(Boolean).join(" · "), note: note + speed };
}

// Quality against size: one point per measured variant, labelled with its type.
export function qualityPlot(family, metric, width = 560) {
  const spec = METRICS[metric];
  const points = family.members
    .map((m) => ({ m, x: m.file_size, y: spec.value(m.quality) }))
    .filter((p) => Number.isFinite(p.y) && (!spec.log || p.y > 0));
  const height = 240;
  const pad = { left: 56, right: 16, top: 14, bottom: 40 };
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "quality-plot", role: "img",
                             "data-testid": "models-plot", "data-metric": metric,
                             "aria-label": `${spec.label} against file size: ${points.map((p) => `${p.m.quantization} ${size(p.x)} ${spec.text(p.y)}`).join("; ") || "nothing measured yet"}` });
  chart.append(svg("title", {}, `${family.family}: ${spec.label} against size`));
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const xs = family.members.map((m) => m.file_size);
  const xMax = Math.max(...xs) * 1.08;
  const f = spec.log ? Math.log10 : (v) => v;
  let yLo = Math.min(...points.map((p) => f(p.y)));
  let yHi = Math.max(...points.map((p) => f(p.y)));
  if (!points.length) [yLo, yHi] = [0, 1];
  if (yHi - yLo < 1e-9) [yLo, yHi] = [yLo - (spec.log ? 1 : 0.5), yHi + (spec.log ? 1 : 0.5)];
  const span = yHi - yLo;
  [yLo, yHi] = [yLo - span * 0.1, yHi + span * 0.1];
  const X = (v) => pad.left + (v / xMax) * plotW;
  const Y = (v) => pad.top + (1 - (f(v) - yLo) / (yHi - yLo)) * plotH;
  chart.append(svg("rect", { x: pad.left, y: pad.top, width: plotW, height: plotH, class: "plot-frame" }));
  for (let i = 0; i <= 4; i += 1) {
    const v = yLo + ((yHi - yLo) * i) / 4;
    const y = pad.top + (1 - i / 4) * plotH;
    chart.append(svg("line", { x1: pad.left, x2: pad.left + plotW, y1: y, y2: y, class: "plot-grid" }));
    chart.append(svg("text", { x: pad.left - 6, y: y + 4, class: "plot-axis", "text-anchor": "end" },
                     spec.text(spec.log ? 10 ** v : v)));
  }
  const xTicks = width < 480 ? 2 : 4; // a phone's narrower drawing has room for fewer sizes
  for (let i = 0; i <= xTicks; i += 1) {
    const xv = (xMax * i) / xTicks;
    chart.append(svg("text", { x: X(xv), y: height - 22, class: "plot-axis",
                               "text-anchor": i === 0 ? "start" : i === xTicks ? "end" : "middle" }, size(xv)));
  }
  chart.append(svg("text", { x: pad.left + plotW / 2, y: height - 4, class: "plot-axis", "text-anchor": "middle" }, "file size"));
  // On a log scale the reference (0 by definition) has no place: its size is marked instead.
  // Its label goes at the top: the variants nearest the reference in size are the best ones,
  // drawn low on every measure but top-1, and the label must not sit on theirs.
  const placed = []; // labels drawn so far: {x0, x1, y}
  const reference = family.members.find((m) => m.reference);
  if (reference && !points.some((p) => p.m === reference)) {
    const rx = X(reference.file_size);
    const label = `${reference.quantization} (reference)`;
    const labelWidth = 6.5 * label.length;
    chart.append(svg("line", { x1: rx, x2: rx, y1: pad.top, y2: pad.top + plotH, class: "plot-reference",
                               "data-testid": "models-plot-reference" }),
                 svg("text", { x: rx - 4, y: pad.top + 12, class: "plot-axis", "text-anchor": "end",
                               "data-testid": "models-plot-reference-label" }, label));
    placed.push({ x0: rx - 4 - labelWidth, x1: rx - 4, y: pad.top + 12 });
  }
  const sorted = [...points].sort((a, b) => a.x - b.x);
  if (sorted.length > 1) {
    chart.append(svg("polyline", { points: sorted.map((p) => `${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" "),
                                   class: "plot-line" }));
  }
  for (const p of [...sorted].sort((a, b) => Y(a.y) - Y(b.y))) {
    const cx = X(p.x);
    const cy = Y(p.y);
    const dot = svg("circle", { cx: cx.toFixed(1), cy: cy.toFixed(1), r: 5,
                                class: `plot-point${p.m.reference ? " reference" : ""}`,
                                "data-testid": "models-plot-point", "data-model": p.m.model });
    dot.append(svg("title", {}, `${p.m.quantization}: ${size(p.x)}, ${spec.text(p.y)}`));
    // The label right of its point (left near the right edge), moved down past any label it
    // would overlap: variants of nearly one size sit on top of each other.
    const textWidth = 7.5 * p.m.quantization.length;
    const right = cx + 9 + textWidth <= width - 2;
    const x0 = right ? cx + 9 : cx - 9 - textWidth;
    let y = cy + 4;
    for (const other of placed) {
      if (x0 < other.x1 && x0 + textWidth > other.x0 && Math.abs(y - other.y) < 13) y = other.y + 13;
    }
    placed.push({ x0, x1: x0 + textWidth, y });
    chart.append(dot, svg("text", { x: (right ? x0 : x0 + textWidth).toFixed(1), y: y.toFixed(1), class: "plot-label",
                                    "text-anchor": right ? "start" : "end" }, p.m.quantization));
  }
  return chart;
}

function familySection(family, speeds, openCompare, narrow) {
  const section = el("section", "models-family", null, { testid: "models-family" });
  section.dataset.family = family.family;
  const { line, note } = familyFacts(family);
  section.append(el("h3", "models-family-name", family.family), el("p", "models-facts", line, { testid: "models-facts" }),
                 el("p", "field-help", note));
  const columns = ["Type", "Bits/weight", "Size", "ΔPPL", "KLD", "Top-1", "Server tok/s", "Browser tok/s",
                   "Fits server", "Fits this browser", ""];
  const { table, scroll } = dataTable("models-table", columns, "models-table");
  table.tHead.rows[0].cells[1].title = "the weights alone: tensor bytes × 8 / parameters";
  const ordered = family.members.map((m) => m.model);
  for (const m of family.members) {
    const q = m.quality;
    const row = el("tr", "", null, { testid: "models-row" });
    row.dataset.model = m.model;
    const stale = q?.stale ? " (stale)" : "";
    const server = speeds.get(`server:${m.model}`);
    const browser = speeds.get(`browser:${m.model}`);
    const serverTps = q?.decode_tps ? `${rate(q.prompt_tps)} / ${rate(q.decode_tps)}` : server ? `– / ${rate(server.tps)}` : "–";
    const fitServer = serverFit(m);
    const fitBrowser = browserFit(m);
    const cells = [
      [`${m.quantization}${m.reference ? " (reference)" : ""}`, "type"],
      [m.bits_per_weight.toFixed(2), "bpw"],
      [size(m.file_size), "size"],
      [q ? (m.reference ? "0" : `${q.delta_ppl_pct >= 0 ? "+" : ""}${q.delta_ppl_pct.toFixed(2)}%${stale}`) : "–", "delta-ppl"],
      [q ? `${q.kld.toFixed(4)}${stale}` : "–", "kld"],
      [q ? percent(q.top1) : "–", "top1"],
      [serverTps, "server-tps"],
      [browser ? `${rate(browser.tps)} (${browser.backend})` : "–", "browser-tps"],
      [fitServer.text, "fits-server"],
      [fitBrowser.text, "fits-browser"],
    ];
    for (const [text, figure] of cells) {
      const cell = el("td", "", text);
      cell.dataset.figure = figure;
      if (figure.startsWith("fits")) {
        const fit = figure === "fits-server" ? fitServer : fitBrowser;
        cell.dataset.fits = fit.fits === null ? "unknown" : String(fit.fits);
        if (fit.detail) cell.title = fit.detail;
      }
      row.append(cell);
    }
    if (m.reference) row.classList.add("reference");
    const compare = el("button", "button small", "Compare", { type: "button", testid: "models-compare",
                       "aria-label": `Compare ${m.quantization} with the other variants of ${family.family}` });
    compare.disabled = family.members.length < 2;
    // This variant first, then the others from the highest precision down (compare takes four).
    compare.addEventListener("click", () => openCompare([m.model, ...ordered.filter((id) => id !== m.model)]));
    const actions = el("td");
    actions.append(compare);
    row.append(actions);
    table.tBodies[0].append(row);
  }
  section.append(scroll);
  const measured = family.members.some((m) => m.quality);
  if (family.members.length < 2) {
    section.append(el("p", "field-help", `One file so far: an admin makes variants with bchat models quantize ${family.members[0].model} Q8_0 Q4_K_M, then measures them with bchat models eval ${family.family}.`,
                      { testid: "models-unmeasured" }));
  } else if (!measured) {
    section.append(el("p", "field-help", `Not measured yet: an admin runs bchat models eval ${family.family}.`,
                      { testid: "models-unmeasured" }));
  }
  if (family.members.length > 1) {
    const metric = selectBox("Quality measure", Object.entries(METRICS).map(([k, s]) => option(k, s.label)), "models-metric");
    const holder = el("div", "quality-plot-box");
    const draw = () => holder.replaceChildren(qualityPlot(family, metric.select.value, narrow ? 340 : 560));
    metric.select.addEventListener("change", draw);
    draw();
    section.append(metric.wrap, holder);
  }
  const e = family.evaluation;
  if (e) {
    section.append(el("p", "field-help models-eval-note",
      `Measured against ${e.reference} on ${e.text?.name ?? "the shipped text"}: ${e.scored_tokens} tokens scored in ${e.chunks} chunks of ${e.n_ctx} (second half of each, as llama-perplexity --kl-divergence), ${e.created_at}. Server tok/s: prompt / decode on ${e.device?.cores ?? "?"} cores.`));
  }
  return section;
}

// hooks: openCompare(modelIds) -> opens the compare panel with those models.
export function initModels(button, { openCompare }) {
  if (!button) return null;
  const panel = createPanel({ title: "Models: pick your quant", testid: "models-panel", className: "models-panel",
                              opener: button, onOpen: load });
  const intro = el("p", "field-help", "Each family is one model and its quantised variants. Fewer bits per weight make a smaller, faster file; the table and plot show what it costs: how far each variant's next-token predictions drift from the highest-precision one (KL divergence, top-1 agreement) and its perplexity change.");
  const list = el("div", "models-families", null, { testid: "models-families" });
  panel.body.append(intro, list);
  const narrow = window.matchMedia("(max-width: 640px)");

  async function load() {
    list.replaceChildren(el("p", "field-help", "Loading…"));
    try {
      const [quality, benchmarks] = await Promise.all([
        request("GET", "/api/models/quality"),
        request("GET", "/api/benchmarks").catch(() => ({ benchmarks: [] })),
      ]);
      const speeds = benchmarkSpeeds(benchmarks.benchmarks ?? []);
      const go = (ids) => {
        panel.dialog.close();
        openCompare(ids);
      };
      list.replaceChildren(...quality.families.map((f) => familySection(f, speeds, go, narrow.matches)));
      if (!quality.families.length) list.replaceChildren(el("p", "field-help", "No models are served."));
      list.dataset.loaded = "true";
    } catch (err) {
      list.replaceChildren();
      panel.problem(err.message);
    }
  }

  return {
    open() {
      panel.problem("");
      panel.dialog.showModal();
      load();
    },
  };
}
