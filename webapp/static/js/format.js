// Numbers as the page shows them: the one place sizes, speeds, times and token counts are
// formatted, so a figure reads the same in a reply's line, compare, the benchmark and the
// model card. A missing figure is "–".

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const known = (value) => Number.isFinite(value);

export function size(bytes) {
  if (!known(bytes)) return "–";
  return bytes >= GiB ? `${(bytes / GiB).toFixed(1)} GiB` : `${(bytes / MiB).toFixed(bytes < 10 * MiB ? 1 : 0)} MiB`;
}

// A rate with no unit (a chart's labels); tokensPerSecond adds it.
export function rate(value) {
  return known(value) && value > 0 ? value.toFixed(value >= 100 ? 0 : 1) : "–";
}

export function tokensPerSecond(value) {
  return known(value) && value > 0 ? `${rate(value)} tok/s` : "–";
}

export function ms(value) {
  return known(value) ? `${Math.round(value)} ms` : "–";
}

export function seconds(value) {
  return known(value) ? `${value.toFixed(1)} s` : "–";
}

export function percent(fraction) {
  return `${Math.round(fraction * 100)}%`;
}

// A reply's or a prompt's tokens, as its provenance says them.
export function tokens(n) {
  return `${n} tokens`;
}

// 12,345 (a count said in full, beside a limit).
export function count(n) {
  return n.toLocaleString("en");
}

// 12k, 1.5k, 830 (a count in a tight spot: the context meter).
export function compactCount(n) {
  if (n >= 10000) return `${Math.round(n / 1000)}k`;
  if (n >= 1000) return `${(n / 1000).toFixed(1)}k`;
  return String(n);
}

// A model's parameter count: 135M, 1.7B, 27B.
export function parameters(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(n >= 1e10 ? 0 : 1)}B`;
  if (n >= 1e6) return `${Math.round(n / 1e6)}M`;
  if (n >= 1e3) return `${Math.round(n / 1e3)}K`;
  return `${n}`;
}

// Prompt tokens read per second: the one place it is computed (from the tokens evaluated,
// not those taken from the cache, over the prompt's milliseconds).
export function promptTokensPerSecond(evaluated, promptMs) {
  return promptMs > 0 && evaluated > 0 ? evaluated / (promptMs / 1000) : null;
}

// A figure rounded to `places` decimals as it is stored, or null when there is none.
export function rounded(value, places) {
  return value == null ? null : Math.round(value * 10 ** places) / 10 ** places;
}

// One wllama completion's figures, as a benchmark run stores them and a browser reply's
// provenance takes them: from llama.cpp's timings (prompt_n evaluated, cache_n reused from the
// KV cache, prompt_ms, predicted_n, predicted_per_second), else its usage. prompt_tps is left
// unrounded: a reply keeps one decimal of it, a benchmark two.
export function wllamaFigures(timings, usage) {
  const t = timings ?? {};
  const cached = t.cache_n ?? 0;
  return {
    prompt_tokens: usage?.prompt_tokens ?? (t.prompt_n != null ? t.prompt_n + cached : null),
    prompt_cached: cached,
    prompt_ms: rounded(t.prompt_ms, 1),
    prompt_tps: promptTokensPerSecond(t.prompt_n, t.prompt_ms),
    decode_tps: rounded(t.predicted_per_second, 2),
    completion_tokens: t.predicted_n ?? usage?.completion_tokens ?? null,
  };
}
