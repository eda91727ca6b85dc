// In-page dialogs (a modal <dialog>: focus stays inside, Escape cancels), in place of the
// browser's prompt()/confirm(), which cannot be styled, block the page's own work and look
// like a phishing prompt on some phones.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

let count = 0;

// Resolves with the text entered (input given), true (confirmed) or null (cancelled).
export function ask({ title, message = "", input = null, confirmLabel = "OK", danger = false, testid = "dialog" }) {
  const dialog = el("dialog", "modal");
  dialog.dataset.testid = testid;
  const id = `dialog-title-${++count}`;
  dialog.setAttribute("aria-labelledby", id);
  const form = el("form", "modal-form");
  form.method = "dialog";
  const heading = el("h2", "modal-title", title);
  heading.id = id;
  form.append(heading);
  if (message) form.append(el("p", "modal-message", message));
  let field = null;
  if (input) {
    const label = el("label", "field");
    label.append(el("span", "field-label", input.label));
    field = el("input", "text-input");
    field.type = "text";
    field.value = input.value ?? "";
    field.maxLength = input.maxLength ?? 200;
    field.required = true;
    field.dataset.testid = `${testid}-input`;
    label.append(field);
    form.append(label);
  }
  const buttons = el("div", "modal-buttons");
  const cancel = el("button", "button", "Cancel");
  cancel.type = "button";
  cancel.dataset.testid = `${testid}-cancel`;
  const confirm = el("button", danger ? "button danger" : "button primary", confirmLabel);
  confirm.type = "submit";
  confirm.value = "confirm";
  confirm.dataset.testid = `${testid}-confirm`;
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
