// The server engine: the model runs on the server as a *run* that outlives this page's socket;
// tokens arrive over the chat socket. Implements the page's engine interface:
//   generate({conversationId, content, model, options}, handlers) -> Promise<stored message>
//   follow(messageId, text, handlers) -> Promise<stored message>   (resume a streaming reply)
// handlers: {onStarted, onToken, onQueued, onConnection, signal}. A dropped connection does not
// end the reply: the socket reconnects and resumes from the characters already shown.
// Rejects with an EngineError carrying .code (and .reply when a failed reply was stored).

export class EngineError extends Error {
  constructor(code, message, reply = null) {
    super(message);
    this.code = code;
    this.reply = reply;
  }
}

// Offsets count Unicode code points, as the server's Python strings do.
export const codePoints = (text) => {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
};

let nextRequestId = 1;

export function createServerEngine(socket) {
  // Relay one reply's frames (by message id) until its final frame.
  function relay(messageId, initialText, { onToken, onQueued, onConnection, signal } = {}) {
    let length = codePoints(initialText ?? "");
    return new Promise((resolve, reject) => {
      const offs = [];
      const finish = (fn, value) => {
        offs.forEach((off) => off());
        signal?.removeEventListener("abort", onAbort);
        fn(value);
      };
      const resume = () => {
        try {
          socket.send({ type: "resume", message_id: messageId, offset: length });
        } catch {
          /* not connected: the reconnect below resumes */
        }
      };
      const onAbort = () => {
        try {
          socket.send({ type: "stop", message_id: messageId });
        } catch {
          /* offline: sent again once the socket is back (see "status") */
        }
      };
      offs.push(socket.on("token", (frame) => {
        if (frame.message_id !== messageId) return;
        const pieces = [...frame.text];
        if (frame.offset > length) {
          resume(); // a gap (frames lost across a reconnect): ask for the rest again
          return;
        }
        const skip = length - frame.offset; // already shown (a resume overlaps live frames)
        if (skip >= pieces.length) return;
        const fresh = skip ? pieces.slice(skip).join("") : frame.text;
        length += pieces.length - skip;
        onToken?.(fresh);
      }));
      offs.push(socket.on("queued", (frame) => {
        if (frame.message_id === messageId) onQueued?.(frame.position);
      }));
      offs.push(socket.on("done", (frame) => {
        if (frame.message_id === messageId) finish(resolve, frame.message);
      }));
      offs.push(socket.on("error", (frame) => {
        if (frame.message_id !== messageId) return;
        finish(reject, new EngineError(frame.code, frame.message, frame.reply ?? null));
      }));
      offs.push(socket.on("status", (status) => {
        onConnection?.(status);
        if (status === "open") {
          resume(); // a new socket: pick the reply up where the page left it
          if (signal?.aborted) onAbort();
        }
      }));
      signal?.addEventListener("abort", onAbort);
      if (signal?.aborted) onAbort();
    });
  }

  return {
    name: "server",

    follow(messageId, text, handlers = {}) {
      const done = relay(messageId, text, handlers);
      if (socket.isOpen) socket.send({ type: "resume", message_id: messageId, offset: codePoints(text ?? "") });
      return done;
    },

    // A new message (after the current leaf, or under request.parentId: an edit), a
    // regenerated sibling (request.regenerate = the reply's id) or more of a cut-off reply
    // (request.continueFrom = the reply), all as runs on the server.
    async generate(request, handlers = {}) {
      await socket.ready();
      const requestId = `r${nextRequestId++}`;
      const started = new Promise((resolve, reject) => {
        const offs = [];
        const finish = (fn, value) => {
          offs.forEach((off) => off());
          fn(value);
        };
        offs.push(socket.on("started", (frame) => {
          if (frame.request_id === requestId) finish(resolve, frame);
        }));
        offs.push(socket.on("error", (frame) => {
          if (frame.request_id === requestId) finish(reject, new EngineError(frame.code, frame.message));
        }));
        offs.push(socket.on("disconnect", () => finish(reject, new EngineError(
          "disconnected", "the connection dropped before the message was stored; send it again"))));
      });
      const common = { request_id: requestId, model: request.model || undefined, options: request.options ?? {} };
      if (request.continueFrom) {
        socket.send({ type: "continue", message_id: request.continueFrom.id, ...common });
      } else if (request.regenerate) {
        socket.send({ type: "regenerate", message_id: request.regenerate, ...common });
      } else {
        const frame = { type: "chat", conversation_id: request.conversationId ?? null,
                        content: request.content, ...common };
        if (request.parentId !== undefined) frame.parent_id = request.parentId;
        if (!request.conversationId && request.settings) frame.settings = request.settings;
        socket.send(frame);
      }
      const frame = await started;
      handlers.onStarted?.(frame.conversation, frame.user_message, frame);
      // This socket already watches the run; its token frames are separate socket events, so
      // none can arrive before relay() listens (this runs in the same task as "started").
      return relay(frame.message_id, request.continueFrom?.content ?? "", handlers);
    },
  };
}
