// The benchmark panel: the fixed prompt set (docs/benchmark.md) on the server's models
// (POST /api/benchmarks/server) and in this browser, once per backend it has, by calling the
// browser engine directly (greedy, the set's seed and token count); each browser run is stored
// (POST /api/benchmarks). Prompt and decode tok/s are drawn as bar charts (SVG, drawn here),
// with a table of the figures, and everyone's stored runs below: a class sees its devices next
// to the server.
import { ms, percent, rate, rounded, size, wllamaFigures } from "../format.js";
import { request } from "../api.js";
import { modelInfo, modelsFor } from "../state.js";
import { svg } from "./icons.js";
import { createPanel, dataTable, el, field, option, selectBox } from "./panel.js";
import { displayName } from "./model_card.js";

const BROWSER_BACKENDS = [
  ["wasm-mt", "WASM, multi-thread"],
  ["wasm-st", "WASM, one thread"],
  ["webgpu", "WebGPU"],
];

export function runLabel(run) {
  return run.engine === "server" ? `server (${run.backend})` : `browser (${run.backend})`;
}

// Coarse device facts, as docs/benchmark.md allows: no user agent string is sent.
async function deviceFacts(gpuName) {
  const data = navigator.userAgentData;
  const brand = data?.brands?.find((b) => !/Not.A.Brand|Chromium/i.test(b.brand))?.brand
    ?? data?.brands?.find((b) => /Chromium/.test(b.brand))?.brand;
  const ua = navigator.userAgent;
  const browser = brand ?? (/Firefox\//.test(ua) ? "Firefox" : /Edg\//.test(ua) ? "Edge" : /Chrome\//.test(ua) ? "Chrome" : /Safari\//.test(ua) ? "Safari" : null);
  const os = data?.platform || (/Android/.test(ua) ? "Android" : /iPhone|iPad/.test(ua) ? "iOS" : /Mac OS X/.test(ua) ? "macOS" : /Windows/.test(ua) ? "Windows" : /Linux/.test(ua) ? "Linux" : null);
  return { cores: navigator.hardwareConcurrency || null, device_memory: navigator.deviceMemory ?? null,
           gpu: gpuName, browser, os };
}

// One bar chart: groups by prompt, one bar per run (engine/backend) in each group.
// width: the drawing's own units; a phone gets a narrower one so its text is not scaled down.
export function barChart(runs, metric, title, width = 560) {
  const prompts = [...new Set(runs.flatMap((r) => r.results.map((x) => x.prompt)))];
  const bars = prompts.flatMap((prompt) => runs.map((run, series) => {
    const result = run.results.find((x) => x.prompt === prompt);
    return { prompt, series, run, result, value: result?.[metric] ?? 0 };
  }));
  const max = Math.max(1, ...bars.map((b) => b.value));
  const barHeight = 18;
  const gap = 6;
  const labelWidth = 64;
  const valueText = (bar) => {
    const flags = [bar.result && !bar.result.cold ? "warm" : "", bar.result?.busy ? `busy ${bar.result.busy}` : ""].filter(Boolean).join(", ");
    return `${rate(bar.value)}${flags ? ` (${flags})` : ""}`;
  };
  // Room after the longest bar for the longest value label (12px text: ~7px a character), so
  // no label runs past the chart's edge ("21.1 (warn" was cut).
  const room = 12 + 7 * Math.max(4, ...bars.map((b) => valueText(b).length));
  const plot = width - labelWidth - room;
  const groupHeight = runs.length * (barHeight + 4) + gap * 2;
  const height = prompts.length * groupHeight + 8;
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, class: "bench-chart", role: "img", "data-testid": "benchmark-chart", "data-metric": metric,
    "aria-label": `${title}: ${bars.map((b) => `${b.prompt}, ${runLabel(b.run)}: ${rate(b.value)}`).join("; ")}`,
  });
  chart.append(svg("title", {}, title));
  prompts.forEach((prompt, group) => {
    const top = group * groupHeight + gap;
    chart.append(svg("text", { x: 0, y: top + groupHeight / 2 - gap, class: "bench-axis" }, prompt));
    chart.append(svg("line", { x1: labelWidth - 6, x2: labelWidth - 6, y1: top, y2: top + groupHeight - gap * 2, class: "bench-rule" }));
    runs.forEach((run, series) => {
      const bar = bars.find((b) => b.prompt === prompt && b.series === series);
      const y = top + series * (barHeight + 4);
      const w = Math.max(1, (bar.value / max) * plot);
      const rect = svg("rect", { x: labelWidth, y, width: w.toFixed(1), height: barHeight, rx: 3,
                                 class: `bench-bar series-${series % 6}`, "data-testid": "benchmark-bar",
                                 "data-label": runLabel(run), "data-prompt": prompt, "data-value": bar.value });
      rect.append(svg("title", {}, `${runLabel(run)}, ${prompt}: ${rate(bar.value)} tok/s`));
      chart.append(rect);
      chart.append(svg("text", { x: labelWidth + w + 6, y: y + barHeight - 5, class: "bench-value" }, valueText(bar)));
    });
  });
  return chart;
}

