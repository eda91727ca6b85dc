// Reply settings belong to the conversation (stored on the server with it, in its export and
// share); a new conversation starts from the visitor's defaults, never from another's. Each
// input's range comes from the server's options (data-options), as does what a blank one means.
import { api } from "../api.js";
import { currentSettings, modelInfo, state, update } from "../state.js";
import { showReplyFormat } from "./reply_format.js";

export function initSettings(root, { options, modelSelect, engineSelect, onError }) {
  const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  const inputs = { system: $("system-prompt"), temperature: $("temperature"), maxTokens: $("max-tokens") };
  for (const [name, input] of [["temperature", inputs.temperature], ["max_tokens", inputs.maxTokens]]) {
    Object.assign(input, { min: options[name].min, max: options[name].max, step: options[name].step });
  }
  inputs.system.maxLength = options.system.max_length;

  function show(values = currentSettings()) {
    showReplyFormat(values);
    inputs.system.value = values.system ?? "";
    inputs.temperature.value = values.temperature ?? options.temperature.default;
    inputs.maxTokens.value = values.max_tokens ?? options.max_tokens.default;
    if (values.model && modelInfo(values.model)) modelSelect.value = values.model;
    if (values.engine) engineSelect.value = values.engine;
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
    };
  }

  async function changed() {
    const values = read();
    if (!state.conversation) {
      update({ pendingSettings: Object.fromEntries(Object.entries(values).filter(([, v]) => v !== null)) });
      return;
    }
    try {
      const updated = await api.updateConversation(state.conversation.id, { settings: values });
      if (state.conversation?.id === updated.id) state.conversation.settings = updated.settings;
    } catch (err) {
      onError(err.message, { cause: "settings" });
    }
  }

  Object.values(inputs).forEach((input) => input.addEventListener("change", changed));
  $("save-defaults").addEventListener("click", async () => {
    try {
      const { settings: saved } = await api.saveDefaults(read());
      update({ defaults: saved });
      $("defaults-status").textContent = "Saved: new conversations start from these.";
    } catch (err) {
      onError(err.message, { cause: "settings" });
    }
  });

  return { show, read, changed, maxTokens: inputs.maxTokens };
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
