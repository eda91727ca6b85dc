// The chat page: wires the conversation list, the message view, the composer and the engines.
// The browser engine (wllama, 275 KB before its wasm) is imported only when it is picked.
import { api } from "./api.js";
import { ChatSocket } from "./socket.js";
import { createServerEngine } from "./engines/server.js";
import { BrowserStatus } from "./ui/browser_status.js";
import { Sharing } from "./ui/sharing.js";
import { ConversationList } from "./ui/conversations.js";
import { MessageView } from "./ui/messages.js";
import { fillIcons, icon } from "./ui/icons.js";
import { pathTo, siblingsByParent } from "./tree.js";
import { Composer } from "./ui/composer.js";
import { ContextMeter } from "./ui/context.js";
// ui2: compare, benchmark, API keys, reply format
import { initCompare } from "./ui/compare.js";
import { initBenchmark } from "./ui/benchmark.js";
import { initApiKeys } from "./ui/api_keys.js";
import { initReplyFormat, readReplyFormat, showReplyFormat } from "./ui/reply_format.js";

const root = document.getElementById("app");
const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);

// Each option's default and range as the server serves them (webapp/options.py page_options):
// the page writes no default of its own.
const OPTIONS = JSON.parse(root.dataset.options);
const optionDefaults = Object.fromEntries(Object.entries(OPTIONS)
  .filter(([, spec]) => spec.default !== null).map(([name, spec]) => [name, spec.default]));

const state = {
  conversationId: root.dataset.conversationId || null,
  conversation: null, // the open conversation's tree, as GET /api/conversations/<id> gives it
};

fillIcons(root);

// Replies being written that this page follows, by message id. A reply goes on while the user
// looks at another conversation; coming back shows it still growing.
const live = new Map();

class LiveReply {
  constructor({ conversationId, model, controller }) {
    this.conversationId = conversationId;
    this.model = model;
    this.controller = controller;
    this.messageId = null;
    this.text = "";
    this.view = null; // the message view's handle while this conversation is on screen
    this.position = null;
  }

  identify(messageId) {
    this.messageId = messageId;
    live.set(messageId, this);
    if (this.view?.node) this.view.node.dataset.messageId = messageId;
  }

  token(text) {
    this.text += text;
    this.position = null;
    this.view?.append(text);
  }

  queued(position) {
    this.position = position;
    this.view?.queued(position);
  }

  show() {
    this.view = view.startReply(this.model, { id: this.messageId, text: this.text });
    if (this.position) this.view.queued(this.position);
    return this.view;
  }

  settle(message) {
    this.view?.settle(message);
    if (this.conversationId === state.conversationId) meter.fromMessage(message);
    this.end();
  }

  end() {
    if (this.messageId) live.delete(this.messageId);
    this.view = null;
    updateControls();
  }
}

function liveFor(conversationId) {
  if (!conversationId) return null;
  for (const reply of live.values()) if (reply.conversationId === conversationId) return reply;
  return pendingSend?.conversationId === conversationId ? pendingSend : null;
}

let pendingSend = null; // a reply asked for whose message id is not known yet

function updateControls() {
  const active = liveFor(state.conversationId);
  stopButton.hidden = !active;
  sendButton.hidden = Boolean(active);
  sendButton.disabled = Boolean(active) || !composerState.canSend;
}

const socket = new ChatSocket();
const engines = { server: createServerEngine(socket), browser: null };
let browserEngineLoading = null;

function loadBrowserEngine() {
  browserEngineLoading ??= import("./engines/browser.js").then((module) => {
    engines.browser = module.createBrowserEngine({ api, defaults: optionDefaults });
    return engines.browser;
  }, (err) => {
    browserEngineLoading = null; // a later pick tries again
    throw err;
  });
  return browserEngineLoading;
}

