// The chat page: wires the conversation list, the message view, the composer and the engines
// to the state store (state.js). The browser engine (wllama, 275 KB before its wasm) is
// imported only when it is picked.
import { api } from "./api.js";
import { ChatSocket, NOT_SENT } from "./socket.js";
import { BROWSER_N_CTX } from "./engines/contract.js";
import { createServerEngine } from "./engines/server.js";
import { LiveReply, currentSettings, detachViews, liveFor, modelInfo, state, subscribe, update } from "./state.js";
import { groupBy, pathTo } from "./tree.js";
import { initBanner } from "./ui/banner.js";
import { BrowserStatus, confirmDownload } from "./ui/browser_status.js";
import { Composer } from "./ui/composer.js";
import { ContextMeter } from "./ui/context.js";
import { ConversationList } from "./ui/conversations.js";
import { initDrawer } from "./ui/drawer.js";
import { fillIcons } from "./ui/icons.js";
import { MessageView } from "./ui/messages.js";
import { modelOption, showModelCard } from "./ui/model_card.js";
import { initSettings, replyOptions } from "./ui/settings.js";
import { Sharing } from "./ui/sharing.js";
import { initShortcuts } from "./ui/shortcuts.js";
import { initThemeChoice, initThemeToggle } from "./ui/theme.js";
import { initCompare } from "./ui/compare.js";
import { initBenchmark } from "./ui/benchmark.js";
import { initModels } from "./ui/models.js";
import { initApiKeys } from "./ui/api_keys.js";
import { Attachments } from "./ui/attachments.js";
import { initReplyFormat, readReplyFormat } from "./ui/reply_format.js";

const root = document.getElementById("app");
const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);

// Each option's default and range as the server serves them (webapp/options.py page_options):
// the page writes no default of its own.
const OPTIONS = JSON.parse(root.dataset.options);
const optionDefaults = Object.fromEntries(Object.entries(OPTIONS)
  .filter(([, spec]) => spec.default !== null).map(([name, spec]) => [name, spec.default]));

state.conversationId = root.dataset.conversationId || null;
fillIcons(root);

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
const engineSelect = $("engine-select");
const backendSelect = $("backend-select");
const browserStatus = new BrowserStatus($("browser-status"), { onDownload: () => downloadBrowserModel() });
const title = root.querySelector(".chat-title");
const banner = initBanner(root, {
  onUseServer: () => {
    engineSelect.value = "server";
    engineChanged();
  },
});
const showError = banner.show;
const settings = initSettings(root, { options: OPTIONS, modelSelect, engineSelect, onError: showError });
const drawer = initDrawer(root);

function updateControls() {
  const active = liveFor(state.conversationId);
  stopButton.hidden = !active;
  if (!active) banner.clear("busy"); // the reply it was about is over
  sendButton.hidden = Boolean(active);
  sendButton.disabled = Boolean(active) || !composerState.canSend;
}

subscribe(({ keys, reply, message }) => {
  if (!keys.includes("live")) return;
  if (message && reply.conversationId === state.conversationId) meter.fromMessage(message);
  updateControls();
});

// An action from a list: its failure goes to the banner.
const reported = (action) => (...args) => action(...args).catch((err) => showError(err.message));

const list = new ConversationList($("conversation-list"), {
  onOpen: (id) => openConversation(id, { push: true }),
  onRename: reported(async (id, newTitle) => {
    await api.rename(id, newTitle);
    if (id === state.conversationId) title.textContent = newTitle;
    await refreshList();
  }),
  onDelete: reported(async (id) => {
    await api.remove(id);
    if (id === state.conversationId) newChat({ push: true });
    await refreshList();
  }),
});

const sharing = new Sharing(root, {
  onError: (message) => showError(message),
  onChanged: () => refreshList(),
  onImported: (id) => openConversation(id, { push: true }),
});

