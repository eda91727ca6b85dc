// The browser engine (see contract.js): llama.cpp compiled to WebAssembly (wllama) runs the
// model in this page. The user's message is stored through the API before anything runs; the
// reply (complete, stopped or failed) is stored through the API with its provenance.
import { Wllama } from "../../vendor/wllama/index.js";
import { BROWSER_N_CTX as N_CTX, EngineError } from "./contract.js";
import { rounded, wllamaFigures } from "../format.js";
import { modelHistory, pathTo } from "../tree.js";

const WASM = { default: "/static/vendor/wllama/wllama.wasm" };
// Browsers without JSPI/Memory64 (Safari, older Firefox) need wllama's "compat" build; by
// default wllama would fetch it from a public CDN. Everything comes from this app instead.
const COMPAT = {
  worker: "/static/vendor/wllama-compat/wllama.js",
  wasm: "/static/vendor/wllama-compat/wllama.wasm",
};
// Prompt tokens llama.cpp decodes per step. On WASM the matrix products are compute-bound
// (ggml has no batched GEMM kernel for SIMD128: a batch costs what its tokens cost one by one),
// so batch size does not buy arithmetic; what it changes is (a) how often the page learns how
// far it got ("reading the conversation: 128/458 tokens" comes once per step) and (b) how many
// thread barriers a prompt costs (~750 per step), which on a busy machine with descheduled
// threads made 64-token steps 2-3x slower than 512. 128 keeps progress moving every few
// seconds at a quarter of 64's barriers. Measured by bench/browser_speed.py --batch.
const N_BATCH = 128;
const FLUSH_MS = 2000; // the reply's row grows at least this often (and on pagehide)
const CHARS_PER_TOKEN = 3; // rough, errs long: used only to drop old turns before sending

// Can llama.cpp's WebGPU backend use this browser's GPU? It needs an adapter with shader-f16;
// without it (e.g. SwiftShader) llama.cpp silently keeps every layer on the CPU.
export async function detectWebGPU() {
  if (!navigator.gpu) return { usable: false, reason: "this browser has no WebGPU" };
  let adapter = null;
  try {
    adapter = await navigator.gpu.requestAdapter();
  } catch (err) {
    return { usable: false, reason: `WebGPU failed: ${err.message}` };
  }
  if (!adapter) return { usable: false, reason: "no WebGPU adapter is available" };
  const info = adapter.info ?? {};
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unnamed";
  if (!adapter.features.has("shader-f16")) {
    return { usable: false, reason: `the WebGPU adapter (${name}) lacks shader-f16, which llama.cpp needs` };
  }
  return { usable: true, reason: `WebGPU adapter ${name}` };
}

export function threadCount(backend) {
  if (backend === "wasm-st") return 1;
  // All cores: wllama's own default is half of them. Capped: more threads than this stop helping.
  return Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 8));
}

// wllama's load parameters, shared with bench/browser_speed.py so it measures what pages run.
export function loadParams({ contextLength = null, threads, gpu = false }) {
  return {
    useCache: true,
    n_ctx: Math.min(N_CTX, contextLength || N_CTX),
    n_threads: threads,
    n_gpu_layers: gpu ? 999 : 0, // 0 skips WebGPU initialisation entirely
    n_parallel: 1, // one chat per page: the whole context, and its KV cache kept between turns
    n_batch: N_BATCH,
    n_ubatch: N_BATCH,
  };
}

