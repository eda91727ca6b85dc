// One websocket to /ws, reconnected with backoff. Frames are JSON; listeners get them by type.
// Status events: "connecting", "open", "closed" (each failed try closes again). `lost` is true
// from a close until the next open, so the page can tell "not connected yet" (the first
// connect, worth waiting for) from "the server went away" (say so at once).

// Backoff between tries: doubles from the first, never beyond the cap, so a server that comes
// back is found within a few seconds without hammering one that stays down.
const RETRY_FIRST_MS = 500;
const RETRY_CAP_MS = 5000;

export const NOT_SENT = "Not sent: the server can't be reached. Your message stays in the box; " +
  "press Enter again once it is back.";

export class ChatSocket {
  constructor() {
    this.url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
    this.listeners = new Map();
    this.ws = null;
    this.retryMs = RETRY_FIRST_MS;
    this.retryTimer = null;
    this.lost = false;
    this.failures = 0; // closes since the socket was last open
    // Back online, or the tab shown again: try now rather than at the end of the backoff.
    window.addEventListener("online", () => this.reconnectNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && this.lost) this.reconnectNow();
    });
  }

  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.listeners.get(type).delete(listener);
  }

  // Listeners for several frame types at once; returns one function that removes them all.
  onEach(listeners) {
    const offs = Object.entries(listeners).map(([type, listener]) => this.on(type, listener));
    return () => offs.forEach((off) => off());
  }

  emit(type, payload) {
    for (const listener of this.listeners.get(type) ?? []) listener(payload);
  }

  get isOpen() {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.emit("status", "connecting");
    ws.addEventListener("open", () => {
      this.retryMs = RETRY_FIRST_MS;
      this.lost = false;
      this.failures = 0;
      this.emit("status", "open");
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.emit(frame.type, frame);
    });
    ws.addEventListener("close", () => {
      if (this.ws !== ws) return; // a socket replaced by reconnectNow()
      this.lost = true;
      this.failures += 1;
      this.emit("status", "closed");
      this.emit("disconnect", null);
      this.retryTimer = setTimeout(() => this.connect(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, RETRY_CAP_MS);
    });
  }

  // Retry (the banner's button, the browser back online): try at once, unless a try is on.
  reconnectNow() {
    if (!this.lost || this.ws?.readyState === WebSocket.CONNECTING) return;
    this.retryMs = RETRY_FIRST_MS;
    this.connect();
  }

  async ready(timeoutMs = 10000) {
    if (this.isOpen) return;
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        // the engines' code for a lost connection: the page says so, and clears it on "open"
        reject(Object.assign(new Error(NOT_SENT), { code: "disconnected" }));
      }, timeoutMs);
      const off = this.on("status", (status) => {
        if (status === "open") {
          clearTimeout(timer);
          off();
          resolve();
        }
      });
    });
  }

  send(frame) {
    if (!this.isOpen) throw new Error("the chat socket is not connected");
    this.ws.send(JSON.stringify(frame));
  }
}
