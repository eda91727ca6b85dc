// The JSON API client. Errors become ApiError with the server's code and message.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// An answer boot.js asked for before this module loaded: used once, then gone.
function prefetched(method, path) {
  const early = method === "GET" ? globalThis.bchatPrefetch?.[path] : undefined;
  if (early) delete globalThis.bchatPrefetch[path];
  return early;
}

// Every JSON request the page makes goes through here (api below names the common ones).
// options: more of fetch's (keepalive).
export async function request(method, path, body, options = {}) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin", ...options };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await (prefetched(method, path) ?? fetch(path, init));
  } catch (err) {
    throw new ApiError(0, "network", `the server could not be reached (${err.message})`);
  }
  return answer(response, method, path);
}

async function answer(response, method, path) {
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data?.error ?? {};
    throw new ApiError(response.status, error.code ?? "http_error",
      error.message ?? `${method} ${path} failed with HTTP ${response.status}`);
  }
  return data;
}

// A file for the next message, as multipart/form-data (field "file"); an abort rejects with
// the AbortError itself, so the caller can tell it from a failure.
async function uploadFile(file, signal) {
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("/api/attachments", { method: "POST", body: form, credentials: "same-origin",
                                                 headers: { Accept: "application/json" }, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `the server could not be reached (${err.message})`);
  }
  return answer(response, "POST", "/api/attachments");
}

export const LIST_PAGE = 50; // conversations per page of the sidebar (the server allows 200)

// A long conversation opens on its current branch's last MESSAGE_WINDOW messages, enough to
// fill a tall screen several times; older ones come a window at a time as the reader scrolls
// up, so a thousand-message conversation opens as fast as a new one (the server allows 200).
export const MESSAGE_WINDOW = 50;

export const api = {
  models: () => request("GET", "/api/models"),
  tools: () => request("GET", "/api/tools"),
  // The sidebar's list, a page at a time (newest first). The answer's array carries the next
  // page's cursor as `next` (null on the last), so the list loads more as it scrolls without
  // its callers knowing about pages. The first page is the one boot.js prefetched (same path).
  conversations: async (cursor) => {
    const data = await request("GET",
      `/api/conversations?limit=${LIST_PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    data.conversations.next = data.next ?? null;
    return data;
  },
  // Its title and settings as stored now (a window of one message: never the whole tree,
  // which only export asks for).
  conversationHead: (id) => request("GET", `/api/conversations/${encodeURIComponent(id)}?limit=1`),
  // A window of the branch on screen: its last messages, or (before: a message id) the ones
  // above that message; each with its siblings, and `earlier` for the window above (null at
  // the root). The first window is the one boot.js prefetched (same path).
  conversationWindow: (id, before = null) => request("GET",
    `/api/conversations/${encodeURIComponent(id)}?limit=${MESSAGE_WINDOW}${before ? `&before=${encodeURIComponent(before)}` : ""}`),
  // ‹ › : the conversation continues below another version; the answer is the new branch's window.
  switchBranch: (id, messageId) => request("PATCH",
    `/api/conversations/${encodeURIComponent(id)}?limit=${MESSAGE_WINDOW}`, { current_message_id: messageId }),
  createConversation: (title) => request("POST", "/api/conversations", { title }),
  updateConversation: (id, changes) => request("PATCH", `/api/conversations/${encodeURIComponent(id)}`, changes),
  defaults: () => request("GET", "/api/defaults"),
  saveDefaults: (settings) => request("PUT", "/api/defaults", { settings }),
  rename: (id, title) => request("PATCH", `/api/conversations/${encodeURIComponent(id)}`, { title }),
  remove: (id) => request("DELETE", `/api/conversations/${encodeURIComponent(id)}`),
  share: (id, newLink = false) =>
    request("POST", `/api/conversations/${encodeURIComponent(id)}/share`, { new_link: newLink }),
  unshare: (id) => request("DELETE", `/api/conversations/${encodeURIComponent(id)}/share`),
  shares: () => request("GET", "/api/shares"),
  revokeShare: (shareId) => request("DELETE", `/api/shares/${encodeURIComponent(shareId)}`),
  importConversation: (data) => request("POST", "/api/conversations/import", data),
  search: (query) => request("GET", `/api/search?q=${encodeURIComponent(query)}`),
  exportUrl: (id, format) => `/api/conversations/${encodeURIComponent(id)}/export?format=${format}`,
  addMessage: (id, message) =>
    request("POST", `/api/conversations/${encodeURIComponent(id)}/messages`, message),
  updateMessage: (id, messageId, body) =>
    request("PATCH", messagePath(id, messageId), body),
  uploadFile,
  deleteFile: (id) => request("DELETE", `/api/attachments/${encodeURIComponent(id)}`),
  // The browser engine's prompt: the file blocks of the branch ending at `leaf`, fitted to
  // its context (webapp/attachments.py; the server engines are given the same).
  promptFiles: (id, leaf, context, maxTokens) => request("GET",
    `/api/conversations/${encodeURIComponent(id)}/files?leaf=${encodeURIComponent(leaf)}` +
    `&context=${context}&max_tokens=${maxTokens}`),
  // The browser engine's tool loop: what its next reply is told and held to, and a step.
  toolSetup: (id, parent) => request("GET", `/api/conversations/${encodeURIComponent(id)}/tool-setup` +
    (parent ? `?parent=${encodeURIComponent(parent)}` : "")),
  toolStep: (id, messageId, body) => request("POST", `${messagePath(id, messageId)}/tool-step`, body),
  // For pagehide: the browser finishes a keepalive request after the page is gone.
  updateMessageOnExit: (id, messageId, body) =>
    request("PATCH", messagePath(id, messageId), body, { keepalive: true }).catch(() => {}),
};

function messagePath(id, messageId) {
  return `/api/conversations/${encodeURIComponent(id)}/messages/${encodeURIComponent(messageId)}`;
}
