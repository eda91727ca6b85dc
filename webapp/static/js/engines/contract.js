// The engine contract: what the page asks of an engine and what an engine tells it back, so
// chat and compare drive either engine the same way. Two implement it: server.js (the model
// runs on the server as a run; tokens come over the chat socket) and browser.js (wllama runs
// the model in this page; everything is stored through the API).
//
//   engine.name                          "server" | "browser"
//   engine.generate(request, handlers) -> Promise<the stored reply>
//     request: {conversationId (null: a new conversation), content, model, modelInfo (its
//       /api/models entry), backend (browser), options (what the page runs with; the server
//       reads the conversation's settings), settings (a new conversation's),
//       parentId (an edit: the new user message goes under it), regenerate (a reply's id:
//       another beside it), continueFrom (a cut-off reply: more of it, server only),
//       replyTo (a user message already stored: answer it, browser only)}
//     handlers, each optional:
//       onStarted(conversation, userMessage, frame?)  the user message is stored
//       onReplyCreated(message)  the reply's row exists (browser engine)
//       onQueued(position)       waiting for the model, `position` replies ahead
//       onLoad(progress)         the browser engine loads the model or reads the history:
//                                {phase: "checking"|"downloading"|"reading"|"ready", …}
//       onToken(text)            more of the reply
//       signal                   an AbortSignal: stop the reply (stored as "stopped")
//   It rejects with an EngineError.
//
// The server engine also follows a reply being written elsewhere (follow) and starts a compare
// (several models, one message); the browser engine also preloads a model and measures one.

// The tokens the browser engine gives a model (never beyond the model's own): the page's
// context meter and composer count against it before the engine is even loaded.
export const BROWSER_N_CTX = 4096;

// .code says what failed (the server's error codes, or the page's: load_failed,
// webgpu_unavailable, not_in_browser, model_failed, disconnected); .reply is the failed reply
// when one was stored.
export class EngineError extends Error {
  constructor(code, message, reply = null) {
    super(message);
    this.code = code;
    this.reply = reply;
  }
}
