// Reply settings belong to the conversation (stored on the server with it, in its export and
// share); a new conversation starts from the visitor's defaults, never from another's. Each
// input's range comes from the server's options (data-options), as does what a blank one means.
//
// The sheet saves one way: its Save button stores every field at once (system prompt,
// temperature, max tokens, reply format) and says "Saved"; closing the sheet with unsaved
// edits saves them the same way, so typed text is never silently dropped. On a new chat there
// is no conversation yet: Save keeps the settings for it (they are sent with its first message
// and stored when it is created), since someone editing this chat's settings means this chat,
// not every later one ("Use as my defaults" is that, and says so).
import { api } from "../api.js";
import { currentSettings, modelInfo, state, update } from "../state.js";
import { readReplyFormat, replyFormatRefused, replyFormatSaved, showReplyFormat } from "./reply_format.js";
import { initToolSettings } from "./tools.js";

export function initSettings(root, { options, modelSelect, engineSelect, onError }) {
  const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  const inputs = { system: $("system-prompt"), temperature: $("temperature"), maxTokens: $("max-tokens") };
  for (const [name, input] of [["temperature", inputs.temperature], ["max_tokens", inputs.maxTokens]]) {
    Object.assign(input, { min: options[name].min, max: options[name].max, step: options[name].step });
  }
  inputs.system.maxLength = options.system.max_length;
  const sheet = $("settings");
  const saveButton = $("settings-save");
  const status = $("settings-status");
  let dirty = false;
  let saving = Promise.resolve();
  const tools = initToolSettings(root, { onEdit: () => edited() });

  function say(text, level = "ok") {
    status.textContent = text;
    status.dataset.level = level;
  }

  // The Save button waits for a schema that parses; the sheet is marked unsaved until saved.
  function edited() {
    dirty = true;
    saveButton.disabled = readReplyFormat() === undefined;
    say(saveButton.disabled ? "Fix the JSON schema to save." : "Unsaved changes.", saveButton.disabled ? "bad" : "");
  }

  function show(values = currentSettings()) {
    showReplyFormat(values);
    inputs.system.value = values.system ?? "";
    inputs.temperature.value = values.temperature ?? options.temperature.default;
    inputs.maxTokens.value = values.max_tokens ?? options.max_tokens.default;
    if (values.model && modelInfo(values.model)) modelSelect.value = values.model;
    if (values.engine) engineSelect.value = values.engine;
    tools.show(values);
    dirty = false;
    saveButton.disabled = false;
    say("");
  }

  // A blank (or unreadable) input is null: the server's default.
  function read() {
    const number = (n) => (Number.isFinite(n) ? n : null);
    return {
      system: inputs.system.value.trim() ? inputs.system.value : null,
      temperature: number(Number.parseFloat(inputs.temperature.value)),
      max_tokens: number(Number.parseInt(inputs.maxTokens.value, 10)),
      model: modelSelect.value || null,
      engine: engineSelect.value || null,
      ...tools.read(),
    };
  }

  async function store(values) {
    if (!state.conversation) {
      update({ pendingSettings: { ...state.pendingSettings,
                                  ...Object.fromEntries(Object.entries(values).filter(([, v]) => v !== null)) } });
      if (values.response_format === null) delete state.pendingSettings.response_format;
      return "new";
    }
    const updated = await api.updateConversation(state.conversation.id, { settings: values });
    if (state.conversation?.id === updated.id) state.conversation.settings = updated.settings;
    return "stored";
  }

  // The whole sheet at once.
  async function save() {
    const format = readReplyFormat();
    if (format === undefined) {
      say("Not saved: fix the JSON schema first.", "bad");
      return false;
    }
    const values = { ...read(), response_format: format };
    try {
      const where = await store(values);
      dirty = false;
      replyFormatSaved(format);
      say(where === "new" ? "Saved: used when you send this chat's first message." : "Saved for this conversation.");
      return true;
    } catch (err) {
      // A refusal of anything but the plain fields is the schema's (a limit, a pattern).
      if (format && !/temperature|max_tokens|system/i.test(`${err.code} ${err.message}`)) replyFormatRefused(err.message);
      say(`Not saved: ${err.message}`, "bad");
      return false;
    }
  }

  const saveNow = () => {
    saving = save();
    return saving;
  };

  // The composer's model and engine pickers are not in the sheet: they save on change.
  async function changed() {
    const values = { model: modelSelect.value || null, engine: engineSelect.value || null };
    try {
      await store(values);
    } catch (err) {
      onError(err.message, { cause: "settings" });
    }
  }

  Object.values(inputs).forEach((input) => input.addEventListener("input", edited));
  tools.wire();
  root.querySelector(".reply-format")?.addEventListener("bchat:reply-format-edited", edited);
  saveButton.addEventListener("click", saveNow);
  sheet.addEventListener("toggle", () => {
    if (!sheet.open && dirty) saveNow();
  });
  $("save-defaults").addEventListener("click", async () => {
    try {
      const format = readReplyFormat();
      const values = { ...read(), ...(format !== undefined ? { response_format: format } : {}) };
      const { settings: saved } = await api.saveDefaults(values);
      update({ defaults: saved });
      say("Saved as your defaults: new conversations start from these.");
    } catch (err) {
      say(`Not saved: ${err.message}`, "bad");
    }
  });

  // send() waits for a save still under way, so a reply never runs on the settings before it.
  return { show, read, changed, save: saveNow, get saving() { return saving; }, maxTokens: inputs.maxTokens };
}

// The options a reply is made with, for the engine that runs in this page (the server reads
// the conversation's own settings).
export function replyOptions(values = currentSettings()) {
  const options = {};
  for (const name of ["system", "temperature", "top_p", "max_tokens", "seed"]) {
    if (values[name] !== undefined && values[name] !== null && values[name] !== "") options[name] = values[name];
  }
  return options;
}