function legend(runs) {
  const list = el("ul", "bench-legend");
  runs.forEach((run, series) => {
    const item = el("li");
    const swatch = svg("svg", { width: 12, height: 12, viewBox: "0 0 12 12", "aria-hidden": "true" });
    swatch.append(svg("rect", { width: 12, height: 12, rx: 2, class: `bench-bar series-${series % 6}` }));
    item.append(swatch, ` ${runLabel(run)} · ${displayName(run.model)}`);
    list.append(item);
  });
  return list;
}

function deviceText(run) {
  const d = run.device ?? {};
  return [d.cores ? `${d.cores} cores` : null, d.device_memory ? `${d.device_memory} GB` : null, d.gpu, d.browser, d.os]
    .filter(Boolean).join(", ") || "–";
}

// The figures as a table: one row per run and prompt.
export function figuresTable(runs, { stored = false } = {}) {
  const columns = ["Engine", "Model", "Quant", "Bits/weight", "Size", "Prompt", "Prompt tok/s", "Decode tok/s", "First token", "Cache", ...(stored ? ["Device", "When"] : [])];
  const { table, scroll } = dataTable("bench-table", columns, stored ? "benchmark-stored" : "benchmark-table");
  for (const run of runs) {
    const f = run.model_facts ?? {};
    for (const result of run.results) {
      const row = el("tr", "", null, { testid: "benchmark-row" });
      row.dataset.engine = run.engine;
      row.dataset.backend = run.backend;
      row.dataset.prompt = result.prompt;
      if (run.id) row.dataset.runId = run.id;
      const cache = [result.cold ? "cold" : "warm", result.busy ? `busy (${result.busy})` : "", result.queued ? `queued ${result.queued}` : ""].filter(Boolean).join(", ");
      const cells = [runLabel(run) + (run.mine ? " · yours" : ""), displayName(run.model), f.quantization ?? "–",
        f.bits_per_weight ? f.bits_per_weight.toFixed(2) : "–", size(f.file_size), result.prompt,
        rate(result.prompt_tps), rate(result.decode_tps), ms(result.ttft_ms), cache,
        ...(stored ? [deviceText(run), run.created_at ? new Date(run.created_at).toLocaleString() : "–"] : [])];
      cells.forEach((text, i) => {
        const cell = el("td", "", text);
        if (i === 6) cell.dataset.figure = "prompt-tps";
        if (i === 7) cell.dataset.figure = "decode-tps";
        row.append(cell);
      });
      table.tBodies[0].append(row);
    }
  }
  return scroll;
}

