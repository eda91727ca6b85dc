// The chat page's state in one place: the open conversation, the replies this page follows,
// the models and conversations listed, the visitor's defaults. Modules change it through
// update() (or a LiveReply) and hear of changes through subscribe(), so none keeps a copy.

export const state = {
  conversationId: null,
  // The open conversation as GET /api/conversations/<id> gives it: the windows of its branch
  // loaded so far (api.conversationWindow, and those a browser-engine turn read; a branch's
  // first loaded message with a parent_id has more above it). Never the whole tree.
  conversation: null,
  pendingSettings: {}, // a conversation not created yet: sent with its first message
  defaults: {}, // the visitor's saved defaults: where a new conversation's settings start
  models: [], // GET /api/models
  conversations: [], // the conversation list as last fetched
  searchQuery: "",
  // Replies being written that this page follows, by message id. A reply goes on while the
  // user looks at another conversation; coming back shows it still growing.
  live: new Map(),
  pendingSend: null, // a reply asked for whose message id is not known yet
};

const listeners = new Set();

// listener(changed): changed names what changed ("conversation", "live", …) and, for "live",
// the reply (and the message it settled with).
export function subscribe(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function notify(changed) {
  for (const listener of listeners) listener(changed);
}

export function update(patch) {
  Object.assign(state, patch);
  notify({ keys: Object.keys(patch) });
}

export function modelInfo(id) {
  return state.models.find((m) => m.id === id);
}

// The models an engine ("server" or "browser") can run.
export function modelsFor(engine) {
  return state.models.filter((m) => m.engines?.includes(engine));
}

// The reply being written in a conversation (at most one at a time), if any.
export function liveFor(conversationId) {
  if (!conversationId) return null;
  for (const reply of state.live.values()) if (reply.conversationId === conversationId) return reply;
  return state.pendingSend?.conversationId === conversationId ? state.pendingSend : null;
}

// The reply settings of the open conversation (or of the one about to be created).
export function currentSettings() {
  return state.conversation ? state.conversation.settings ?? {} : state.pendingSettings;
}

// One reply this page follows, whether the message view shows it now or not.
export class LiveReply {
  constructor({ conversationId, model, text = "" }) {
    this.conversationId = conversationId;
    this.model = model;
    this.controller = new AbortController();
    this.messageId = null;
    this.text = text;
    this.view = null; // the message view's handle while this conversation is on screen
    this.position = null;
  }

  identify(messageId) {
    this.messageId = messageId;
    state.live.set(messageId, this);
    if (this.view?.node) this.view.node.dataset.messageId = messageId;
  }

  token(text) {
    this.text += text;
    this.position = null;
    this.view?.append(text);
  }

  // A tool call of this reply ran or is running (tool_call / tool_result frames).
  tool(frame) {
    this.view?.tool(frame);
  }

  // The tool step is stored: the loop goes on in a new reply (its id), text from empty.
  step(messageId) {
    if (this.messageId) state.live.delete(this.messageId);
    this.text = "";
    this.view = null;
    this.identify(messageId);
  }

  queued(position) {
    this.position = position;
    this.view?.queued(position);
  }

  show(view) {
    this.view = view.startReply(this.model, { id: this.messageId, text: this.text });
    if (this.position) this.view.queued(this.position);
    return this.view;
  }

  settle(message) {
    this.view?.settle(message);
    this.end(message);
  }

  // An engine's error for this reply (matched by its message_id when several are followed):
  // the failed reply it stored, or the text so far marked failed with why.
  fail(err) {
    this.settle(err.reply ?? { role: "assistant", content: this.text, status: "failed", model: this.model,
                               meta: { error: { code: err.code, message: err.message } } });
  }

  // message: the stored reply it ended with, if one came back.
  end(message = null) {
    if (this.messageId) state.live.delete(this.messageId);
    this.view = null;
    notify({ keys: ["live"], reply: this, message });
  }
}

// The message view is redrawn: no reply keeps a handle on a node that is gone.
export function detachViews() {
  for (const reply of state.live.values()) reply.view = null;
  if (state.pendingSend) state.pendingSend.view = null;
}