async function refreshList() {
  // side by side: neither list waits for the other
  const [{ conversations }] = await Promise.all([api.conversations(), sharing.refreshList()]);
  update({ conversations });
  if (state.searchQuery) await runSearch();
  else list.render(conversations, state.conversationId);
}

let searchTicket = 0;

async function runSearch() {
  const ticket = ++searchTicket;
  const query = state.searchQuery;
  if (!query) {
    list.render(state.conversations, state.conversationId);
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

// The tokens the chosen model can see at once here: the server runs embedded models with
// BCHAT_N_CTX, the browser engine with its own; neither beyond the model's own.
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
    const info = modelInfo(modelSelect.value);
    browserStatus.describe(info, engines.browser?.loaded); // stored or not: known below
    // The engine's code (not the model) loads now; the model only if it is already in this
    // browser's storage: a download waits for Download or the first message.
    loadBrowserEngine().then(async (browser) => {
      const cached = await browser.isCached(info);
      if (engineSelect.value !== "browser" || modelSelect.value !== info?.id) return;
      browserStatus.describe(info, browser.loaded, { cached });
      if (cached) preloadBrowser();
    }).catch((err) => showError(`The browser engine could not be loaded: ${err.message}`, { cause: "engine" }));
  } else {
    browserStatus.hide();
  }
  showModelCard($("model-card"), modelInfo(modelSelect.value), { contextLength: contextLength(), engine });
  attachments.setModel(modelSelect.selectedOptions[0]?.textContent ?? modelSelect.value,
                      { images: modelInfo(modelSelect.value)?.images, engine });
  meter.update();
}

// The model loads (from this browser's storage, or downloaded when the visitor asked) and the
// open conversation's branch is read into its cache, so Send does not wait for them. Without
// `asked`, only a model already stored here loads: no model bytes move unasked.
async function preloadBrowser({ asked = false } = {}) {
  const info = modelInfo(modelSelect.value);
  if (engineSelect.value !== "browser" || !info?.browser || !engines.browser) return;
  if (!asked && !(await engines.browser.isCached(info))) return;
  engines.browser.preload(info, backendSelect.value, (progress) => browserStatus.update(info, progress),
                          { conversationId: state.conversationId, options: replyOptions() })
    .catch((err) => {
      if (asked) showError(err.message, { cause: "engine", offerServer: true }); // else Send says it
    });
}

// Download: a large model (or a browser that asks to save data) is confirmed first.
async function downloadBrowserModel() {
  const info = modelInfo(modelSelect.value);
  if (!info?.browser || !await confirmDownload(info)) return;
  banner.clear("download");
  preloadBrowser({ asked: true });
}

async function loadModels() {
  const listing = await api.models();
  update({ models: listing.models });
  modelSelect.replaceChildren(...state.models.map(modelOption));
  modelSelect.value = localStorage.getItem("bchat.model") || listing.default || "";
  if (!modelSelect.value && state.models.length) modelSelect.value = state.models[0].id;
  if (!state.models.length) showError("This server has no models: see BCHAT_MODEL_PATH in the README.", { cause: "models" });
  engineSelect.value = localStorage.getItem("bchat.engine") || "server";
  backendSelect.value = localStorage.getItem("bchat.backend") || "auto";
  engineChanged();
}

function newChat({ push }) {
  update({ conversationId: null, conversation: null, pendingSettings: { ...state.defaults } });
  settings.show(state.pendingSettings);
  detachViews();
  view.clear();
  meter.reset();
  banner.clear("conversation");
  drawer.closeOnPhone();
  updateControls();
  sharing.open(null);
  title.textContent = "New chat";
  if (push) history.pushState({}, "", "/");
  list.render(state.conversations, null);
  composer.focus();
}

