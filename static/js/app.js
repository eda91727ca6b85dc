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
  generating: null, // AbortController of the reply being written
};

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

function showError(message, { offerServer = false } = {}) {
  $("error-text").textContent = message;
  $("use-server").hidden = !offerServer;
  errorBox.hidden = !message;
}

$("use-server").addEventListener("click", () => {
  engineSelect.value = "server";
  engineChanged();
  showError("");
});

function setGenerating(controller) {
  state.generating = controller;
  stopButton.hidden = !controller;
  sendButton.disabled = Boolean(controller);
}

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

function newChat({ push }) {
  if (state.generating) return;
  state.conversationId = null;
  view.clear();
  sharing.open(null);
  title.textContent = "New chat";
  if (push) history.pushState({}, "", "/");
  list.render(lastList, null);
  composer.focus();
}

async function openConversation(id, { push }) {
  if (state.generating) return;
  try {
    const conversation = await api.conversation(id);
    state.conversationId = conversation.id;
    title.textContent = conversation.title;
    view.clear();
    conversation.messages.forEach((m) => view.add(m));
    if (push) history.pushState({}, "", `/c/${encodeURIComponent(id)}`);
    showError("");
    await refreshList();
    sharing.open(conversation.id, { shared: isShared(conversation.id) });
  } catch (err) {
    showError(err.status === 404 ? "That conversation does not exist (or is not yours)." : err.message);
    state.conversationId = null;
  }
}

async function send() {
  const content = composer.value;
  if (!content.trim() || state.generating) return;
  showError("");
  const controller = new AbortController();
  setGenerating(controller);
  const engineName = engineSelect.value;
  const engine = engines[engineName];
  const model = modelSelect.value;
  let reply = null;
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
        signal: controller.signal,
        onStarted: (conversation, userMessage) => {
          composer.value = ""; // stored on the server: safe to clear
          if (state.conversationId !== conversation.id) {
            state.conversationId = conversation.id;
            history.pushState({}, "", `/c/${encodeURIComponent(conversation.id)}`);
          }
          title.textContent = conversation.title;
          sharing.open(conversation.id, { shared: isShared(conversation.id) });
          view.add(userMessage);
          reply = view.startReply(model);
          refreshList().catch(() => {});
        },
        onQueued: (position) => reply?.queued(position),
        onLoad: (progress) => {
          browserStatus.update(modelInfo(model), progress);
          if (progress.phase !== "ready") reply?.loading();
        },
        onToken: (text) => reply?.append(text),
      },
    );
    reply?.settle(stored);
  } catch (err) {
    if (err.reply && reply) reply.settle(err.reply);
    else if (reply) reply.settle({ role: "assistant", content: reply.text, status: "failed", model });
    const loadProblem = ["load_failed", "webgpu_unavailable", "not_in_browser"].includes(err.code);
    showError(err.message, { offerServer: engineName === "browser" && loadProblem });
  } finally {
    setGenerating(null);
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
stopButton.addEventListener("click", () => state.generating?.abort());
$("new-chat").addEventListener("click", () => newChat({ push: true }));
Object.values(settings).forEach((input) => input.addEventListener("change", saveSettings));
modelSelect.addEventListener("change", () => {
  localStorage.setItem("bchat.model", modelSelect.value);
  engineChanged();
});
engineSelect.addEventListener("change", engineChanged);
backendSelect.addEventListener("change", () => localStorage.setItem("bchat.backend", backendSelect.value));
window.addEventListener("popstate", () => {
  const match = location.pathname.match(/^\/c\/([^/]+)$/);
  if (match) openConversation(decodeURIComponent(match[1]), { push: false });
  else newChat({ push: false });
});

const connection = $("connection");
socket.on("status", (status) => {
  connection.textContent = { open: "connected", connecting: "connecting…", closed: "reconnecting…" }[status];
  connection.dataset.status = status;
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