// defaults: each option's default as the server serves it (data-options), for what a request
// leaves out.
export function createBrowserEngine({ api, defaults }) {
  let wllama = null;
  let loaded = null; // {key, modelId, backend, threads, note}
  let loading = null;
  let loadChain = Promise.resolve(); // loads run one after another: each replaces the last
  let warming = null; // {conversationId, key, promise, controller, listeners, progress}
  let generating = Promise.resolve(); // a reply being written: wllama runs one request at a time

  async function storageFacts() {
    const { quota = null, usage = null } = (await navigator.storage?.estimate?.()) ?? {};
    // Ask the browser not to evict the model under storage pressure.
    const persisted = (await navigator.storage?.persist?.().catch(() => false)) ?? false;
    return { quota, usage, persisted };
  }

  async function removeStaleCopies(manager, currentUrl, modelId) {
    // Older versions of the same model (their URL carries another version) only take space.
    const models = await manager.getModels({ includeInvalid: true });
    for (const model of models) {
      if (model.url !== currentUrl && model.url.includes(`/models/${encodeURIComponent(modelId)}/`)) {
        await model.remove().catch(() => {});
      }
    }
  }

  async function load(modelInfo, preference, onLoad) {
    const url = new URL(modelInfo.browser.url, location.href).href;
    const key = `${url}|${preference}`;
    if (loaded?.key === key) return loaded;
    if (wllama) {
      // Another backend was picked: a reply being written finishes on the old instance first,
      // and background reading for the old one is dropped.
      warming?.controller.abort();
      await Promise.all([generating, warming?.promise]).catch(() => {});
      await wllama.exit().catch(() => {});
      wllama = null;
      loaded = null;
    }
    const gpu = await detectWebGPU();
    if (preference === "webgpu" && !gpu.usable) {
      throw new EngineError("webgpu_unavailable", `WebGPU cannot run the model here: ${gpu.reason}.`);
    }
    const wantGpu = preference === "webgpu" || (preference === "auto" && gpu.usable);
    const threads = threadCount(preference);
    let offloaded = null;
    const sniff = (args) => {
      const match = /offloaded (\d+)\/(\d+) layers to GPU/.exec(args.join(" "));
      if (match) offloaded = Number(match[1]);
    };
    const logger = {
      debug: () => {},
      log: (...args) => sniff(args),
      warn: (...args) => {
        sniff(args);
        console.warn(...args);
      },
      error: (...args) => console.error(...args),
    };
    const instance = new Wllama(WASM, { logger, parallelDownloads: 1 });
    instance.setCompat(COMPAT);
    onLoad?.({ phase: "checking", size: modelInfo.browser.size, ...(await storageFacts()) });

    const started = performance.now();
    const cached = (await instance.modelManager.getModels()).some((m) => m.url === url);
    try {
      await instance.loadModelFromUrl(url, {
        ...loadParams({ contextLength: modelInfo.facts?.context_length, threads, gpu: wantGpu }),
        progressCallback: ({ loaded: bytes, total }) => {
          const seconds = (performance.now() - started) / 1000;
          onLoad?.({ phase: "downloading", loaded: bytes, total, bytesPerSecond: bytes / Math.max(seconds, 0.001) });
        },
      });
    } catch (err) {
      await instance.exit().catch(() => {});
      throw err;
    }
    const backend = offloaded > 0 ? "webgpu" : instance.isMultithread() ? "wasm-mt" : "wasm-st";
    let note = "";
    if (wantGpu && backend !== "webgpu") note = "WebGPU was asked for, but llama.cpp kept the model on the CPU";
    else if (preference === "auto" && !gpu.usable) note = `no WebGPU: ${gpu.reason}`;
    else if (preference === "wasm-mt" && backend === "wasm-st") {
      note = "multi-threading needs a cross-origin isolated page; running on one thread";
    }
    wllama = instance;
    loaded = {
      key,
      modelId: modelInfo.id,
      backend,
      threads: instance.getNumThreads?.() ?? threads,
      note,
      fromCache: cached,
      loadSeconds: (performance.now() - started) / 1000,
    };
    removeStaleCopies(instance.modelManager, url, modelInfo.id).catch(() => {});
    onLoad?.({ phase: "ready", ...loaded });
    return loaded;
  }

  function ensureLoaded(modelInfo, preference, onLoad) {
    // One load at a time: a second send while downloading waits for the same load.
    const key = `${new URL(modelInfo.browser.url, location.href).href}|${preference}`;
    if (loading?.key === key) return loading.promise;
    if (loaded?.key === key && !loading) return Promise.resolve(loaded);
    // Chained: a second load (another backend) must not start while the first still owns wllama.
    const promise = loadChain.catch(() => {}).then(() => load(modelInfo, preference, onLoad)).finally(() => {
      if (loading?.promise === promise) loading = null;
    });
    loading = { key, promise };
    loadChain = promise;
    return promise;
  }

  // The branch a reply to `upTo` sees, read from the server a window at a time (never the
  // whole tree): windows up from `below` (a message whose parent is upTo: a regenerated or
  // continued reply), else from the current leaf (upTo by default), until the history above
  // upTo fills the model's context (fitHistory, the rule the prompt is cut by, drops some) or
  // the root is reached. Only the branch is followed, so an edit further up is seen as edited.
  // Returns the first window (the conversation's title, settings, current_message_id) with
  // every message read, and the path from the highest one read down to upTo.
  async function readBranch(conversationId, { upTo = null, below = null, system = "" } = {}) {
    const first = await api.conversationWindow(conversationId, below);
    const messages = [...first.messages];
    const seen = new Set(messages.map((m) => m.id));
    const target = upTo ?? first.current_message_id;
    let earlier = first.earlier;
    let path = pathTo(messages, target);
    while (path[0] ? path[0].parent_id && !fitHistory(modelHistory(path), system).dropped : earlier) {
      // upTo not read yet (above the leaf's window): the window above the last one; else the
      // one above the highest message of its path.
      const page = await api.conversationWindow(conversationId, path[0]?.id ?? earlier);
      const fresh = page.messages.filter((m) => !seen.has(m.id));
      if (!fresh.length) break;
      for (const m of fresh) {
        seen.add(m.id);
        messages.push(m);
      }
      earlier = page.earlier;
      path = pathTo(messages, target);
    }
    return { conversation: { ...first, messages }, path };
  }

  // The path with each message's files before its text, as the server builds them for its
  // engines (GET /api/conversations/<id>/files, fitted to this engine's context), and what
  // was given of them; a path without files costs no request.
  async function withFiles(conversationId, path, options) {
    const leaf = [...path].reverse().find((m) => m.role === "user");
    if (!leaf || !path.some((m) => m.attachments?.length)) return { path, files: [] };
    // N_CTX: the context fitHistory cuts the prompt to (the model's own is never smaller here)
    const { blocks, files } = await api.promptFiles(conversationId, leaf.id, N_CTX, options.max_tokens ?? 0);
    return { path: path.map((m) => (blocks[m.id] ? { ...m, content: `${blocks[m.id]}\n\n${m.content}` } : m)), files };
  }

  // The prompt a reply starts with: the branch's history (path, as readBranch gives it) as
  // the model sees it. `more`: the path does not reach the root, so what fitHistory drops is
  // only the oldest of the turns read, and more above them were left out too.
  function promptMessages(path, options = {}) {
    const { turns, dropped } = fitHistory(modelHistory(path), options.system);
    const messages = options.system ? [{ role: "system", content: options.system }, ...turns] : turns;
    return { messages, dropped, more: Boolean(path[0]?.parent_id) };
  }

  // Read a conversation's history into the KV cache before anyone sends: the next turn then
  // only evaluates its own new tokens. Prompt evaluation in WASM runs at about decode speed,
  // so an 8-turn history costs tens of seconds; read while the user is reading or typing, it
  // costs nothing visible. wllama cannot save or restore a KV cache, so this is also how a
  // reloaded page (or a switch back to a conversation) gets its cache back.
  function warm(conversationId, path, options, onLoad) {
    const { messages } = promptMessages(path, options);
    if (!messages.length || !wllama) return null;
    const key = JSON.stringify(messages);
    if (warming?.key === key) {
      if (onLoad) warming.listeners.add(onLoad);
      return warming;
    }
    warming?.controller.abort(); // another conversation: its reading is no longer wanted
    const controller = new AbortController();
    const entry = { conversationId, key, controller, listeners: new Set(onLoad ? [onLoad] : []),
                    progress: null, result: null };
    const report = (progress) => {
      entry.progress = progress;
      for (const listener of entry.listeners) listener(progress);
    };
    const previous = Promise.all([warming?.promise, generating]);
    entry.promise = previous.catch(() => {}).then(async () => {
      if (controller.signal.aborted) return null;
      let timings = null;
      const stream = await wllama.createChatCompletion({
        messages, stream: true, max_tokens: 1, temperature: 0, return_progress: true,
        abortSignal: controller.signal,
      });
      for await (const chunk of stream) {
        if (chunk.prompt_progress) report(readingProgress(chunk.prompt_progress));
        if (chunk.timings) timings = chunk.timings;
      }
      entry.result = timings;
      if (timings && loaded) report({ phase: "ready", ...loaded }); // the status line stops saying "reading"
      return timings;
    }).catch(() => null).finally(() => {
      if (warming === entry) warming = null;
    });
    warming = entry;
    return entry;
  }

  function fitHistory(messages, system) {
    // Drop the oldest turns (never the system prompt or the newest message) to fit the context.
    const budget = (N_CTX - 512) * CHARS_PER_TOKEN;
    const size = (list) => list.reduce((n, m) => n + m.content.length + 16, system ? system.length : 0);
    const turns = [...messages];
    let dropped = 0;
    while (turns.length > 1 && size(turns) > budget) {
      turns.shift();
      dropped += 1;
      while (turns.length > 1 && turns[0].role !== "user") {
        turns.shift();
        dropped += 1;
      }
    }
    return { turns, dropped };
  }

  let probe = null; // a wllama that is never loaded: it only reads the browser's model cache

  return {
    get loaded() {
      return loaded;
    },
    // Is the model already in this browser's storage (loading it moves no bytes over the
    // network)? The page preloads only then; otherwise it waits to be asked.
    async isCached(modelInfo) {
      if (!modelInfo?.browser) return false;
      const url = new URL(modelInfo.browser.url, location.href).href;
      // loaded, or on its way (a download the visitor already asked for)
      if (loaded?.key?.startsWith(`${url}|`) || loading?.key?.startsWith(`${url}|`)) return true;
      probe ??= new Wllama(WASM, { logger: { debug() {}, log() {}, warn() {}, error() {} } });
      try {
        return (await probe.modelManager.getModels()).some((m) => m.url === url);
      } catch {
        return false; // no storage (a private window): nothing is cached
      }
    },
    // Called when the user picks the browser engine (and when a conversation opens with it
    // picked): the wasm and the model download now, not at Send, and the open conversation's
    // history is read into the KV cache in the background.
    async preload(modelInfo, preference, onLoad, { conversationId = null, options = {} } = {}) {
      if (!modelInfo?.browser) return null;
      const runtime = await ensureLoaded(modelInfo, preference, onLoad);
      if (conversationId) {
        // read as a new turn will see it: with the tool instructions when tools are on
        const tools = await api.toolSetup(conversationId).catch(() => null);
        const branch = await readBranch(conversationId, { system: withTools(options, tools).system });
        const { path } = await withFiles(conversationId, branch.path, options).catch(() => branch);
        warm(conversationId, path, withTools(options, tools), onLoad);
      }
      return runtime;
    },
    get warming() {
      return warming && { conversationId: warming.conversationId, progress: warming.progress };
    },

    // One completion straight from the model, stored nowhere (the benchmark): the engine's
    // own timings, the backend it really ran on, and the time to the first token.
    async measure(modelInfo, preference, messages, options, { onLoad, signal } = {}) {
      const runtime = await ensureLoaded(modelInfo, preference, onLoad);
      const sent = performance.now();
      let firstAt = null;
      let usage = null;
      let timings = null;
      const stream = await wllama.createChatCompletion({
        messages, stream: true, max_tokens: options.max_tokens,
        temperature: options.temperature, seed: options.seed, abortSignal: signal,
      });
      for await (const chunk of stream) {
        if (chunk.choices?.[0]?.delta?.content) firstAt ??= performance.now();
        if (chunk.usage) usage = chunk.usage;
        if (chunk.timings) timings = chunk.timings;
      }
      return { backend: runtime.backend, threads: runtime.threads, usage, timings,
               ttftMs: firstAt === null ? null : firstAt - sent };
    },

    async generate(request, { onStarted, onReplyCreated, onToken, onTool, onStep, onLoad, signal } = {}) {
      const { modelInfo } = request;
      const options = { ...defaults, ...request.options };
      if (!modelInfo?.browser) {
        throw new EngineError("not_in_browser", `${request.model} cannot run in the browser; use the server engine`);
      }
      // 1. The user's message is stored before any model runs (under request.parentId when
      // it is an edit); a regenerated reply (request.regenerate) answers an existing one.
      let conversationId = request.conversationId;
      if (!conversationId) {
        conversationId = (await api.createConversation()).id;
        if (request.settings) await api.updateConversation(conversationId, { settings: request.settings });
      }
      let userMessage = null;
      // request.replyTo: a reply to a user message already stored (a compare's sibling).
      let answering = request.replyTo ?? request.parentId;
      // request.continueFrom: a cut-off reply of this conversation grows in place, as the
      // server's "continue" does; its partial text is the model's prefill.
      const continued = request.continueFrom ?? null;
      if (continued) answering = continued.parent_id;
      const newTurn = !request.regenerate && !request.replyTo && !continued;
      // With tools on in this conversation, what the first reply is told and held to, asked
      // before anything is stored: a tool that runs only on the server is refused unsent.
      let tools = await api.toolSetup(conversationId, newTurn ? null : answering);
      if (newTurn) {
        const body = { role: "user", content: request.content };
        if (request.parentId !== undefined) body.parent_id = request.parentId;
        if (request.attachments?.length) body.attachments = request.attachments;
        userMessage = await api.addMessage(conversationId, body);
        answering = userMessage.id;
      }
      // The history this reply sees: the branch above the message it answers, as far up as
      // the model's context reaches. A regenerated or continued reply reads from just above
      // itself; a new message is the current leaf.
      const below = continued?.id ?? request.regenerate ?? null;
      const branch = await readBranch(conversationId,
        { upTo: answering, below, system: withTools(options, tools).system });
      const { conversation } = branch;
      onStarted?.(conversation, userMessage);
      // The branch's files, as the server engines are given them (the same text, the same
      // passages when they do not all fit).
      const { path, files } = await withFiles(conversationId, branch.path, options);

      // 2. The model: from the browser's cache, or downloaded once from this app.
      let runtime;
      try {
        runtime = await ensureLoaded(modelInfo, request.backend ?? "auto", onLoad);
      } catch (err) {
        const error = err instanceof EngineError ? err : new EngineError("load_failed", describeLoadError(err));
        error.reply = await api.addMessage(conversationId, {
          role: "assistant", content: "", status: "failed", parent_id: answering,
          provenance: { engine: "browser", model: modelInfo.id, finish_reason: "error",
                        meta: { error: { code: error.code, message: error.message } } },
        });
        throw error;
      }

      // 3. Generate, streaming into the page. With tools on, the loop the server engines run:
      // a reply that is a tool call is posted as a step (the server runs the tools and stores
      // it as it stores its own), and the model goes on in the step's next reply, until it
      // answers in text (after BCHAT_TOOL_STEPS steps the server holds it to text).
      const provenance = { engine: "browser", backend: runtime.backend, model: modelInfo.id };
      // 3a. The reply's row exists from the start and grows as the page writes it, so a tab
      // closed (or crashed) mid-reply leaves what was written, marked "interrupted"; the steps
      // stored before it stay as they are.
      let current = continued
        ? await api.updateMessage(conversationId, continued.id,
          { content: continued.content, status: "streaming", continue: true })
        : await api.addMessage(conversationId, {
          role: "assistant", content: "", status: "streaming", parent_id: answering, provenance,
        });
      onReplyCreated?.(current);
      let text = continued?.content ?? "";
      let flushing = false;
      const flush = async () => {
        if (flushing) return;
        flushing = true;
        try {
          // Sent even when the text has not grown: it tells the server the page is alive.
          await api.updateMessage(conversationId, current.id, { content: text, status: "streaming" });
        } catch {
          /* the next tick tries again; the final update below must succeed */
        } finally {
          flushing = false;
        }
      };
      const timer = setInterval(flush, FLUSH_MS);
      const onPageHide = () => {
        api.updateMessageOnExit(conversationId, current.id, {
          content: text, status: "interrupted",
          provenance: { ...provenance, finish_reason: "interrupted", meta: { stop_reason: "page_closed" } },
        });
      };
      window.addEventListener("pagehide", onPageHide);
      // 3b. If this conversation's history is being read into the cache in the background,
      // that reading is this turn's prompt evaluation already under way: wait for it (showing
      // its progress) rather than start over; reading another conversation is abandoned.
      let finished;
      generating = new Promise((resolve) => {
        finished = resolve;
      });
      const pending = warming;
      if (pending) {
        if (pending.conversationId === conversationId) {
          if (onLoad) pending.listeners.add(onLoad);
          if (pending.progress) onLoad?.(pending.progress);
        } else {
          pending.controller.abort();
        }
        const stopWarming = () => pending.controller.abort();
        signal?.addEventListener("abort", stopWarming);
        await pending.promise;
        signal?.removeEventListener("abort", stopWarming);
        pending.listeners.delete(onLoad);
      }

      // One reply written by the model, into `text`: how it ended and its figures.
      const fresh = () => ({ pieces: 0, firstAt: null, lastAt: null, finishReason: null, usage: null, timings: null,
                             progress: null, promptStarted: performance.now(), status: "complete", failure: null });
      async function write(messages, grammar) {
        const run = fresh();
        if (signal?.aborted) return { ...run, status: "stopped" }; // stopped while a step ran
        try {
          const stream = await wllama.createChatCompletion({
            messages,
            stream: true,
            return_progress: true, // a chunk per prompt batch: "reading the conversation: 230/458"
            max_tokens: options.max_tokens,
            temperature: options.temperature,
            top_p: options.top_p,
            ...(Number.isInteger(options.seed) ? { seed: options.seed } : {}),
            ...(grammar ? { grammar } : {}), // the server's own tool grammar (GBNF), as its engine holds replies
            abortSignal: signal,
          });
          for await (const chunk of stream) {
            if (chunk.prompt_progress) {
              run.progress = readingProgress(chunk.prompt_progress);
              onLoad?.(run.progress);
            }
            const choice = chunk.choices?.[0];
            const delta = choice?.delta?.content;
            if (delta) {
              if (run.firstAt === null && run.progress) onLoad?.({ phase: "ready", ...runtime }); // read: now writing
              const now = performance.now();
              run.firstAt ??= now;
              run.lastAt = now;
              run.pieces += 1;
              text += delta;
              onToken?.(delta);
            }
            if (choice?.finish_reason) run.finishReason = choice.finish_reason;
            if (chunk.usage) run.usage = chunk.usage;
            if (chunk.timings) run.timings = chunk.timings;
            // No break on abort here: wllama ends the stream itself (and frees its slot) when
            // the signal fires; leaving the loop early would orphan its pending rejection.
          }
          if (signal?.aborted) run.status = "stopped";
        } catch (err) {
          if (signal?.aborted || err?.name === "AbortError" || err?.name === "WllamaAbortError") {
            run.status = "stopped";
          } else {
            run.status = "failed";
            run.failure = new EngineError("model_failed", `the model failed in the browser: ${err.message}`);
          }
        }
        return run;
      }

      // 4. What a reply is stored with: where and how fast, as server replies record them.
      function facts(run, { dropped, more }) {
        const { timings, usage, progress, pieces, firstAt, lastAt, status, failure } = run;
        const figures = wllamaFigures(timings, usage);
        const measured = pieces > 1 && lastAt > firstAt ? (pieces - 1) / ((lastAt - firstAt) / 1000) : null;
        const meta = {};
        if (dropped) meta.trimmed_messages = dropped;
        if (dropped && more) meta.trimmed_more = true; // and the ones above those read
        if (files.length) meta.files = files; // what it was given of the files (ⓘ lists them)
        // Prompt facts as the server engines record them: from llama.cpp's timings, else (a
        // reply stopped while the prompt was read) from the last progress step, else the clock.
        let promptTokens = usage?.prompt_tokens ?? null;
        if (timings) {
          meta.prompt_evaluated = timings.prompt_n; // only the new tokens when the KV cache is reused
          meta.prompt_cached = figures.prompt_cached;
          meta.prompt_ms = figures.prompt_ms;
          if (figures.prompt_tps) meta.prompt_per_second = rounded(figures.prompt_tps, 1);
          promptTokens = figures.prompt_tokens;
        } else if (progress) {
          meta.prompt_evaluated = progress.processed - progress.cached;
          meta.prompt_cached = progress.cached;
          meta.prompt_ms = progress.ms;
          promptTokens ??= progress.total;
        } else if (firstAt) {
          meta.prompt_ms = Math.round(firstAt - run.promptStarted);
        }
        // What it was made with and how long it took, as server replies record them (ⓘ).
        meta.options = { system: options.system ?? "", temperature: options.temperature, top_p: options.top_p,
                         max_tokens: options.max_tokens, seed: Number.isInteger(options.seed) ? options.seed : null };
        if (timings?.predicted_ms != null) meta.predicted_ms = rounded(timings.predicted_ms, 1);
        meta.threads = runtime.threads;
        if (runtime.note) meta.backend_note = runtime.note;
        if (status === "stopped") meta.stop_reason = "user";
        if (failure) meta.error = { code: failure.code, message: failure.message };
        return {
          ...provenance,
          prompt_tokens: promptTokens,
          completion_tokens: figures.completion_tokens ?? pieces,
          tokens_per_second: timings?.predicted_per_second && status === "complete"
            ? figures.decode_tps : rounded(measured, 2),
          finish_reason: status === "complete" ? run.finishReason ?? "stop" : status === "stopped" ? "stopped" : "error",
          meta,
        };
      }

      let run;
      let stored;
      let history = path;
      let prefill = continued?.content ?? null;
      try {
        // A continued reply that is already a call (its page closed before the step was stored):
        // the step is tried first, with the figures it has, as the server's continue runs a
        // reply's unrun calls; a call half written is written on instead.
        let unrun = Boolean(continued && tools.grammar && text.trimStart().startsWith(tools.call_opening));
        for (;;) {
          const { messages, dropped, more } = promptMessages(history, withTools(options, tools));
          // A continued reply ends the prompt as an assistant turn: llama.cpp's server (which
          // wllama runs) then prefills it and writes on from its last character.
          if (prefill !== null) messages.push({ role: "assistant", content: prefill });
          const retried = unrun;
          unrun = false;
          if (retried) {
            run = { ...fresh(), finishReason: "stop" };
            const { stop_reason: _, ...kept } = continued.meta ?? {};
            stored = { ...provenance, prompt_tokens: continued.usage?.prompt_tokens ?? null,
                       completion_tokens: continued.usage?.completion_tokens ?? null,
                       tokens_per_second: continued.tokens_per_second ?? null, finish_reason: "stop", meta: kept };
          } else {
            run = await write(messages, tools.grammar);
            stored = facts(run, { dropped, more });
          }
          // A call: the grammar let the reply be nothing else once it opened so, and it ended
          // on its own (one cut off by max_tokens is text, as on the server).
          if (!tools.grammar || run.status !== "complete" || run.finishReason !== "stop"
              || !text.trimStart().startsWith(tools.call_opening)) break;
          let step;
          try {
            step = await api.toolStep(conversationId, current.id, { content: text, provenance: stored });
          } catch (err) {
            if (err.code === "no_tool_calls" && retried) continue; // half a call: write on
            if (err.code === "no_tool_calls") break; // not a whole call after all: it stays text
            run.status = "failed";
            run.failure = new EngineError(err.code, `the tool step failed: ${err.message}`);
            stored = facts(run, { dropped, more });
            break;
          }
          for (const frame of step.tool_frames) onTool?.(frame);
          onStep?.(step); // the page shows the stored step and follows the next reply
          history = [...history, step.message, ...step.tool_messages];
          current = step.reply;
          text = "";
          prefill = null;
          tools = step.next;
        }
      } finally {
        finished();
        clearInterval(timer);
        window.removeEventListener("pagehide", onPageHide);
      }
      const reply = await api.updateMessage(conversationId, current.id, { content: text, status: run.status,
                                                                         provenance: stored });
      if (run.failure) {
        run.failure.reply = reply;
        throw run.failure;
      }
      return reply;
    },
  };
}

// The options a reply runs with: with tools on, bchat's tool instructions (the server's,
// GET …/tool-setup) after the system prompt, where the server engines put them.
function withTools(options, tools) {
  if (!tools?.instructions) return options;
  return { ...options, system: options.system ? `${options.system}\n\n${tools.instructions}` : tools.instructions };
}

// llama.cpp's prompt_progress (total, cache, processed, time_ms): processed counts the cached
// tokens too, so "230/458" reads as how much of the conversation the model has in mind.
function readingProgress(p) {
  return { phase: "reading", processed: p.processed, total: p.total, cached: p.cache ?? 0,
           ms: Math.round(p.time_ms ?? 0) };
}

function describeLoadError(err) {
  const message = String(err?.message ?? err);
  if (/quota|QuotaExceeded|storage/i.test(message)) {
    return `the browser has no room to keep the model (${message})`;
  }
  if (/memory|OOM|allocation|RangeError/i.test(message)) {
    return `the browser ran out of memory loading the model (${message})`;
  }
  return `the model could not be loaded in this browser (${message})`;
}
