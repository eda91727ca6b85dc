// The chat page: wires the conversation list, the message view, the composer and the engines.
import { api } from "./api.js";
import { ChatSocket } from "./socket.js";
import { createServerEngine } from "./engines/server.js";
import { createBrowserEngine } from "./engines/browser.js";
import { BrowserStatus } from "./ui/browser_status.js";
import { Sharing } from "./ui/sharing.js";
import { ConversationList } from "./ui/conversations.js";
import { MessageView } from "./ui/messages.js";

const root = document.getElementById("app");
const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);

const state = {
  conversationId: root.dataset.conversationId || null,
};

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
  sendButton.disabled = Boolean(active);
}

const socket = new ChatSocket();
const engines = { server: createServerEngine(socket), browser: createBrowserEngine({ api }) };
const view = new MessageView($("messages"));
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

// Reply settings persist per browser; the server validates them again.
function loadSettings() {
  const saved = JSON.parse(localStorage.getItem("bchat.settings") || "{}");
  if (saved.system !== undefined) settings.system.value = saved.system;
  if (saved.temperature !== undefined) settings.temperature.value = saved.temperature;
  if (saved.maxTokens !== undefined) settings.maxTokens.value = saved.maxTokens;
}

function saveSettings() {
  localStorage.setItem("bchat.settings", JSON.stringify({
    system: settings.system.value,
    temperature: settings.temperature.value,
    maxTokens: settings.maxTokens.value,
  }));
}

function replyOptions() {
  const options = {};
  if (settings.system.value.trim()) options.system = settings.system.value;
  const temperature = Number.parseFloat(settings.temperature.value);
  if (Number.isFinite(temperature)) options.temperature = temperature;
  const maxTokens = Number.parseInt(settings.maxTokens.value, 10);
  if (Number.isFinite(maxTokens)) options.max_tokens = maxTokens;
  return options;
}

function showError(message, { offerServer = false, cause = "" } = {}) {
  $("error-text").textContent = message;
  $("use-server").hidden = !offerServer;
  errorBox.hidden = !message;
  errorBox.dataset.cause = cause; // a socket problem clears itself when the socket is back
}

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

async function refreshList() {
  const { conversations } = await api.conversations();
  lastList = conversations;
  list.render(conversations, state.conversationId);
  await sharing.refreshList();
}

function isShared(id) {
  return lastList.some((c) => c.id === id && c.shared);
}

let models = [];

function modelInfo(id) {
  return models.find((m) => m.id === id);
}

function engineChanged() {
  const engine = engineSelect.value;
  localStorage.setItem("bchat.engine", engine);
  root.querySelector(".backend-choice").hidden = engine !== "browser";
  for (const option of modelSelect.options) {
    option.disabled = !modelInfo(option.value)?.engines.includes(engine);
  }
  if (modelSelect.selectedOptions[0]?.disabled) {
    const usable = [...modelSelect.options].find((o) => !o.disabled);
    if (usable) modelSelect.value = usable.value;
  }
  if (engine === "browser") browserStatus.describe(modelInfo(modelSelect.value), engines.browser.loaded);
  else browserStatus.hide();
  preloadBrowser();
}

