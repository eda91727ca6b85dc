// Compare: one prompt to 2–4 (engine, model) pairs at once. The server's replies come from one
// "compare" socket frame (sibling replies under one user message, streaming side by side);
// a browser target runs in this page and stores its reply under the same user message.
// Each column shows the reply and its figures; "Use this reply" makes it the current branch.
import { createStreamRenderer } from "../render.js";
import { iconButton } from "./icons.js";
import { ms, promptTokensPerSecond, size, tokensPerSecond } from "../format.js";
import { api } from "../api.js";
import { modelInfo, modelsFor, state } from "../state.js";
import { createPanel, el, factRows, field, option, selectBox } from "./panel.js";
import { displayName, runFacts, runName } from "./model_card.js";

const MAX_TARGETS = 4;

// The figures of one stored reply (and the time to its first token, measured here); facts:
// those of the file the engine ran (model_card.js runFacts: a page runs its own copy).
export function replyFigures(message, facts = {}, ttftMs = null) {
  const usage = message?.usage ?? {};
  const meta = message?.meta ?? {};
  const evaluated = meta.prompt_evaluated ?? (usage.prompt_tokens != null ? usage.prompt_tokens - (meta.prompt_cached ?? 0) : null);
  return [
    ["First token", ms(ttftMs), "ttft"],
    ["Prompt", tokensPerSecond(promptTokensPerSecond(evaluated, meta.prompt_ms)), "prompt-tps"],
    ["Decode", tokensPerSecond(message?.tokens_per_second), "decode-tps"],
    ["Tokens", usage.completion_tokens != null ? String(usage.completion_tokens) : "–", "tokens"],
    ["Quantisation", facts.quantization ?? "–", "quant"],
    ["Bits/weight", facts.bits_per_weight ? facts.bits_per_weight.toFixed(2) : "–", "bpw"],
    ["Size", size(facts.file_size), "size"],
  ];
}

