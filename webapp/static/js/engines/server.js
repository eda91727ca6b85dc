// The server engine (see contract.js): the model runs on the server as a *run* that outlives
// this page's socket; tokens arrive over the chat socket. A dropped connection does not end a
// reply: the socket reconnects and resumes from the characters already shown.
import { EngineError } from "./contract.js";

// Offsets count Unicode code points, as the server's Python strings do.
const codePoints = (text) => {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
};

let nextRequestId = 1;

export function createServerEngine(socket) {
  // Relay one reply's frames (by message id) until its final frame.
  // A conversation with tools on: tool_call / tool_result frames go to onTool, and a "step"
  // frame moves the relay to the loop's next reply (onStep), whose tokens start at 0.
  function relay(messageId, initialText, { onToken, onQueued, onTool, onStep, signal } = {}) {
    let length = codePoints(initialText ?? "");
    return new Promise((resolve, reject) => {
      const finish = (fn, value) => {
        off();
        signal?.removeEventListener("abort", onAbort);
        fn(value);
      };
      // Offline, a frame is not sent: once the socket is back, "status" below sends both again.
      const sendIfOpen = (frame) => socket.isOpen && socket.send(frame);
      const resume = () => sendIfOpen({ type: "resume", message_id: messageId, offset: length });
      const onAbort = () => sendIfOpen({ type: "stop", message_id: messageId });
      const off = socket.onEach({ token: (frame) => {
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
      }, tool_call: (frame) => {
        if (frame.message_id === messageId) onTool?.(frame);
      }, tool_result: (frame) => {
        if (frame.message_id === messageId) onTool?.(frame);
      }, step: (frame) => {
        if (frame.message_id !== messageId) return;
        messageId = frame.reply.id;
        length = 0;
        onStep?.(frame);
      }, queued: (frame) => {
        if (frame.message_id === messageId) onQueued?.(frame.position);
      }, done: (frame) => {
        if (frame.message_id === messageId) finish(resolve, frame.message);
      }, error: (frame) => {
        // an error frame names the reply it concerns: others followed beside it go on
        if (frame.message_id === messageId) finish(reject, new EngineError(frame.code, frame.message, frame.reply ?? null));
      }, status: (status) => {
        if (status !== "open") return;
        resume(); // a new socket: pick the reply up where the page left it
        if (signal?.aborted) onAbort();
      } });
      signal?.addEventListener("abort", onAbort);
      if (signal?.aborted) onAbort();
    });
  }

  // Send a frame that starts runs (chat, regenerate, continue, compare) and wait for its
  // "started" frame, matched by request id.
  async function start(frame) {
    await socket.ready();
    const requestId = `r${nextRequestId++}`;
    const started = new Promise((resolve, reject) => {
      const finish = (fn, value) => {
        off();
        fn(value);
      };
      const off = socket.onEach({
        started: (f) => f.request_id === requestId && finish(resolve, f),
        error: (f) => f.request_id === requestId && finish(reject, new EngineError(f.code, f.message)),
        disconnect: () => finish(reject, new EngineError(
          "disconnected", "the connection dropped before the message was stored; send it again")),
      });
    });
    socket.send({ ...frame, request_id: requestId });
    return started;
  }

  return {
    follow(messageId, text, handlers = {}) {
      const done = relay(messageId, text, handlers);
      if (socket.isOpen) socket.send({ type: "resume", message_id: messageId, offset: codePoints(text ?? "") });
      return done;
    },

    // A new message (after the current leaf, or under request.parentId: an edit), a
    // regenerated sibling (request.regenerate = the reply's id) or more of a cut-off reply
    // (request.continueFrom = the reply), all as runs on the server.
    async generate(request, handlers = {}) {
      const common = { model: request.model || undefined, options: request.options ?? {} };
      let frame;
      if (request.continueFrom) {
        frame = { type: "continue", message_id: request.continueFrom.id, ...common };
      } else if (request.regenerate) {
        frame = { type: "regenerate", message_id: request.regenerate, ...common };
      } else {
        frame = { type: "chat", conversation_id: request.conversationId ?? null, content: request.content, ...common };
        if (request.parentId !== undefined) frame.parent_id = request.parentId;
        if (request.attachments?.length) frame.attachments = request.attachments;
        if (!request.conversationId && request.settings) frame.settings = request.settings;
      }
      const started = await start(frame);
      handlers.onStarted?.(started.conversation, started.user_message, started);
      // This socket already watches the run; its token frames are separate socket events, so
      // none can arrive before relay() listens (this runs in the same task as "started").
      return relay(started.message_id, request.continueFrom?.content ?? "", handlers);
    },

    // One message to several models: resolves with the "started" frame (conversation_id,
    // user_message, message_ids in the order of `models`); follow() each reply in the same
    // task, before any of its tokens can arrive.
    compare({ conversationId, content, models, options }) {
      return start({ type: "compare", conversation_id: conversationId, content,
                     targets: models.map((model) => ({ model })), options });
    },
  };
}
