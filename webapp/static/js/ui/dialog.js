// In-page dialogs (a modal <dialog>: focus stays inside, Escape cancels), in place of the
// browser's prompt()/confirm(), which cannot be styled, block the page's own work and look
// like a phishing prompt on some phones.
import { el, field as labelled } from "./panel.js";

let count = 0;

// Resolves with the text entered (input given), true (confirmed) or null (cancelled).
export function ask({ title, message = "", input = null, confirmLabel = "OK", danger = false, testid = "dialog" }) {
  const id = `dialog-title-${++count}`;
  const dialog = el("dialog", "modal", null, { testid, "aria-labelledby": id });
  const form = el("form", "modal-form", null, { method: "dialog" });
  form.append(el("h2", "modal-title", title, { id }));
  if (message) form.append(el("p", "modal-message", message));
  let field = null;
  if (input) {
    field = el("input", "text-input", null, { type: "text", value: input.value ?? "", maxLength: input.maxLength ?? 200,
                                              required: true, testid: `${testid}-input` });
    form.append(labelled(input.label, field));
  }
  const buttons = el("div", "modal-buttons");
  const cancel = el("button", "button", "Cancel", { type: "button", testid: `${testid}-cancel` });
  const confirm = el("button", danger ? "button danger" : "button primary", confirmLabel,
                     { type: "submit", value: "confirm", testid: `${testid}-confirm` });
  buttons.append(cancel, confirm);
  form.append(buttons);
  dialog.append(form);
  document.body.append(dialog);
  const opener = document.activeElement;

  return new Promise((resolve) => {
    cancel.addEventListener("click", () => dialog.close("cancel"));
    form.addEventListener("submit", (event) => {
      if (field && !field.value.trim()) {
        event.preventDefault();
        field.focus();
      }
    });
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close("cancel"); // a click on the backdrop
    });
    dialog.addEventListener("close", () => {
      const confirmed = dialog.returnValue === "confirm";
      dialog.remove();
      opener?.focus?.();
      if (!confirmed) resolve(null);
      else resolve(field ? field.value.trim() : true);
    });
    dialog.showModal();
    if (field) {
      field.focus();
      field.select();
    } else {
      (danger ? cancel : confirm).focus();
    }
  });
}
