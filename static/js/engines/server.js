// The server engine: the model runs on the server and tokens arrive over the chat socket.
// Implements the page's engine interface:
//   generate({conversationId, content, model, options}, {onStarted, onToken, onQueued, signal})
//   -> Promise<stored assistant message>; rejects with an Error carrying .code and .reply.

export class EngineError extends Error {
  constructor(code, message, reply = null) {
    super(message);
    this.code = code;
    this.reply = reply;
  }
}

export function createServerEngine(socket) {
  return {
    name: "server",
    async generate(request, { onStarted, onToken, onQueued, signal } = {}) {
      await socket.ready();
      return new Promise((resolve, reject) => {
        let started = false;
        const offs = [];
        const finish = (fn, value) => {
          offs.forEach((off) => off());
          signal?.removeEventListener("abort", onAbort);
          fn(value);
        };
        const onAbort = () => {
          try {
            socket.send({ type: "stop" });
          } catch {
            /* the socket is gone: the server stops the reply itself */
          }
        };
        offs.push(socket.on("started", (frame) => {
          started = true;
          onStarted?.(frame.conversation, frame.user_message, frame);
        }));
        offs.push(socket.on("token", (frame) => onToken?.(frame.text)));
        offs.push(socket.on("queued", (frame) => onQueued?.(frame.position)));
        offs.push(socket.on("done", (frame) => finish(resolve, frame.message)));
        offs.push(socket.on("error", (frame) => {
          // Errors about another frame (e.g. "busy") do not end this reply.
          if (started && !frame.reply && frame.code === "busy") return;
          finish(reject, new EngineError(frame.code, frame.message, frame.reply ?? null));
        }));
        offs.push(socket.on("disconnect", () => finish(reject, new EngineError(
          "disconnected", "the connection dropped; the partial reply is kept on the server"))));
        signal?.addEventListener("abort", onAbort);
        socket.send({
          type: "chat",
          conversation_id: request.conversationId ?? null,
          content: request.content,
          model: request.model || undefined,
          options: request.options ?? {},
        });
      });
    },
  };
}
