// Starts the page's first API requests while app.js and its modules are still being fetched
// and compiled (no imports, so it runs as soon as the document is parsed). api.js takes each
// answer once, by path, instead of asking again.
const app = document.getElementById("app");
// The conversation list's first page: the same path api.conversations() asks for (LIST_PAGE).
const paths = ["/api/models", "/api/conversations?limit=50", "/api/shares"];
// The open conversation's first window: the path api.conversationWindow() asks for (MESSAGE_WINDOW).
if (app?.dataset.conversationId) paths.push(`/api/conversations/${encodeURIComponent(app.dataset.conversationId)}?limit=50`);
globalThis.bchatPrefetch = Object.fromEntries(paths.map((path) => [path, fetch(path, {
  headers: { Accept: "application/json" }, credentials: "same-origin",
})]));