// A reply still being written when its conversation is opened: the page's own (shown as
// it grows), or a server run to resume from the text stored so far.
function showStreaming(message, conversationId) {
  const mine = state.live.get(message.id);
  if (mine) {
    mine.show(view);
    return;
  }
  if (message.engine !== "server") {
    view.add(message); // written by another page: shown as stored
    return;
  }
  const reply = new LiveReply({ conversationId, model: message.model, text: message.content });
  reply.identify(message.id);
  reply.show(view);
  engines.server.follow(message.id, message.content, {
    signal: reply.controller.signal,
    onToken: (text) => reply.token(text),
    onQueued: (position) => reply.queued(position),
    onTool: (frame) => reply.tool(frame),
    onStep: (frame) => applyStep(reply, frame),
  }).then((stored) => reply.settle(stored), (err) => {
    reply.fail(err);
    if (state.conversationId === conversationId) showError(err.message);
  }).finally(() => refreshConversation(conversationId)); // its controls (a settled view has none)
}

let opening = 0; // the latest openConversation wins when clicks overlap

// A message's tree controls: its versions (‹ 2/3 ›), edit, regenerate, continue.
function controlsFor(m, conversation, groups, busy) {
  const siblings = groups.get(m.parent_id ?? null) ?? [m];
  const position = siblings.indexOf(m) + 1;
  const controls = {
    siblings: { position, count: siblings.length,
                prev: () => switchTo(siblings[position - 2], m), next: () => switchTo(siblings[position], m) },
  };
  // an edit keeps the message's files (the server copies them to the new version)
  if (!busy && m.role === "user") controls.edit = (text) => send({ content: text, parentId: m.parent_id ?? null, files: m.attachments });
  if (!busy && m.role === "assistant" && m.parent_id) {
    controls.regenerate = () => send({ regenerate: m });
    const cutOff = (m.status === "complete" && m.finish_reason === "length")
      || m.status === "stopped" || m.status === "interrupted";
    const last = !conversation.messages.some((other) => other.parent_id === m.id);
    if (cutOff && last) controls.continue = () => send({ continueFrom: m });
  }
  return controls;
}

// The branch on screen (root to current leaf, or as far up as its windows are loaded), each
// message with its tree controls. Without follow, the reader's place is kept.
function render(conversation, { follow = true } = {}) {
  const place = view.scroller.scrollTop;
  detachViews();
  view.clear();
  const groups = groupBy(conversation.messages, (m) => m.parent_id ?? null); // siblings, by parent
  const branch = pathTo(conversation.messages, conversation.current_message_id);
  const busy = Boolean(liveFor(conversation.id));
  for (const m of branch) {
    if (m.status === "streaming") {
      showStreaming(m, conversation.id);
      continue;
    }
    view.add(m, { follow: false, controls: controlsFor(m, conversation, groups, busy) });
  }
  const pending = state.pendingSend?.conversationId === conversation.id ? state.pendingSend : null;
  if (pending && !pending.messageId && pending.view === null) pending.show(view);
  offerEarlier(conversation, branch);
  if (follow) view.scrollToEnd({ force: true });
  else view.scroller.scrollTop = place;
  meter.fromMessages(branch);
}

// messages (a window from the server) into a conversation's loaded ones: newer copies replace
// older, new ones join (a window sends every sibling of its messages at once, so sibling
// groups stay in the server's order, oldest first).
function mergeMessages(conversation, messages) {
  const index = new Map(conversation.messages.map((m, i) => [m.id, i]));
  for (const m of messages) {
    const at = index.get(m.id);
    if (at === undefined) conversation.messages.push(m);
    else conversation.messages[at] = m;
  }
}

// A fresh window of the open conversation, keeping the older windows the reader loaded.
function withLoaded(fresh) {
  if (state.conversation?.id !== fresh.id) return fresh;
  const conversation = { ...fresh, messages: [...state.conversation.messages] };
  mergeMessages(conversation, fresh.messages);
  return conversation;
}

// The branch's first loaded message has a parent: the window above loads when scrolled to.
function offerEarlier(conversation, branch) {
  view.earlier(branch[0]?.parent_id ? () => loadEarlier(conversation) : null);
}