const welcome = $("welcome");
const view = new MessageView($("messages"), {
  scroller: $("scroller"),
  onChange: (count) => {
    welcome.hidden = count > 0;
  },
});
const composer = $("composer");
const sendButton = $("send");
const stopButton = $("stop");
const modelSelect = $("model-select");
const errorBox = $("error");
const engineSelect = $("engine-select");
const backendSelect = $("backend-select");
const browserStatus = new BrowserStatus($("browser-status"));
const title = root.querySelector(".chat-title");
const settings = {
  system: $("system-prompt"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
};
for (const [name, input] of [["temperature", settings.temperature], ["max_tokens", settings.maxTokens]]) {
  Object.assign(input, { min: OPTIONS[name].min, max: OPTIONS[name].max, step: OPTIONS[name].step });
}
settings.system.maxLength = OPTIONS.system.max_length;

// Reply settings belong to the conversation (stored on the server with it, in its export and
// share); a new conversation starts from the visitor's defaults, never from another's.
let defaults = {};
let pendingSettings = {}; // a conversation not created yet: sent with its first message

function currentSettings() {
  return state.conversation ? state.conversation.settings ?? {} : pendingSettings;
}

function showSettings(values = currentSettings()) {
  showReplyFormat(values);
  settings.system.value = values.system ?? "";
  settings.temperature.value = values.temperature ?? OPTIONS.temperature.default;
  settings.maxTokens.value = values.max_tokens ?? OPTIONS.max_tokens.default;
  if (values.model && modelInfo(values.model)) modelSelect.value = values.model;
  if (values.engine) engineSelect.value = values.engine;
}

function readSettings() {
  const values = { system: settings.system.value.trim() ? settings.system.value : null };
  const temperature = Number.parseFloat(settings.temperature.value);
  values.temperature = Number.isFinite(temperature) ? temperature : null;
  const maxTokens = Number.parseInt(settings.maxTokens.value, 10);
  values.max_tokens = Number.isFinite(maxTokens) ? maxTokens : null;
  values.model = modelSelect.value || null;
  values.engine = engineSelect.value || null;
  return values;
}

async function settingsChanged() {
  const values = readSettings();
  if (!state.conversation) {
    pendingSettings = Object.fromEntries(Object.entries(values).filter(([, v]) => v !== null));
    return;
  }
  try {
    const updated = await api.updateConversation(state.conversation.id, { settings: values });
    if (state.conversation?.id === updated.id) state.conversation.settings = updated.settings;
  } catch (err) {
    showError(err.message, { cause: "settings" });
  }
}

// The options a reply is made with, for the engine that runs in this page (the server reads
// the conversation's own settings).
function replyOptions(values = currentSettings()) {
  const options = {};
  for (const name of ["system", "temperature", "top_p", "max_tokens", "seed"]) {
    if (values[name] !== undefined && values[name] !== null && values[name] !== "") options[name] = values[name];
  }
  return options;
}

// A banner says what went wrong until its cause is gone (the socket is back, another
// conversation is opened, the next message is sent) or the reader dismisses it.
let retryAction = null;

function showError(message, { offerServer = false, cause = "", retry = null } = {}) {
  $("error-text").textContent = message;
  $("use-server").hidden = !offerServer;
  retryAction = retry;
  $("retry").hidden = !retry;
  errorBox.hidden = !message;
  errorBox.dataset.cause = cause;
}

function clearError(cause) {
  if (!errorBox.hidden && (!cause || errorBox.dataset.cause === cause)) showError("");
}

$("dismiss-error").addEventListener("click", () => showError(""));

$("retry").addEventListener("click", () => {
  const retry = retryAction;
  showError("");
  retry?.();
});

$("use-server").addEventListener("click", () => {
  engineSelect.value = "server";
  engineChanged();
  showError("");
});

const list = new ConversationList($("conversation-list"), {
  onOpen: (id) => openConversation(id, { push: true }),
  onRename: async (id, newTitle) => {
    try {
      await api.rename(id, newTitle);
      if (id === state.conversationId) title.textContent = newTitle;
      await refreshList();
    } catch (err) {
      showError(err.message);
    }
  },
  onDelete: async (id) => {
    try {
      await api.remove(id);
      if (id === state.conversationId) newChat({ push: true });
      await refreshList();
    } catch (err) {
      showError(err.message);
    }
  },
});

let lastList = [];

const sharing = new Sharing(root, {
  onError: (message) => showError(message),
  onChanged: () => refreshList(),
  onImported: (id) => openConversation(id, { push: true }),
});

let searchQuery = "";

async function refreshList() {
  // side by side: neither list waits for the other
  const [{ conversations }] = await Promise.all([api.conversations(), sharing.refreshList()]);
  lastList = conversations;
  if (searchQuery) await runSearch();
  else list.render(conversations, state.conversationId);
}

let searchTicket = 0;

async function runSearch() {
  const ticket = ++searchTicket;
  const query = searchQuery;
  if (!query) {
    list.render(lastList, state.conversationId);
    $("search-status").textContent = "";
    return;
  }
  try {
    const { results } = await api.search(query);
    if (ticket !== searchTicket) return;
    list.renderResults(results, query);
    $("search-status").textContent = `${results.length || "No"} conversation${results.length === 1 ? "" : "s"} found`;
  } catch (err) {
    showError(err.message, { cause: "search" });
  }
}

function isShared(id) {
  return lastList.some((c) => c.id === id && c.shared);
}

let models = [];

function modelInfo(id) {
  return models.find((m) => m.id === id);
}

// The tokens the chosen model can see at once here: the server runs embedded models with
// BCHAT_N_CTX, the browser engine with its own 4,096; neither beyond the model's own.
const BROWSER_N_CTX = 4096;

function contextLength() {
  const facts = modelInfo(modelSelect.value)?.facts ?? {};
  const limits = [facts.context_length, facts.n_ctx,
    engineSelect.value === "browser" ? BROWSER_N_CTX : Number(root.dataset.nCtx)];
  const known = limits.filter((n) => Number.isFinite(n) && n > 0);
  return known.length ? Math.min(...known) : null;
}

function engineChanged({ save = true } = {}) {
  const engine = engineSelect.value;
  if (save) localStorage.setItem("bchat.engine", engine);
  root.querySelector(".backend-choice").hidden = engine !== "browser";
  for (const option of modelSelect.options) {
    option.disabled = !modelInfo(option.value)?.engines.includes(engine);
  }
  if (modelSelect.selectedOptions[0]?.disabled) {
    const usable = [...modelSelect.options].find((o) => !o.disabled);
    if (usable) modelSelect.value = usable.value;
  }
  if (engine === "browser") {
    browserStatus.describe(modelInfo(modelSelect.value), engines.browser?.loaded);
    loadBrowserEngine().then((browser) => {
      if (engineSelect.value !== "browser") return;
      browserStatus.describe(modelInfo(modelSelect.value), browser.loaded);
      preloadBrowser();
    }, (err) => showError(`The browser engine could not be loaded: ${err.message}`, { cause: "engine" }));
  } else {
    browserStatus.hide();
  }
  showModelCard();
  meter.update();
}

// Picking the browser engine starts the wasm and model download (and reads the open
// conversation's branch into the model's cache), so Send does not wait for them.
function preloadBrowser() {
  const info = modelInfo(modelSelect.value);
  if (engineSelect.value !== "browser" || !info?.browser || !engines.browser) return;
  engines.browser.preload(info, backendSelect.value, (progress) => browserStatus.update(info, progress),
                          { conversationId: state.conversationId, options: replyOptions() }).catch(() => {});
}

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

// The welcome state's model card: what will answer, and where it runs.
function showModelCard() {
  const card = $("model-card");
  const model = modelInfo(modelSelect.value);
  if (!model) {
    card.hidden = true;
    return;
  }
  const f = model.facts ?? {};
  const name = $("model-card-name");
  name.replaceChildren(icon("spark", { size: 18 }), f.name && f.name !== model.id ? `${f.name} (${model.id})` : model.id);
  const facts = [
    ["Parameters", f.parameters ? parameterCount(f.parameters) : null],
    ["Quantisation", f.quantization],
    ["Size", f.file_size ? size(f.file_size) : null],
    ["Context", contextLength() ? `${contextLength().toLocaleString("en")} tokens` : null],
    ["Runs", engineSelect.value === "browser" ? "in this browser" : `on the server${model.served_by && model.served_by !== "llamacpp" ? ` (${model.served_by})` : ""}`],
  ].filter(([, value]) => value);
  $("model-facts").replaceChildren(...facts.map(([term, value]) => {
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

async function loadModels() {
  const listing = await api.models();
  models = listing.models;
  const defaultModel = listing.default;
  modelSelect.replaceChildren(
    ...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      const f = m.facts ?? {};
      const size = f.file_size ? ` · ${(f.file_size / 2 ** 20).toFixed(0)} MiB` : "";
      option.textContent = `${m.id}${f.quantization ? ` (${f.quantization}${size})` : ""}`;
      return option;
    }),
  );
  modelSelect.value = localStorage.getItem("bchat.model") || defaultModel || "";
  if (!modelSelect.value && models.length) modelSelect.value = models[0].id;
  if (!models.length) showError("This server has no models: see BCHAT_MODEL_PATH in the README.", { cause: "models" });
  engineSelect.value = localStorage.getItem("bchat.engine") || "server";
  backendSelect.value = localStorage.getItem("bchat.backend") || "auto";
  engineChanged();
}

function detachViews() {
  for (const reply of live.values()) reply.view = null;
  if (pendingSend) pendingSend.view = null;
}

function newChat({ push }) {
  state.conversationId = null;
  state.conversation = null;
  pendingSettings = { ...defaults };
  showSettings(pendingSettings);
  detachViews();
  view.clear();
  meter.reset();
  clearError("conversation");
  closeDrawerOnPhone();
  updateControls();
  sharing.open(null);
  title.textContent = "New chat";
  if (push) history.pushState({}, "", "/");
  list.render(lastList, null);
  composer.focus();
}

// A reply still being written when its conversation is opened: the page's own (shown as
// it grows), or a server run to resume from the text stored so far.
function showStreaming(message, conversationId) {
  const mine = live.get(message.id);
  if (mine) {
    mine.show();
    return;
  }
  if (message.engine !== "server") {
    view.add(message); // written by another page: shown as stored
    return;
  }
  const reply = new LiveReply({ conversationId, model: message.model, controller: new AbortController() });
  reply.text = message.content;
  reply.identify(message.id);
  reply.show();
  engines.server.follow(message.id, message.content, {
    signal: reply.controller.signal,
    onToken: (text) => reply.token(text),
    onQueued: (position) => reply.queued(position),
  }).then((stored) => reply.settle(stored), (err) => {
    if (err.reply) reply.settle(err.reply);
    else reply.end();
    if (state.conversationId === conversationId) showError(err.message);
  });
}

let opening = 0; // the latest openConversation wins when clicks overlap

// The branch on screen (root to current leaf), each message with its tree controls.
function render(conversation, { follow = true } = {}) {
  detachViews();
  view.clear();
  const groups = siblingsByParent(conversation.messages);
  const branch = pathTo(conversation.messages, conversation.current_message_id);
  const busy = Boolean(liveFor(conversation.id));
  for (const m of branch) {
    const siblings = groups.get(m.parent_id ?? null) ?? [m];
    const position = siblings.indexOf(m) + 1;
    const controls = {
      siblings: { position, count: siblings.length,
                  prev: () => switchTo(siblings[position - 2]), next: () => switchTo(siblings[position]) },
    };
    if (m.status === "streaming") {
      showStreaming(m, conversation.id);
      continue;
    }
    if (!busy && m.role === "user") controls.edit = (text) => send({ content: text, parentId: m.parent_id ?? null });
    if (!busy && m.role === "assistant" && m.parent_id) {
      controls.regenerate = () => send({ regenerate: m });
      const cutOff = (m.status === "complete" && m.finish_reason === "length")
        || m.status === "stopped" || m.status === "interrupted";
      const last = !conversation.messages.some((other) => other.parent_id === m.id);
      if (cutOff && last) controls.continue = () => send({ continueFrom: m });
    }
    view.add(m, { follow: false, controls });
  }
  const pending = pendingSend?.conversationId === conversation.id ? pendingSend : null;
  if (pending && !pending.messageId && pending.view === null) pending.show();
  if (follow) view.scrollToEnd({ force: true });
  meter.fromMessages(branch);
}

// ‹ › : show another version of a message (and the branch that continues from it).
async function switchTo(message) {
  if (!message || !state.conversation) return;
  try {
    const conversation = await api.updateConversation(state.conversation.id, { current_message_id: message.id });
    if (state.conversation?.id !== conversation.id) return;
    state.conversation = conversation;
    render(conversation, { follow: false });
  } catch (err) {
    showError(err.message, { cause: "conversation" });
  }
}

// The open conversation as the server has it now (after a reply is over).
async function refreshConversation(id) {
  if (state.conversationId !== id) return;
  try {
    const conversation = await api.conversation(id);
    if (state.conversationId !== id || liveFor(id)) return;
    state.conversation = conversation;
    render(conversation, { follow: view.pinned });
  } catch {
    /* the next open shows it */
  }
}

async function openConversation(id, { push, prefetched = null }) {
  const ticket = ++opening;
  try {
    const conversation = (await prefetched) ?? await api.conversation(id);
    if (ticket !== opening) return;
    state.conversationId = conversation.id;
    state.conversation = conversation;
    title.textContent = conversation.title;
    showSettings(conversation.settings ?? {});
    engineChanged({ save: false });
    render(conversation);
    closeDrawerOnPhone();
    updateControls();
    if (push) history.pushState({}, "", `/c/${encodeURIComponent(id)}`);
    showError("");
    await refreshList();
    sharing.open(conversation.id, { shared: isShared(conversation.id) });
    preloadBrowser();
  } catch (err) {
    showError(err.status === 404 ? "That conversation does not exist (or is not yours)." : err.message,
      { cause: "conversation" });
    state.conversationId = null;
  }
}

// Merge what a run's "started" said into the open conversation's tree and show it: the new
// user message (if any) and the reply (streaming) become the current branch.
function applyStarted(conversationId, { conversation = null, userMessage = null, reply = null } = {}) {
  if (state.conversationId !== conversationId) return;
  if (conversation?.messages) {
    state.conversation = conversation;
  } else if (state.conversation?.id === conversationId) {
    if (conversation) Object.assign(state.conversation, { title: conversation.title, settings: conversation.settings });
  } else {
    state.conversation = { ...(conversation ?? { id: conversationId }), messages: [], current_message_id: null };
  }
  const tree = state.conversation;
  for (const message of [userMessage, reply]) {
    if (!message) continue;
    const index = tree.messages.findIndex((m) => m.id === message.id);
    if (index >= 0) tree.messages[index] = { ...tree.messages[index], ...message };
    else tree.messages.push(message);
  }
  tree.current_message_id = reply?.id ?? userMessage?.id ?? tree.current_message_id;
  render(tree);
}

// Send the composer's text, or: an edited message ({content, parentId}), a regenerated
// reply ({regenerate: reply}), more of a cut-off reply ({continueFrom: reply}).
async function send(action = null) {
  const content = action ? action.content : composer.value;
  if ((!action && !content.trim()) || liveFor(state.conversationId) || pendingSend) return;
  if (!action && !composerState.check()) return; // over a limit: the note under the composer says which
  showError("");
  // Continuing runs on the server: the page's engine cannot reopen a stored reply.
  const engineName = action?.continueFrom ? "server" : engineSelect.value;
  const model = action?.continueFrom?.engine === "server" ? action.continueFrom.model : modelSelect.value;
  const reply = new LiveReply({ conversationId: state.conversationId, model, controller: new AbortController() });
  if (action?.continueFrom) reply.text = action.continueFrom.content;
  pendingSend = reply;
  updateControls();
  const onScreen = () => state.conversationId === reply.conversationId;
  const newConversation = !state.conversationId;
  const settingsForNew = newConversation ? { ...pendingSettings, ...readSettings() } : null;
  const replyFormat = readReplyFormat();
  if (settingsForNew && replyFormat) settingsForNew.response_format = replyFormat;
  try {
    const engine = engineName === "browser" ? await loadBrowserEngine() : engines.server;
    const request = {
      conversationId: state.conversationId,
      content,
      model,
      modelInfo: modelInfo(model),
      backend: backendSelect.value,
      options: engineName === "browser" ? replyOptions(settingsForNew ?? currentSettings()) : {},
      settings: settingsForNew ? Object.fromEntries(Object.entries(settingsForNew).filter(([, v]) => v !== null)) : null,
    };
    if (action && "parentId" in action) request.parentId = action.parentId;
    if (action?.regenerate) {
      request.regenerate = action.regenerate.id;
      request.parentId = action.regenerate.parent_id;
    }
    if (action?.continueFrom) request.continueFrom = action.continueFrom;
    const stored = await engine.generate(request, {
      signal: reply.controller.signal,
      onStarted: (conversation, userMessage, frame) => {
        const wasOnScreen = onScreen();
        if (!action) {
          composer.value = ""; // stored on the server: safe to clear
          composerState.changed();
        }
        reply.conversationId = conversation.id;
        if (frame?.message_id) reply.identify(frame.message_id);
        if (wasOnScreen) {
          if (state.conversationId !== conversation.id) {
            state.conversationId = conversation.id;
            state.conversation = null;
            history.pushState({}, "", `/c/${encodeURIComponent(conversation.id)}`);
          }
          title.textContent = conversation.title;
          sharing.open(conversation.id, { shared: isShared(conversation.id) });
          applyStarted(conversation.id, { conversation, userMessage, reply: frame?.reply ?? null });
        }
        updateControls();
        refreshList().catch(() => {});
      },
      onReplyCreated: (message) => {
        reply.identify(message.id);
        applyStarted(reply.conversationId, { reply: message });
      },
      onQueued: (position) => reply.queued(position),
      onLoad: (progress) => {
        browserStatus.update(modelInfo(model), progress);
        if (progress.phase !== "ready") reply.view?.loading(progress);
      },
      onToken: (text) => reply.token(text),
    });
    reply.settle(stored);
  } catch (err) {
    if (err.reply) reply.settle(err.reply);
    else {
      reply.view?.settle({ role: "assistant", content: reply.text, status: "failed", model });
      reply.end();
    }
    if (onScreen()) {
      const loadProblem = ["load_failed", "webgpu_unavailable", "not_in_browser"].includes(err.code);
      // The server's model process stopped (or is starting again): the partial reply is
      // kept, and Retry writes a new one beside it once the model is back.
      const modelDown = ["model_crashed", "model_starting"].includes(err.code);
      const failed = err.reply;
      showError(err.message, { offerServer: engineName === "browser" && loadProblem,
                               cause: err.code === "disconnected" ? "socket" : "",
                               retry: modelDown && failed?.parent_id ? () => send({ regenerate: failed }) : null });
    }
  } finally {
    if (pendingSend === reply) pendingSend = null;
    updateControls();
    if (reply.conversationId) refreshConversation(reply.conversationId);
    refreshList().catch(() => {});
  }
}

composer.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
for (const example of root.querySelectorAll('[data-testid="example"]')) {
  example.addEventListener("click", () => {
    composer.value = example.textContent;
    composerState.changed();
    composer.focus();
  });
}
root.querySelector(".composer-form").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("save-defaults").addEventListener("click", async () => {
  try {
    const { settings: saved } = await api.saveDefaults(readSettings());
    defaults = saved;
    $("defaults-status").textContent = "Saved: new conversations start from these.";
  } catch (err) {
    showError(err.message, { cause: "settings" });
  }
});
function stopCurrent() {
  liveFor(state.conversationId)?.controller.abort();
}

stopButton.addEventListener("click", stopCurrent);
$("new-chat").addEventListener("click", () => newChat({ push: true }));
Object.values(settings).forEach((input) => input.addEventListener("change", settingsChanged));
settings.maxTokens.addEventListener("input", () => composerState.changed());
modelSelect.addEventListener("change", () => {
  localStorage.setItem("bchat.model", modelSelect.value);
  engineChanged();
  settingsChanged();
});
engineSelect.addEventListener("change", () => {
  engineChanged();
  settingsChanged();
});
backendSelect.addEventListener("change", () => {
  localStorage.setItem("bchat.backend", backendSelect.value);
  preloadBrowser();
});
window.addEventListener("popstate", () => {
  const match = location.pathname.match(/^\/c\/([^/]+)$/);
  if (match) openConversation(decodeURIComponent(match[1]), { push: false });
  else newChat({ push: false });
});

const connection = $("connection");
socket.on("status", (status) => {
  connection.textContent = { open: "connected", connecting: "connecting…", closed: "reconnecting…" }[status];
  connection.dataset.status = status;
  if (status === "open") clearError("socket");
});
socket.connect();

// ---- the context meter and the composer's limits ---------------------------------------
const meter = new ContextMeter($("context-meter"), { contextLength });
const composerState = new Composer(composer, {
  counter: $("composer-counter"),
  note: $("composer-note"),
  maxChars: Number(root.dataset.maxMessageChars),
  contextLength,
  replyTokens: () => Number.parseInt(settings.maxTokens.value, 10) || 0,
  usedTokens: () => meter.used,
  onChange: () => {
    updateControls();
    meter.update(composerState.estimate);
  },
});

// ---- theme ------------------------------------------------------------------------------
const themeToggle = $("theme-toggle");
const systemDark = matchMedia("(prefers-color-scheme: dark)");

function currentTheme() {
  return document.documentElement.dataset.theme || (systemDark.matches ? "dark" : "light");
}

function showTheme() {
  const next = currentTheme() === "dark" ? "light" : "dark";
  themeToggle.replaceChildren(icon(next === "dark" ? "moon" : "sun"));
  themeToggle.setAttribute("aria-label", `Switch to the ${next} theme`);
  themeToggle.title = `Switch to the ${next} theme`;
}

themeToggle.addEventListener("click", () => {
  const theme = currentTheme() === "dark" ? "light" : "dark";
  document.documentElement.dataset.theme = theme;
  localStorage.setItem("bchat.theme", theme);
  showTheme();
});
systemDark.addEventListener("change", showTheme);
showTheme();

// ---- the sidebar: a column on a desktop, a drawer on a phone ---------------------------
const phone = matchMedia("(max-width: 760px)");
const sidebarToggle = $("sidebar-toggle");

function setDrawer(open, { focus = true } = {}) {
  root.dataset.drawer = open ? "open" : "closed";
  $("scrim").hidden = !open;
  // While the drawer covers the page, Tab and screen readers stay in it.
  root.querySelector("main.chat").inert = open;
  sidebarToggle.setAttribute("aria-expanded", String(open));
  if (open && focus) $("new-chat").focus();
  else if (!open && focus && root.querySelector(".sidebar").contains(document.activeElement)) sidebarToggle.focus();
}

function closeDrawerOnPhone() {
  if (root.dataset.drawer === "open") setDrawer(false, { focus: false });
}

sidebarToggle.addEventListener("click", () => {
  if (phone.matches) {
    setDrawer(root.dataset.drawer !== "open");
  } else {
    const collapsed = root.dataset.sidebar !== "collapsed";
    root.dataset.sidebar = collapsed ? "collapsed" : "open";
    sidebarToggle.setAttribute("aria-expanded", String(!collapsed));
    localStorage.setItem("bchat.sidebar", root.dataset.sidebar);
  }
});
$("sidebar-close").addEventListener("click", () => setDrawer(false));
$("scrim").addEventListener("click", () => setDrawer(false));

function layoutChanged() {
  if (phone.matches) {
    setDrawer(false, { focus: false });
  } else {
    root.dataset.drawer = "closed";
    $("scrim").hidden = true;
    root.querySelector("main.chat").inert = false;
    root.dataset.sidebar = localStorage.getItem("bchat.sidebar") === "collapsed" ? "collapsed" : "open";
    sidebarToggle.setAttribute("aria-expanded", String(root.dataset.sidebar !== "collapsed"));
  }
}
phone.addEventListener("change", layoutChanged);
layoutChanged();

$("import-button").addEventListener("click", () => $("import").click());

// ---- search -------------------------------------------------------------------------------
const searchBox = $("search");
let searchTimer = null;
searchBox.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    searchQuery = searchBox.value.trim();
    clearError("search");
    runSearch();
  }, 150);
});
searchBox.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && searchBox.value) {
    event.stopPropagation();
    searchBox.value = "";
    searchQuery = "";
    runSearch();
  }
});