// Picking the browser engine starts the wasm and model download (and reads the open
// conversation into the model's cache), so Send does not wait for them.
function preloadBrowser() {
  const info = modelInfo(modelSelect.value);
  if (engineSelect.value !== "browser" || !info?.browser) return;
  engines.browser.preload(info, backendSelect.value, (progress) => browserStatus.update(info, progress),
                          { conversationId: state.conversationId, options: replyOptions() }).catch(() => {});
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
  if (!models.length) showError("This server has no models: see BCHAT_MODEL_PATH in the README.");
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
  detachViews();
  view.clear();
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

async function openConversation(id, { push }) {
  const ticket = ++opening;
  try {
    const conversation = await api.conversation(id);
    if (ticket !== opening) return;
    state.conversationId = conversation.id;
    title.textContent = conversation.title;
    detachViews();
    view.clear();
    for (const m of conversation.messages) {
      if (m.status === "streaming") showStreaming(m, conversation.id);
      else view.add(m);
    }
    const pending = pendingSend?.conversationId === conversation.id ? pendingSend : null;
    if (pending && !pending.messageId) pending.show();
    updateControls();
    if (push) history.pushState({}, "", `/c/${encodeURIComponent(id)}`);
    showError("");
    await refreshList();
    sharing.open(conversation.id, { shared: isShared(conversation.id) });
    preloadBrowser();
  } catch (err) {
    showError(err.status === 404 ? "That conversation does not exist (or is not yours)." : err.message);
    state.conversationId = null;
  }
}

async function send() {
  const content = composer.value;
  if (!content.trim() || liveFor(state.conversationId) || pendingSend) return;
  showError("");
  const engineName = engineSelect.value;
  const engine = engines[engineName];
  const model = modelSelect.value;
  const reply = new LiveReply({ conversationId: state.conversationId, model, controller: new AbortController() });
  pendingSend = reply;
  updateControls();
  const onScreen = () => state.conversationId === reply.conversationId;
  try {
    const stored = await engine.generate(
      {
        conversationId: state.conversationId,
        content,
        model,
        modelInfo: modelInfo(model),
        backend: backendSelect.value,
        options: replyOptions(),
      },
      {
        signal: reply.controller.signal,
        onStarted: (conversation, userMessage, frame) => {
          const wasOnScreen = onScreen();
          composer.value = ""; // stored on the server: safe to clear
          reply.conversationId = conversation.id;
          if (wasOnScreen) {
            if (state.conversationId !== conversation.id) {
              state.conversationId = conversation.id;
              history.pushState({}, "", `/c/${encodeURIComponent(conversation.id)}`);
            }
            title.textContent = conversation.title;
            sharing.open(conversation.id, { shared: isShared(conversation.id) });
            view.add(userMessage);
            reply.show();
          }
          if (frame?.message_id) reply.identify(frame.message_id);
          updateControls();
          refreshList().catch(() => {});
        },
        onReplyCreated: (message) => reply.identify(message.id),
        onQueued: (position) => reply.queued(position),
        onLoad: (progress) => {
          browserStatus.update(modelInfo(model), progress);
          if (progress.phase !== "ready") reply.view?.loading(progress);
        },
        onToken: (text) => reply.token(text),
      },
    );
    reply.settle(stored);
  } catch (err) {
    if (err.reply) reply.settle(err.reply);
    else {
      reply.view?.settle({ role: "assistant", content: reply.text, status: "failed", model });
      reply.end();
    }
    if (onScreen()) {
      const loadProblem = ["load_failed", "webgpu_unavailable", "not_in_browser"].includes(err.code);
      showError(err.message, { offerServer: engineName === "browser" && loadProblem,
                               cause: err.code === "disconnected" ? "socket" : "" });
    }
  } finally {
    if (pendingSend === reply) pendingSend = null;
    updateControls();
    refreshList().catch(() => {});
  }
}

composer.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
root.querySelector(".composer-form").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
function stopCurrent() {
  liveFor(state.conversationId)?.controller.abort();
}

stopButton.addEventListener("click", stopCurrent);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && liveFor(state.conversationId)) {
    event.preventDefault();
    stopCurrent();
  }
});
$("new-chat").addEventListener("click", () => newChat({ push: true }));
Object.values(settings).forEach((input) => input.addEventListener("change", saveSettings));
modelSelect.addEventListener("change", () => {
  localStorage.setItem("bchat.model", modelSelect.value);
  engineChanged();
});
engineSelect.addEventListener("change", engineChanged);
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
  if (status === "open" && errorBox.dataset.cause === "socket") showError("");
});
socket.connect();

loadSettings();
(async () => {
  try {
    await loadModels();
    await refreshList();
    if (state.conversationId) await openConversation(state.conversationId, { push: false });
  } catch (err) {
    showError(err.message);
  }
  composer.focus();
})();