// hooks: options (data-options: each option's range), server (the page's server engine),
// loadBrowserEngine() -> Promise<engine>, backend() -> the browser backend picked,
// openConversation(id) -> show it in the normal view.
export function initCompare(button, hooks) {
  if (!button) return null;
  const { options: ranges, server, loadBrowserEngine, backend, openConversation } = hooks;
  const panel = createPanel({ title: "Compare models", testid: "compare-panel", className: "compare-panel", opener: button,
                              onOpen: opened });

  const targetList = el("div", "compare-targets", null, { role: "group", "aria-label": "Models to compare" });
  const addTarget = el("button", "button small", "Add a model", { type: "button", testid: "compare-add" });
  const prompt = el("textarea", "text-input", null, { rows: 3, testid: "compare-prompt",
                                                       placeholder: "One message, sent to every model" });
  const maxTokens = el("input", "text-input", null, { type: "number", min: ranges.max_tokens.min, max: ranges.max_tokens.max,
                                                      testid: "compare-max-tokens" });
  maxTokens.value = "128"; // shorter than a chat's replies: a comparison reads several side by side
  const send = el("button", "button primary", "Compare", { type: "submit", testid: "compare-send" });
  const stop = el("button", "button danger", "Stop all", { type: "button", testid: "compare-stop", hidden: true });
  const form = el("form", "compare-form");
  const actions = el("div", "compare-actions");
  actions.append(field("Max reply tokens", maxTokens, "narrow"), el("span", "spacer"), stop, send);
  form.append(targetList, addTarget, field("Message", prompt), actions);

  // The question stays on screen above its answers (the box keeps it too, to ask others).
  const question = el("blockquote", "compare-question", null, { testid: "compare-question", hidden: true });
  const tabs = el("div", "compare-tabs", null, { role: "tablist", "aria-label": "Replies" });
  const columns = el("div", "compare-columns", null, { testid: "compare-columns" });
  panel.body.append(form, question, tabs, columns);

  function fillModels(select, engine, preferred) {
    const usable = modelsFor(engine);
    select.replaceChildren(...usable.map((m) => option(m.id, displayName(m.id))));
    if (usable.some((m) => m.id === preferred)) select.value = preferred;
  }

  function addRow(engine = "server", model = null) {
    const index = targetList.children.length + 1;
    const row = el("div", "compare-target", null, { testid: "compare-target" });
    const engines = [option("server", "Server")];
    if (modelsFor("browser").length) engines.push(option("browser", "This browser"));
    const engineBox = selectBox(`Where model ${index} runs`, engines, "compare-engine");
    engineBox.select.value = engine;
    const modelBox = selectBox(`Model ${index}`, [], "compare-model");
    modelBox.wrap.classList.add("grow");
    fillModels(modelBox.select, engineBox.select.value, model);
    engineBox.select.addEventListener("change", () => fillModels(modelBox.select, engineBox.select.value, modelBox.select.value));
    const remove = iconButton("x", `Remove model ${index}`, { testid: "compare-remove", onClick: () => {
      row.remove();
      updateRows();
    } });
    row.append(engineBox.wrap, modelBox.wrap, remove);
    targetList.append(row);
    updateRows();
  }

  function updateRows() {
    const count = targetList.children.length;
    addTarget.disabled = count >= MAX_TARGETS;
    for (const remove of targetList.querySelectorAll('[data-testid="compare-remove"]')) remove.disabled = count <= 2;
  }

  function targets() {
    return [...targetList.children].map((row) => ({
      engine: row.querySelector('[data-testid="compare-engine"]').value,
      model: row.querySelector('[data-testid="compare-model"]').value,
    })).filter((t) => t.model);
  }

  addTarget.addEventListener("click", () => addRow("server", modelsFor("server")[0]?.id));

  let running = null; // {controllers}

  function selectTab(index) {
    [...tabs.children].forEach((tab, i) => {
      tab.setAttribute("aria-selected", String(i === index));
      tab.tabIndex = i === index ? 0 : -1;
    });
    [...columns.children].forEach((column, i) => column.classList.toggle("active", i === index));
  }

  tabs.addEventListener("keydown", (event) => {
    const current = [...tabs.children].findIndex((t) => t.getAttribute("aria-selected") === "true");
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = (current + step + tabs.children.length) % tabs.children.length;
    selectTab(next);
    tabs.children[next].focus();
  });

  function makeColumn(target, index, job) {
    const info = modelInfo(target.model);
    const where = target.engine === "browser" ? "This browser" : "Server";
    const column = el("section", "compare-column", null, { testid: "compare-column", id: `compare-column-${index}`,
                                                            role: "tabpanel", "aria-labelledby": `compare-tab-${index}` });
    column.dataset.engine = target.engine;
    const name = runName(target.model, target.engine);
    const tab = el("button", "compare-tab", `${index + 1}. ${name}`,
                   { type: "button", id: `compare-tab-${index}`, role: "tab", "aria-controls": column.id });
    tab.addEventListener("click", () => selectTab(index));
    tabs.append(tab);
    const head = el("header", "compare-column-head");
    const status = el("span", "compare-status", "waiting…", { testid: "compare-status" });
    head.append(el("span", "compare-engine", where), el("strong", "compare-model", name, { title: target.model }), status);
    const body = el("div", "body compare-body");
    const renderer = createStreamRenderer(body);
    const stats = el("dl", "compare-stats", null, { testid: "compare-stats" });
    const use = el("button", "button small primary", "Use this reply", { type: "button", testid: "compare-use",
                   disabled: true, "aria-label": `Use the reply of ${where} · ${name}` });
    column.append(head, body, stats, use);
    columns.append(column);
    let firstAt = null;
    const showFigures = (message) => {
      stats.replaceChildren(...factRows(replyFigures(message, runFacts(info, target.engine),
                                                     firstAt === null ? null : firstAt - job.sentAt)));
    };
    showFigures(null);
    use.addEventListener("click", async () => {
      try {
        await api.updateConversation(job.conversationId, { current_message_id: column.dataset.messageId });
        panel.dialog.close();
        await openConversation(job.conversationId);
      } catch (err) {
        panel.problem(err.message);
      }
    });
    return {
      identify(id) {
        column.dataset.messageId = id;
      },
      token(text) {
        firstAt ??= performance.now();
        status.textContent = "writing…";
        renderer.append(text);
      },
      status(text) {
        status.textContent = text;
      },
      settle(message) {
        renderer.finish(message.content ?? renderer.text);
        if (message.id) column.dataset.messageId = message.id;
        column.dataset.status = message.status;
        status.textContent = message.status === "complete" ? "done" : message.status;
        showFigures(message);
        use.disabled = !column.dataset.messageId;
      },
      fail(message) {
        column.dataset.status = "failed";
        status.textContent = "failed";
        panel.problem(message);
        use.disabled = !column.dataset.messageId;
      },
    };
  }

  async function startServer(list, job, content, options) {
    const frame = await server.compare({ conversationId: job.conversationId, content, options,
                                         models: list.map(({ target }) => target.model) });
    job.conversationId = frame.conversation_id;
    job.userMessageId = frame.user_message.id;
    // Followed in this task: no token frame can come before its listener.
    return list.map(({ column }, i) => {
      const id = frame.message_ids[i];
      column.identify(id);
      const controller = new AbortController();
      job.controllers.push(controller);
      return server.follow(id, "", {
        signal: controller.signal,
        onToken: (text) => column.token(text),
        onQueued: (position) => column.status(`queued (${position} ahead)`),
      }).then((message) => column.settle(message), (err) => {
        if (err.reply) column.settle(err.reply);
        else column.fail(err.message);
      });
    });
  }

  async function runBrowser(list, job, content, options) {
    for (const { target, column } of list) {
      if (job.stopped) break;
      const controller = new AbortController();
      job.controllers.push(controller);
      try {
        const engine = await loadBrowserEngine();
        const info = modelInfo(target.model);
        const stored = await engine.generate({
          conversationId: job.conversationId, replyTo: job.userMessageId ?? undefined, content,
          model: target.model, modelInfo: info, backend: backend(), options,
        }, {
          signal: controller.signal,
          onStarted: (conversation, userMessage) => {
            job.conversationId = conversation.id;
            if (userMessage) job.userMessageId = userMessage.id;
          },
          onReplyCreated: (message) => column.identify(message.id),
          onLoad: (progress) => column.status(progress.phase === "ready" ? "running…" : `loading the model (${progress.phase})…`),
          onToken: (text) => column.token(text),
        });
        column.settle(stored);
      } catch (err) {
        if (err.reply) column.settle(err.reply);
        column.fail(err.message);
      }
    }
  }

  async function run() {
    const chosen = targets();
    const content = prompt.value;
    if (running || !content.trim()) return;
    if (chosen.length < 2) {
      panel.problem("Pick at least two models to compare.");
      return;
    }
    panel.problem("");
    tabs.replaceChildren();
    columns.replaceChildren();
    question.replaceChildren(el("span", "compare-question-label", "You asked"), el("p", "", content));
    question.hidden = false;
    columns.dataset.count = String(chosen.length);
    const job = { conversationId: state.conversationId, userMessageId: null, controllers: [], stopped: false, sentAt: performance.now() };
    const laid = chosen.map((target, i) => ({ target, column: makeColumn(target, i, job) }));
    selectTab(0);
    const options = {};
    const max = Number.parseInt(maxTokens.value, 10);
    if (Number.isFinite(max) && max > 0) options.max_tokens = max;
    running = job;
    send.hidden = true;
    stop.hidden = false;
    try {
      const servers = laid.filter((l) => l.target.engine === "server");
      const browsers = laid.filter((l) => l.target.engine === "browser");
      // The server's replies are under way before the browser starts (it needs their user message).
      const pending = servers.length ? await startServer(servers, job, content, options) : [];
      await Promise.all([...pending, runBrowser(browsers, job, content, options)]);
    } catch (err) {
      panel.problem(err.message);
    } finally {
      running = null;
      send.hidden = false;
      stop.hidden = true;
      columns.dataset.conversationId = job.conversationId ?? "";
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  stop.addEventListener("click", () => {
    if (!running) return;
    running.stopped = true;
    for (const controller of running.controllers) controller.abort();
  });

  // Two models to start from the first time (one in this browser where one runs there).
  function opened() {
    if (!targetList.children.length) {
      const serverModels = modelsFor("server");
      addRow("server", serverModels[0]?.id);
      if (modelsFor("browser").length) addRow("browser", modelsFor("browser")[0].id);
      else addRow("server", serverModels[1]?.id ?? serverModels[0]?.id);
    }
    prompt.focus();
  }

  // Open with these server models side by side (the Models panel's variants of one family).
  return {
    openWith(models) {
      if (running) return;
      targetList.replaceChildren();
      for (const id of models.slice(0, MAX_TARGETS)) addRow("server", id);
      while (targetList.children.length < 2) addRow("server", models[0]);
      panel.problem("");
      panel.dialog.showModal();
      prompt.focus();
    },
  };
}