// hooks: loadBrowserEngine() -> Promise<engine>
export function initBenchmark(button, { loadBrowserEngine }) {
  if (!button) return;
  const panel = createPanel({ title: "Benchmark", testid: "benchmark-panel", className: "bench-panel", opener: button,
                              onOpen: () => prepare().catch((err) => panel.problem(err.message)) });
  const intro = el("p", "modal-message",
    "The same fixed prompts on the server and in this browser: greedy, one fresh turn each. Figures are the engines' own.");
  const serverGroup = el("fieldset", "bench-choices");
  const browserGroup = el("fieldset", "bench-choices");
  browserGroup.append(el("legend", "field-label", "In this browser"));
  const browserModel = selectBox("Model to run in this browser", [], "benchmark-browser-model");
  const backendList = el("div", "bench-checks");
  browserGroup.append(browserModel.wrap, backendList);
  const tokens = el("input", "text-input", null, { type: "number", min: "1", max: "256", testid: "benchmark-tokens" });
  const run = el("button", "button primary", "Run the benchmark", { type: "button", testid: "benchmark-run" });
  const status = el("p", "field-help bench-status", null, { testid: "benchmark-status", role: "status" });
  const controls = el("div", "bench-controls");
  const runRow = el("div", "compare-actions");
  runRow.append(field("Tokens per reply", tokens, "narrow"), el("span", "spacer"), run);
  controls.append(serverGroup, browserGroup);
  const results = el("section", "bench-results", null, { testid: "benchmark-results", "aria-label": "This run's figures" });
  const storedHeading = el("h3", "panel-subtitle", "Everyone's stored runs");
  const stored = el("div", "bench-stored");
  panel.body.append(intro, controls, runRow, status, results, storedHeading, stored);

  let prompts = [];
  let seed = 1234;
  let webgpu = { usable: false, reason: "not checked yet" };

  function check(value, label, { checked = true, disabled = false, note = "" } = {}, testid) {
    const wrap = el("label", "check");
    wrap.append(el("input", "", null, { type: "checkbox", value, checked: checked && !disabled, disabled, testid }), ` ${label}`);
    if (note) wrap.append(el("span", "field-help", ` — ${note}`));
    return wrap;
  }

  async function loadStored() {
    const listing = await request("GET", "/api/benchmarks");
    prompts = listing.prompts;
    seed = listing.seed;
    if (!tokens.value) tokens.value = String(listing.tokens);
    stored.replaceChildren(listing.benchmarks.length ? figuresTable(listing.benchmarks, { stored: true }) : el("p", "field-help", "No runs stored yet."));
    return listing;
  }

  async function prepare() {
    serverGroup.replaceChildren(el("legend", "field-label", "Server models"),
      ...modelsFor("server").map((m, i) => check(m.id, displayName(m.id), { checked: i === 0 }, "benchmark-server-model")));
    // The browser runs its own copy of each model (Q8_0 by default): its format and size here.
    browserModel.select.replaceChildren(option("", "None"), ...modelsFor("browser").map((m, i) => option(m.id,
      `${displayName(m.id)}${m.browser?.format && m.browser.format !== m.facts?.quantization
        ? ` → runs as ${m.browser.format}, ${size(m.browser.size)}` : m.browser ? ` (${size(m.browser.size)})` : ""}`, i === 0)));
    try {
      const module = await import("../engines/browser.js");
      webgpu = await module.detectWebGPU();
    } catch (err) {
      webgpu = { usable: false, reason: err.message };
    }
    const isolated = globalThis.crossOriginIsolated;
    backendList.replaceChildren(...BROWSER_BACKENDS.map(([value, label]) => {
      const disabled = (value === "webgpu" && !webgpu.usable) || (value === "wasm-mt" && !isolated);
      const note = value === "webgpu" && !webgpu.usable ? webgpu.reason
        : value === "wasm-mt" && !isolated ? "needs a cross-origin isolated page" : "";
      return check(value, label, { disabled, note }, "benchmark-backend");
    }));
    await loadStored();
  }

  // Missing figures go as null: the server stores a result's figures the same either way.
  function browserResult(prompt, measured) {
    const figures = wllamaFigures(measured.timings, measured.usage);
    return { prompt: prompt.name, ...figures, prompt_tps: rounded(figures.prompt_tps, 2),
             ttft_ms: rounded(measured.ttftMs, 1), cold: figures.prompt_cached === 0 };
  }

  // The chart's width in its own units: what a chart box has on screen (two side by side on a
  // desktop, one on a phone), so its 12px labels stay 12px.
  const chartWidth = () => Math.round(Math.max(300, Math.min(560, (panel.body.clientWidth - 48) / (panel.body.clientWidth > 760 ? 2 : 1))));

  function show(runs) {
    if (!runs.length) {
      results.replaceChildren();
      return;
    }
    const charts = el("div", "bench-charts");
    for (const [metric, title] of [["prompt_tps", "Prompt tok/s (reading)"], ["decode_tps", "Decode tok/s (writing)"]]) {
      const figure = el("figure", "bench-figure");
      figure.append(el("figcaption", "field-label", title), barChart(runs, metric, title, chartWidth()));
      charts.append(figure);
    }
    results.replaceChildren(legend(runs), charts, figuresTable(runs));
  }

  // One run at a time; while it runs its button is Cancel, which stops both sides: the server's
  // benchmark (DELETE /api/benchmarks/server: its POST answers "cancelled", nothing stored) and
  // the browser's generation (the abort signal wllama takes). Runs finished before stay stored.
  let job = null; // {controller, cancelled, name}

  function showRunning(running) {
    run.textContent = running ? "Cancel" : "Run the benchmark";
    run.className = `button ${running ? "danger" : "primary"}`;
    run.dataset.state = running ? "running" : "idle";
    results.setAttribute("aria-busy", String(running));
  }

  async function cancel() {
    if (!job || job.cancelled) return;
    job.cancelled = true;
    job.controller.abort();
    status.textContent = "Cancelling…";
    run.disabled = true; // until the run has stopped
    try {
      // By the run's name: it stops even if the server has not begun it yet.
      await request("DELETE", `/api/benchmarks/server?run=${encodeURIComponent(job.name)}`);
    } catch {
      /* no server run of ours was going (the browser's, or it had just ended) */
    }
  }

  // (crypto.randomUUID needs a secure context; a LAN server over http is not one)
  const runName = () => Array.from(crypto.getRandomValues(new Uint8Array(12)), (x) => x.toString(16).padStart(2, "0")).join("");

  async function start() {
    panel.problem("");
    const current = job = { controller: new AbortController(), cancelled: false, name: runName() };
    const { signal } = current.controller;
    const stopped = () => current.cancelled;
    showRunning(true);
    const runs = [];
    const n = Number.parseInt(tokens.value, 10) || 64;
    try {
      await loadStored();
      const chosenServer = [...serverGroup.querySelectorAll("input:checked")].map((b) => b.value);
      for (const model of chosenServer) {
        if (stopped()) break;
        status.textContent = `Running the prompt set on the server (${displayName(model)})…`;
        runs.push(await request("POST", "/api/benchmarks/server", { model, tokens: n, run: current.name }, { signal }));
        show(runs);
      }
      const info = modelInfo(browserModel.select.value);
      const backends = [...backendList.querySelectorAll("input:checked")].map((b) => b.value);
      if (info && backends.length && !stopped()) {
        const engine = await loadBrowserEngine();
        const device = await deviceFacts(webgpu.usable ? webgpu.reason.replace(/^WebGPU adapter /, "") : null);
        for (const backend of backends) {
          const results = [];
          let actual = backend;
          for (const prompt of prompts) {
            if (stopped()) break;
            status.textContent = `Running “${prompt.name}” in this browser (${backend})…`;
            const measured = await engine.measure(info, backend, [{ role: "user", content: prompt.text }],
              { max_tokens: n, temperature: 0, seed }, {
                signal,
                onLoad: (p) => {
                  if (p.phase === "downloading" && p.total) status.textContent = `Loading ${displayName(info.id)} for ${backend}: ${percent(p.loaded / p.total)}`;
                },
              });
            actual = measured.backend;
            results.push(browserResult(prompt, measured));
          }
          if (stopped()) break; // a cut-short run's figures would mislead: not stored
          if (actual !== backend && runs.some((r) => r.engine === "browser" && r.backend === actual)) continue; // the same backend again
          runs.push(await request("POST", "/api/benchmarks", { backend: actual, model: info.id, device, results }));
          show(runs);
        }
      }
      if (stopped()) throw new DOMException("cancelled", "AbortError");
      status.textContent = runs.length ? `Done: ${runs.length} run${runs.length === 1 ? "" : "s"} stored.` : "Pick a server model or a browser backend.";
      await loadStored();
    } catch (err) {
      if (stopped()) {
        status.textContent = `Cancelled.${runs.length ? ` The ${runs.length} run${runs.length === 1 ? "" : "s"} finished before it stayed stored.` : " Nothing was stored."}`;
        await loadStored().catch(() => {});
      } else {
        status.textContent = "";
        panel.problem(`The benchmark stopped: ${err.message}`);
      }
    } finally {
      if (job === current) job = null;
      run.disabled = false;
      showRunning(false);
      show(runs);
    }
  }

  run.addEventListener("click", () => (job ? cancel() : start()));
  // Closing the panel mid-run cancels it too: nobody is left to read its figures.
  panel.dialog.addEventListener("close", () => cancel());
}