// ---- menus close on outside clicks ---------------------------------------------------------
document.addEventListener("click", (event) => {
  for (const menu of root.querySelectorAll("details.menu[open]")) {
    // outside it, or on the phone sheet's backdrop (the <details>' own ::before)
    if (!menu.contains(event.target) || event.target === menu) menu.open = false;
  }
});

// ---- keyboard shortcuts ------------------------------------------------------------------
const shortcuts = $("shortcuts");
$("shortcuts-button").addEventListener("click", () => shortcuts.showModal());

function typing(target) {
  return target instanceof HTMLElement && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

document.addEventListener("keydown", (event) => {
  const mod = event.ctrlKey || event.metaKey;
  if (document.querySelector("dialog[open]")) return; // a dialog has the keyboard (Escape closes it)
  if (event.key === "Escape") {
    if (liveFor(state.conversationId)) {
      event.preventDefault();
      stopCurrent();
      return;
    }
    const openMenu = root.querySelector("details.menu[open]");
    if (openMenu) {
      openMenu.open = false;
      openMenu.querySelector("summary").focus();
    } else if (root.dataset.drawer === "open") {
      setDrawer(false);
    }
    return;
  }
  if (mod && event.shiftKey && event.key.toLowerCase() === "o") {
    event.preventDefault();
    newChat({ push: true });
  } else if (mod && !event.shiftKey && event.key.toLowerCase() === "k") {
    event.preventDefault();
    if (phone.matches) setDrawer(true, { focus: false });
    else if (root.dataset.sidebar === "collapsed") sidebarToggle.click();
    searchBox.focus();
    searchBox.select();
  } else if (mod && event.key === "/") {
    event.preventDefault();
    closeDrawerOnPhone();
    composer.focus();
  } else if (event.key === "?" && !mod && !typing(event.target) && !shortcuts.open) {
    event.preventDefault();
    shortcuts.showModal();
  }
});

(async () => {
  try {
    // The model list, the conversation list and the open conversation load side by side.
    const opened = state.conversationId ? api.conversation(state.conversationId).catch(() => null) : null;
    // (boot.js has already asked for all of these; api.js picks its answers up)
    await Promise.all([loadModels(), refreshList(),
      api.defaults().then(({ settings: saved }) => { defaults = saved; }, () => {})]);
    if (!state.conversationId) {
      pendingSettings = { ...defaults };
      showSettings(pendingSettings);
      engineChanged({ save: false });
    }
    if (state.conversationId) await openConversation(state.conversationId, { push: false, prefetched: opened });
    else view.clear();
  } catch (err) {
    showError(err.message);
  }
  composerState.changed();
  if (!phone.matches) composer.focus(); // on a phone focusing would pop the keyboard up
  performance.mark("bchat:interactive"); // models listed, list shown: bench/page_weight.py reads it
})();

// ---- ui2: compare, benchmark, API keys, reply format --------------------------------------
initCompare($("compare"), {
  options: OPTIONS, socket, loadBrowserEngine, models: () => models, backend: () => backendSelect.value,
  conversationId: () => state.conversationId,
  openConversation: (id) => openConversation(id, { push: id !== state.conversationId }),
});
initBenchmark($("benchmark"), { loadBrowserEngine, models: () => models });
initApiKeys($("api-keys"));
initReplyFormat(root.querySelector(".reply-format"), { api, conversationId: () => state.conversationId, onError: showError });