let loadingEarlier = null; // the conversation whose earlier window is on its way

async function loadEarlier(conversation) {
  if (loadingEarlier === conversation || state.conversation !== conversation) return;
  const top = pathTo(conversation.messages, conversation.current_message_id)[0];
  if (!top?.parent_id) return;
  loadingEarlier = conversation;
  try {
    const page = await api.conversationWindow(conversation.id, top.id);
    if (state.conversation !== conversation) return; // opened another, or redrawn meanwhile
    mergeMessages(conversation, page.messages);
    const branch = pathTo(conversation.messages, conversation.current_message_id);
    const above = branch.slice(0, branch.indexOf(branch.find((m) => m.id === top.id)));
    const groups = groupBy(conversation.messages, (m) => m.parent_id ?? null);
    const busy = Boolean(liveFor(conversation.id));
    view.prepend(above.map((m) => [m, controlsFor(m, conversation, groups, busy)]));
    loadingEarlier = null;
    offerEarlier(conversation, branch); // (observed afresh: still in view, it loads on)
  } catch (err) {
    if (state.conversation === conversation) view.earlierFailed(err.message);
  } finally {
    if (loadingEarlier === conversation) loadingEarlier = null;
  }
}

// ‹ › : show another version of a message (and the branch that continues from it), with the
// version in the same place on screen as the one it replaces (`shown`).
async function switchTo(message, shown = null) {
  if (!message || !state.conversation) return;
  const id = state.conversation.id;
  const anchor = shown && view.container.querySelector(`[data-message-id="${CSS.escape(shown.id)}"]`);
  const offset = anchor ? anchor.getBoundingClientRect().top : null;
  try {
    const conversation = withLoaded(await api.switchBranch(id, message.id));
    // The new branch's window ends at its leaf; when the version switched to is further up
    // than that, the windows between are fetched too, so the branch on screen is whole.
    let branch = pathTo(conversation.messages, conversation.current_message_id);
    while (branch[0]?.parent_id && !branch.some((m) => m.id === message.id)) {
      const top = branch[0].id;
      mergeMessages(conversation, (await api.conversationWindow(id, top)).messages);
      branch = pathTo(conversation.messages, conversation.current_message_id);
      if (branch[0].id === top) break;
    }
    if (state.conversation?.id !== conversation.id) return;
    update({ conversation });
    render(conversation, { follow: false });
    const target = view.container.querySelector(`[data-message-id="${CSS.escape(message.id)}"]`);
    if (offset !== null && target) view.scroller.scrollTop += target.getBoundingClientRect().top - offset;
  } catch (err) {
    showError(err.message, { cause: "conversation" });
  }
}

// The open conversation as the server has it now (after a reply is over).
async function refreshConversation(id) {
  if (state.conversationId !== id) return;
  try {
    const fresh = await api.conversationWindow(id);
    if (state.conversationId !== id || liveFor(id)) return;
    const conversation = withLoaded(fresh);
    update({ conversation });
    render(conversation, { follow: view.pinned });
  } catch {
    /* the next open shows it */
  }
}

async function openConversation(id, { push, prefetched = null }) {
  const ticket = ++opening;
  try {
    const conversation = (await prefetched) ?? await api.conversationWindow(id);
    if (ticket !== opening) return;
    update({ conversationId: conversation.id, conversation });
    title.textContent = conversation.title;
    settings.show(conversation.settings ?? {});
    engineChanged({ save: false });
    render(conversation);
    drawer.closeOnPhone();
    updateControls();
    if (push) history.pushState({}, "", `/c/${encodeURIComponent(id)}`);
    showError("");
    await refreshList();
    sharing.open(conversation.id);
    preloadBrowser();
  } catch (err) {
    showError(err.status === 404 ? "That conversation does not exist (or is not yours)." : err.message,
      { cause: "conversation" });
    update({ conversationId: null });
  }
}

