// One websocket to /ws, reconnected with backoff. Frames are JSON; listeners get them by type.

export class ChatSocket {
  constructor() {
    this.url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
    this.listeners = new Map();
    this.ws = null;
    this.retryMs = 500;
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
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.emit("status", "connecting");
    ws.addEventListener("open", () => {
      this.retryMs = 500;
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
      this.emit("status", "closed");
      this.emit("disconnect", null);
      setTimeout(() => this.connect(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 10000);
    });
  }

  async ready(timeoutMs = 10000) {
    if (this.isOpen) return;
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new Error("the chat socket did not connect"));
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
