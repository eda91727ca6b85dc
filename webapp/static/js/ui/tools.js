// Tools in the chat: the settings sheet's Tools section (which tools a conversation's model
// may call: GET /api/tools) and the blocks a tool step shows as (the calls an assistant
// message made, a tool's result). Arguments and results are tool output, not the model's
// prose: shown as TEXT (textContent) in a <pre>, never parsed as Markdown or HTML.
import { api } from "../api.js";
import { el } from "./panel.js";
import { ms } from "../format.js";

// One step's block: a summary line (name, what, timing) that folds its text away.
export function toolBlock({ name, note, text, error = null, open = false, testid = "tool-step" }) {
  const block = el("details", "tool-step", null, { testid });
  if (error) block.dataset.error = error;
  block.open = open;
  const summary = el("summary");
  summary.append(el("span", "tool-name", name ?? "tool"), el("span", "tool-note", note));
  const pre = el("pre", "tool-text", null, { testid: "tool-text" });
  pre.textContent = text ?? "";
  block.append(summary, pre);
  return block;
}

const argumentsText = (value) => {
  if (typeof value === "string") {
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch {
      return value;
    }
  }
  return JSON.stringify(value ?? {}, null, 2);
};

export const resultNote = ({ ms: took, error, truncated }) =>
  [error ? `failed (${error})` : "result", took != null ? ms(took) : null, truncated ? "cut to fit" : null]
    .filter(Boolean).join(" · ");

// The blocks of a stored message: an assistant's calls, or a tool's result.
export function toolBlocksOf(message) {
  if (message.role === "tool") {
    const meta = message.meta ?? {};
    return [toolBlock({ name: meta.name, note: resultNote(meta), text: message.content, error: meta.error,
                        testid: "tool-result" })];
  }
  return (message.meta?.tool_calls ?? []).map((call) => toolBlock({
    name: call.function?.name, note: "called with", text: argumentsText(call.function?.arguments), testid: "tool-call" }));
}

// A live step's block, from its tool_call frame; its tool_result frame fills it in.
export function liveToolBlock(frame) {
  return toolBlock({ name: frame.name, note: "running…", text: argumentsText(frame.arguments), open: false,
                     testid: "tool-live" });
}

export function fillToolBlock(block, frame) {
  if (frame.error) block.dataset.error = frame.error;
  block.querySelector(".tool-note").textContent = resultNote(frame);
  const pre = block.querySelector(".tool-text");
  pre.textContent = `${pre.textContent}\n\n→ ${frame.content ?? ""}`;
}

// The settings sheet's Tools section. values.chat_tools: the enabled names (none: off).
export function initToolSettings(root, { onEdit }) {
  const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  const list = $("tools-list");
  const required = $("tools-required");
  const note = $("tools-note");
  let tools = [];
  let shown = {};
  const loaded = api.tools().then((body) => {
    tools = body.tools;
    draw();
  }, (err) => {
    note.textContent = `The tools could not be listed: ${err.message}`;
  });

  function draw() {
    list.replaceChildren();
    const enabled = new Set(shown.chat_tools ?? []);
    for (const tool of tools) {
      const box = el("input", null, null, { type: "checkbox", testid: `tool-${tool.name}` });
      box.value = tool.name;
      box.checked = enabled.has(tool.name);
      box.addEventListener("change", onEdit);
      const label = el("label", "check");
      const text = el("span");
      text.append(el("span", null, tool.title), " ");
      if (tool.source !== "builtin") text.append(el("span", "tool-source", `(${tool.source.replace(/^mcp:/, "MCP: ")})`));
      label.title = tool.description;
      label.append(box, text);
      list.append(label);
    }
    if (!tools.length) list.append(el("p", "field-help", "This server offers no tools."));
  }

  return {
    show(values) {
      shown = values ?? {};
      required.checked = shown.chat_tool_choice === "required";
      draw();
    },
    read() {
      const names = [...list.querySelectorAll("input:checked")].map((box) => box.value);
      return { chat_tools: names.length ? names : null, chat_tool_choice: required.checked ? "required" : null };
    },
    wire() {
      required.addEventListener("change", onEdit);
    },
    loaded,
  };
}
