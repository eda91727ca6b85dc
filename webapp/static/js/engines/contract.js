// The engine contract: what the page asks of an engine and hears back, so chat and compare
// drive either the same way. server.js runs the model on the server (a run; tokens come over
// the chat socket); browser.js runs it in this page with wllama (all stored through the API).
//
//   engine.generate(request, handlers) -> Promise<the stored reply>; rejects with an EngineError
//     request: {conversationId (null: a new conversation), content, model, modelInfo (its
//       /api/models entry), backend (browser), options (what the page runs with; the server
//       reads the conversation's settings), settings (a new conversation's), parentId (an
//       edit: the new user message goes under it), regenerate (a reply's id: another beside
//       it), continueFrom (a cut-off reply: more of it, server only), replyTo (a user message
//       already stored: answer it, browser only)}
//     handlers, each optional:
//       signal                   an AbortSignal: stop the reply (stored as "stopped")
//       onStarted(conversation, userMessage, frame?)  the user message is stored (browser:
//                                conversation holds the windows of the branch it read)
//       onReplyCreated(message)  the reply's row exists (browser engine)
//       onQueued(position)       waiting for the model, `position` replies ahead
//       onLoad(progress)         the browser engine loads the model or reads the history:
//                                {phase: "checking"|"downloading"|"reading"|"ready", …}
//       onToken(text)            more of the reply
//       onTool(frame)            tools on: a tool_call / tool_result frame of the reply
//       onStep(frame)            a tool step is stored (the socket's "step" frame): the
//                                tokens after it are the next reply's (frame.reply)
// Beyond it, the server engine follows a reply written elsewhere and starts a compare; the
// browser engine preloads a model and measures one (the benchmark).

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