// Merge what a run's "started" said into the open conversation's tree and show it: the new
// user message (if any) and the reply (streaming) become the current branch.
function applyStarted(conversationId, { conversation = null, userMessage = null, reply = null } = {}) {
  if (state.conversationId !== conversationId) return;
  if (conversation?.messages) {
    // the windows the browser engine read, joined to those already on screen
    update({ conversation: withLoaded(conversation) });
  } else if (state.conversation?.id === conversationId) {
    if (conversation) Object.assign(state.conversation, { title: conversation.title, settings: conversation.settings });
  } else {
    update({ conversation: { ...(conversation ?? { id: conversationId }), messages: [], current_message_id: null } });
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

// A tool step is stored (the server's tool loop): the reply that called tools and the tool
// messages join the tree as stored, and the loop's next reply becomes the live one.
function applyStep(reply, { message, tool_messages: tools, reply: next }) {
  reply.step(next.id);
  const tree = state.conversation;
  if (state.conversationId !== reply.conversationId || tree?.id !== reply.conversationId) return;
  for (const stored of [message, ...tools, next]) {
    const index = tree.messages.findIndex((m) => m.id === stored.id);
    if (index >= 0) tree.messages[index] = { ...tree.messages[index], ...stored };
    else tree.messages.push(stored);
  }
  tree.current_message_id = next.id;
  render(tree);
}

// Send the composer's text, or: an edited message ({content, parentId}), a regenerated
// reply ({regenerate: reply}), more of a cut-off reply ({continueFrom: reply}).
async function send(action = null) {
  const content = action ? action.content : composer.value;
  if (!action && !content.trim()) return;
  // Continuing a server reply runs on the server; a browser reply continues in the browser
  // when the browser engine is picked (else on the server, which can continue any reply).
  const engineName = action?.continueFrom && action.continueFrom.engine !== "browser" ? "server" : engineSelect.value;
  // Enter never does nothing: the message stays in the box, and the banner says why.
  if (engineName === "server" && socket.lost) {
    showError(NOT_SENT, { cause: "socket", retry: () => socket.reconnectNow() });
    return;
  }
  if (liveFor(state.conversationId) || state.pendingSend) {
    showError("A reply is still being written: wait for it, or stop it (Esc), then send.", { cause: "busy" });
    return;
  }
  if (!action && !composerState.check()) return; // over a limit: the note under the composer says which
  if (engineName === "browser" && !await mayDownload(modelInfo(modelSelect.value))) {
    showError("Not sent: the model was not downloaded. Your message stays in the box.", { cause: "download" });
    return;
  }
  showError("");
  const model = action?.continueFrom?.model ?? modelSelect.value;
  const reply = new LiveReply({ conversationId: state.conversationId, model, text: action?.continueFrom?.content ?? "" });
  let storedOnServer = false; // the message is stored: a failure after this is not "not sent"
  update({ pendingSend: reply });
  updateControls();
  const onScreen = () => state.conversationId === reply.conversationId;
  const newConversation = !state.conversationId;
  const settingsForNew = newConversation ? { ...state.pendingSettings, ...settings.read() } : null;
  const replyFormat = readReplyFormat();
  if (settingsForNew && replyFormat) settingsForNew.response_format = replyFormat;
  try {
    await settings.saving; // a sheet save still under way lands before the reply reads it
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
    if (!action) {
      await attachments.ready(); // a file still being read goes with this message
      request.attachments = attachments.ids();
    } else if (action.files?.length) {
      request.attachments = action.files.map((file) => file.id);
    }
    if (action && "parentId" in action) request.parentId = action.parentId;
    if (action?.regenerate) {
      request.regenerate = action.regenerate.id;
      request.parentId = action.regenerate.parent_id;
    }
    if (action?.continueFrom) request.continueFrom = action.continueFrom;
    const stored = await engine.generate(request, {
      signal: reply.controller.signal,
      onStarted: (conversation, userMessage, frame) => {
        storedOnServer = true;
        const wasOnScreen = onScreen();
        if (!action) {
          composer.value = ""; // stored on the server: safe to clear
          attachments.clear(); // (the message holds them now)
          composerState.changed();
        }
        reply.conversationId = conversation.id;
        if (frame?.message_id) reply.identify(frame.message_id);
        if (wasOnScreen) {
          if (state.conversationId !== conversation.id) {
            update({ conversationId: conversation.id, conversation: null });
            history.pushState({}, "", `/c/${encodeURIComponent(conversation.id)}`);
          }
          title.textContent = conversation.title;
          sharing.open(conversation.id);
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
      onTool: (frame) => reply.tool(frame),
      onStep: (frame) => applyStep(reply, frame),
    });
    reply.settle(stored);
  } catch (err) {
    reply.fail(err);
    if (onScreen()) {
      const loadProblem = ["load_failed", "webgpu_unavailable", "not_in_browser"].includes(err.code);
      // The server's model process stopped (or is starting again): the partial reply is
      // kept, and Retry writes a new one beside it once the model is back.
      const modelDown = ["model_crashed", "model_starting"].includes(err.code);
      const failed = err.reply;
      // The server went away (socket or fetch): said like any lost connection, and cleared with it.
      const lost = ["disconnected", "network"].includes(err.code);
      showError(lost && !storedOnServer ? NOT_SENT : err.message, { offerServer: engineName === "browser" && loadProblem,
                               cause: lost ? "socket" : "",
                               retry: modelDown && failed?.parent_id ? () => send({ regenerate: failed }) : null });
    }
  } finally {
    if (state.pendingSend === reply) update({ pendingSend: null });
    updateControls();
    if (reply.conversationId) refreshConversation(reply.conversationId);
    refreshList().catch(() => {});
  }
}

// The first message with the browser engine downloads the model: asked first when large.
async function mayDownload(info) {
  if (!info?.browser) return true; // the engine says it cannot run there
  const browser = await loadBrowserEngine().catch(() => null);
  return !browser || await browser.isCached(info) || await confirmDownload(info);
}

function stopCurrent() {
  liveFor(state.conversationId)?.controller.abort();
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
stopButton.addEventListener("click", stopCurrent);
$("new-chat").addEventListener("click", () => newChat({ push: true }));
settings.maxTokens.addEventListener("input", () => composerState.changed());
modelSelect.addEventListener("change", () => {
  localStorage.setItem("bchat.model", modelSelect.value);
  engineChanged();
  settings.changed();
});
engineSelect.addEventListener("change", () => {
  engineChanged();
  settings.changed();
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
$("import-button").addEventListener("click", () => $("import").click());

const connection = $("connection");
// A lost connection is said in the banner after a short grace (a blip that reconnects at once
// shows nothing), and the banner goes by itself when the socket is back.
const LOST_GRACE_MS = 1000;
let lostTimer = null;
let reconnecting = false; // the socket was lost: its next open is a reconnect
function reportLost() {
  lostTimer = null;
  if (!socket.lost) return;
  showError(socket.failures > 1
    ? "The server can't be reached. bchat keeps trying and reconnects by itself when it is back."
    : "The connection to the server dropped; reconnecting…",
  { cause: "socket", retry: () => socket.reconnectNow() });
}
socket.on("status", (status) => {
  connection.textContent = { open: "connected", connecting: "connecting…", closed: "reconnecting…" }[status];
  connection.dataset.status = status;
  if (status === "open") {
    clearTimeout(lostTimer);
    lostTimer = null;
    banner.clear("socket");
    // Back: the open conversation as the server has it now, with its controls (a reply that
    // settled while the server was away was shown without them).
    if (reconnecting && state.conversationId && !liveFor(state.conversationId)) refreshConversation(state.conversationId);
    reconnecting = false;
  } else if (status === "closed") {
    reconnecting = true;
    if (!lostTimer && banner.cause !== "socket") lostTimer = setTimeout(reportLost, LOST_GRACE_MS);
  }
});
socket.connect();

// ---- the context meter and the composer's limits ---------------------------------------
const meter = new ContextMeter($("context-meter"), { contextLength });
const attachments = new Attachments({
  list: $("composer-files"), input: $("attach-input"), button: $("attach"),
  zone: root.querySelector("main.chat"), paste: composer, // a drop anywhere on the chat column
  maxBytes: Number(root.dataset.maxAttachmentBytes),
  onChange: () => composerState.changed(),
  onError: (message) => showError(message, { cause: "files" }),
});
const composerState = new Composer(composer, {
  counter: $("composer-counter"),
  note: $("composer-note"),
  maxChars: Number(root.dataset.maxMessageChars),
  contextLength,
  replyTokens: () => Number.parseInt(settings.maxTokens.value, 10) || 0,
  usedTokens: () => meter.used,
  fileTokens: () => attachments.tokens(),
  onChange: () => {
    updateControls();
    meter.update(composerState.estimate + attachments.tokens()); // the files to send count too
  },
});

// ---- search -------------------------------------------------------------------------------
const searchBox = $("search");
let searchTimer = null;
searchBox.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    update({ searchQuery: searchBox.value.trim() });
    banner.clear("search");
    runSearch();
  }, 150);
});
searchBox.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && searchBox.value) {
    event.stopPropagation();
    searchBox.value = "";
    update({ searchQuery: "" });
    runSearch();
  }
});

