// Settings → API keys: keys for the OpenAI-compatible API at /v1 (docs/openai-api.md), each
// acting as this visitor. A new key's token is shown once: the server keeps only its hash.
import { ask } from "./dialog.js";
import { copyWithFeedback, iconButton } from "./icons.js";
import { request } from "../api.js";
import { createPanel, dataTable, el, field } from "./panel.js";

function when(iso) {
  if (!iso) return "never";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function initApiKeys(button) {
  if (!button) return;
  const panel = createPanel({ title: "API keys", testid: "api-keys-panel", className: "keys-panel", opener: button,
                              onOpen: opened });
  const base = `${location.origin}/v1`;

  const intro = el("p", "modal-message",
    "A key lets a program use this server's models through its OpenAI-compatible API, as you.");
  const hint = el("div", "keys-hint");
  hint.append(el("h3", "panel-subtitle", "Use it from programs"));
  const baseLine = el("p", "field-help");
  baseLine.append("Base URL: ", el("code", "", base, { testid: "api-base-url" }), " — any OpenAI client works with it.");
  const example = el("pre", "keys-example");
  example.append(el("code", "", `curl ${base}/chat/completions \\\n  -H "Authorization: Bearer $BCHAT_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '{"model": "…", "messages": [{"role": "user", "content": "Hi"}]}'`));
  hint.append(baseLine, example);

  const form = el("form", "keys-form");
  const name = el("input", "text-input", null,
                  { type: "text", maxLength: 100, required: true, placeholder: "e.g. my notebook", testid: "api-key-name" });
  const create = el("button", "button primary", "Create key", { type: "submit", testid: "api-key-create" });
  form.append(field("Name of a new key", name), create);

  const fresh = el("div", "key-token-box", null, { testid: "api-key-token-box", role: "status", hidden: true });
  const warning = el("p", "key-warning", "Copy this key now: you will not see it again.");
  const tokenRow = el("div", "share-row");
  const token = el("input", "text-input mono", null,
                   { readOnly: true, testid: "api-key-token", "aria-label": "The new key (shown once)" });
  const copy = iconButton("copy", "Copy the key", { testid: "api-key-copy", onClick: () => copyWithFeedback(copy, token.value) });
  const done = el("button", "button small", "I have copied it", { type: "button", testid: "api-key-done" });
  tokenRow.append(token, copy);
  fresh.append(warning, tokenRow, done);

  const listHeading = el("h3", "panel-subtitle", "Your keys");
  const { table, scroll } = dataTable("keys-table", ["Name", "Key", "Created", "Last used", ""], "api-key-list");
  const empty = el("p", "field-help", "No keys yet.");

  panel.body.append(intro, form, fresh, listHeading, empty, scroll, hint);

  async function refresh() {
    let keys;
    try {
      ({ keys } = await request("GET", "/api/keys"));
    } catch (err) {
      panel.problem(err.message);
      return;
    }
    empty.hidden = keys.length > 0;
    scroll.hidden = keys.length === 0;
    table.tBodies[0].replaceChildren(...keys.map((key) => {
      const row = el("tr", "", null, { testid: "api-key-row" });
      row.dataset.keyId = key.id;
      row.dataset.revoked = String(Boolean(key.revoked));
      const prefix = el("td");
      prefix.append(el("code", "", `${key.prefix}…`));
      const action = el("td");
      if (key.revoked) {
        action.append(el("span", "badge", "revoked"));
      } else {
        const revoke = el("button", "button small danger", "Revoke",
                          { type: "button", testid: "api-key-revoke", "aria-label": `Revoke the key ${key.name}` });
        revoke.addEventListener("click", async () => {
          const sure = await ask({
            title: "Revoke this key?",
            message: `Programs using “${key.name}” (${key.prefix}…) stop working at once. This cannot be undone.`,
            confirmLabel: "Revoke", danger: true, testid: "revoke-key-dialog",
          });
          if (!sure) return;
          try {
            await request("DELETE", `/api/keys/${encodeURIComponent(key.id)}`);
          } catch (err) {
            panel.problem(err.message);
          }
          await refresh();
        });
        action.append(revoke);
      }
      row.append(el("td", "", key.name), prefix, el("td", "", when(key.created_at)), el("td", "", when(key.last_used_at)), action);
      return row;
    }));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!name.value.trim()) return;
    create.disabled = true;
    panel.problem("");
    try {
      const created = await request("POST", "/api/keys", { name: name.value.trim() });
      token.value = created.token;
      fresh.hidden = false;
      name.value = "";
      token.focus();
      token.select();
      await refresh();
    } catch (err) {
      panel.problem(err.message);
    } finally {
      create.disabled = false;
    }
  });
  // The token leaves the page when it is copied or the panel closes: "shown once" means once.
  const forget = () => {
    token.value = "";
    fresh.hidden = true;
  };
  done.addEventListener("click", forget);
  panel.dialog.addEventListener("close", forget);

  function opened() {
    refresh();
    name.focus();
  }
}
