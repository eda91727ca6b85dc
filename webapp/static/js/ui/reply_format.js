// The reply format setting (text, or JSON following a schema) and structured replies' view.
// The setting is the conversation's, saved with the rest of the sheet (ui/settings.js):
// PATCH /api/conversations/<id> {"settings": {"response_format": {...}}} (null clears it); the
// server runs the model under a grammar.
// The page checks only that the schema is a JSON object: whether it is within the server's
// limits (repetitions, sizes, ambiguity) is the server's verdict, the same one a chat or /v1
// gets, shown here when the sheet is saved.
//   readReplyFormat()          -> the response_format to send (null for plain text), or
//                                 undefined while the schema is invalid
//   showReplyFormat(settings)  -> show a conversation's settings in the controls
//   renderStructured(element, message) -> true when the message was a structured reply and
//                                 is now shown as formatted JSON with a valid/invalid mark
import { api } from "../api.js";
import { renderMarkdown } from "../render.js";
import { state } from "../state.js";
import { el } from "./panel.js";

let controls = null;

export function schemaProblem(text) {
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (err) {
    return { problem: `not JSON: ${err.message}` };
  }
  if (!schema || typeof schema !== "object" || Array.isArray(schema)) return { problem: "the schema must be a JSON object" };
  return { schema };
}

export function readReplyFormat() {
  if (!controls || controls.kind.value !== "json_schema") return null;
  const { schema } = schemaProblem(controls.schema.value);
  if (!schema) return undefined;
  return { type: "json_schema", json_schema: { name: "reply", schema } };
}

// What the sheet's Save (ui/settings.js) says beside the schema: saved, or the server's refusal.
export function replyFormatSaved(format) {
  if (!controls) return;
  controls.note.textContent = format ? "Saved: replies in this conversation follow the schema." : "Saved: replies are plain text.";
  controls.note.dataset.level = "ok";
}

export function replyFormatRefused(message) {
  if (!controls) return;
  // The server's refusal (a limit, a pattern it cannot follow) belongs next to the schema.
  controls.note.textContent = `Refused by the server: ${message}`;
  controls.note.dataset.level = "bad";
  controls.schema.setAttribute("aria-invalid", "true");
}

export function showReplyFormat(settings) {
  if (!controls) return;
  const format = settings?.response_format;
  const schema = format?.json_schema?.schema ?? format?.schema;
  controls.kind.value = format?.type === "json_schema" && schema ? "json_schema" : "text";
  if (schema) controls.schema.value = JSON.stringify(schema, null, 2);
  controls.refresh();
}

const TYPES = {
  object: (v) => v !== null && typeof v === "object" && !Array.isArray(v),
  array: Array.isArray,
  string: (v) => typeof v === "string",
  number: (v) => typeof v === "number",
  integer: Number.isInteger,
  boolean: (v) => typeof v === "boolean",
  null: (v) => v === null,
};

function typeMatches(type, value) {
  const types = Array.isArray(type) ? type : [type];
  return types.some((t) => (TYPES[t] ? TYPES[t](value) : true));
}

// A light check, not a validator: JSON, the top-level type, required keys, their basic types.
export function checkStructured(text, schema) {
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return { value: undefined, problems: ["not valid JSON"] };
  }
  const problems = [];
  if (schema?.type && !typeMatches(schema.type, value)) problems.push(`not of type ${schema.type}`);
  if (TYPES.object(value)) {
    for (const key of schema?.required ?? []) if (!(key in value)) problems.push(`"${key}" is missing`);
    for (const [key, sub] of Object.entries(schema?.properties ?? {})) {
      if (key in value && sub?.type && !typeMatches(sub.type, value[key])) problems.push(`"${key}" is not of type ${sub.type}`);
    }
  }
  return { value, problems };
}

export function renderStructured(element, message) {
  const format = message?.meta?.options?.response_format;
  if (!format || message.role !== "assistant" || message.status === "streaming") return false;
  const schema = format.json_schema?.schema ?? format.schema ?? (format.type === "json_object" ? { type: "object" } : null);
  const { value, problems } = checkStructured(message.content ?? "", schema);
  const text = value === undefined ? message.content ?? "" : JSON.stringify(value, null, 2);
  // Through the sanitising renderer, as a fenced block: the longest backtick run plus one.
  const fence = "`".repeat(Math.max(3, ...[...text.matchAll(/`+/g)].map((m) => m[0].length + 1)));
  const code = el("div", "structured-code");
  renderMarkdown(code, `${fence}json\n${text}\n${fence}`);
  const valid = problems.length === 0;
  const mark = el("p", "structured-mark", valid ? "Valid JSON for the schema" : `Does not match the schema: ${problems.join("; ")}`);
  mark.dataset.testid = "structured-mark";
  mark.dataset.valid = String(valid);
  element.replaceChildren(mark, code);
  element.dataset.structured = "true";
  return true;
}

// An example to start from.
const EXAMPLE = { type: "object", properties: { answer: { type: "string" } }, required: ["answer"] };

// container: an element in the reply settings (chat.html's reply-format block); the sheet's
// one Save button (ui/settings.js) stores it with the other settings. Each edit is announced
// on the container ("bchat:reply-format-edited") so the sheet knows it has unsaved changes.
export function initReplyFormat(container) {
  if (!container) return;
  const kind = container.querySelector('[data-testid="reply-format"]');
  const schema = container.querySelector('[data-testid="reply-schema"]');
  const note = container.querySelector('[data-testid="reply-schema-note"]');
  if (!schema.value) schema.value = JSON.stringify(EXAMPLE, null, 2);
  const refresh = () => {
    const json = kind.value === "json_schema";
    schema.closest(".field").hidden = !json;
    const { problem } = json ? schemaProblem(schema.value) : {};
    schema.setAttribute("aria-invalid", String(Boolean(problem)));
    note.dataset.level = problem ? "bad" : "ok";
    note.textContent = !json ? "Replies are plain text (markdown)." : problem ? `Invalid schema: ${problem}` : "A valid schema.";
  };
  controls = { kind, schema, note, refresh };
  let edits = 0; // the reader's changes win over a conversation's settings still loading
  const edited = () => {
    edits += 1;
    refresh();
    container.dispatchEvent(new Event("bchat:reply-format-edited"));
  };
  kind.addEventListener("change", edited);
  schema.addEventListener("input", edited);
  // The settings menu shows the open conversation's own format each time it opens.
  const menu = container.closest("details");
  // Counted from the last close, not from the toggle event: that event is queued, so a
  // choice made the moment the menu opened may come before it and must still win.
  let editsAtClose = edits;
  menu?.addEventListener("toggle", async () => {
    if (!menu.open) {
      editsAtClose = edits;
      return;
    }
    const id = state.conversationId;
    refresh();
    if (!id) return;
    const before = editsAtClose;
    try {
      const { settings } = await api.conversationHead(id);
      if (edits === before && id === state.conversationId) showReplyFormat(settings);
    } catch {
      /* the conversation is gone: the controls keep what they show */
    }
  });
  refresh();
}