initThemeToggle($("theme-toggle"));
initThemeChoice($("theme-choice"));
initShortcuts(root, $("shortcuts"), $("shortcuts-button"), {
  busy: () => Boolean(liveFor(state.conversationId)),
  stop: stopCurrent,
  newChat: () => newChat({ push: true }),
  search: () => {
    drawer.reveal();
    searchBox.focus();
    searchBox.select();
  },
  focusComposer: () => {
    drawer.closeOnPhone();
    composer.focus();
  },
  closeDrawer: () => {
    if (drawer.open) drawer.close();
  },
});

(async () => {
  try {
    // The model list, the conversation list and the open conversation load side by side.
    const opened = state.conversationId ? api.conversationWindow(state.conversationId).catch(() => null) : null;
    // (boot.js has already asked for all of these; api.js picks its answers up)
    await Promise.all([loadModels(), refreshList(),
      api.defaults().then(({ settings: saved }) => update({ defaults: saved }), () => {})]);
    if (!state.conversationId) {
      update({ pendingSettings: { ...state.defaults } });
      settings.show(state.pendingSettings);
      engineChanged({ save: false });
    }
    if (state.conversationId) await openConversation(state.conversationId, { push: false, prefetched: opened });
    else view.clear();
  } catch (err) {
    showError(err.message);
  }
  composerState.changed();
  if (!drawer.phone.matches) composer.focus(); // on a phone focusing would pop the keyboard up
  performance.mark("bchat:interactive"); // models listed, list shown: bench/page_weight.py reads it
})();

// ---- the panels: compare, benchmark, API keys; the reply format ---------------------------
const compare = initCompare($("compare"), {
  options: OPTIONS, server: engines.server, loadBrowserEngine, backend: () => backendSelect.value,
  openConversation: (id) => openConversation(id, { push: id !== state.conversationId }),
});
// The Models panel (/models opens the page with it shown): Compare there opens compare's panel.
const modelsPanel = initModels($("models"), { openCompare: (ids) => compare?.openWith(ids) });
if (location.pathname === "/models") modelsPanel?.open();
initBenchmark($("benchmark"), { loadBrowserEngine });
initApiKeys($("api-keys"));
initReplyFormat(root.querySelector(".reply-format"));
