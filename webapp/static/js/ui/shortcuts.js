// Keyboard shortcuts for the whole page, and the dialog that lists them ("?").
// actions: {busy(), stop(), newChat(), search(), focusComposer(), closeDrawer() -> bool}.
export function initShortcuts(root, dialog, button, actions) {
  button.addEventListener("click", () => dialog.showModal());

  const typing = (target) => target instanceof HTMLElement
    && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));

  document.addEventListener("keydown", (event) => {
    const mod = event.ctrlKey || event.metaKey;
    if (document.querySelector("dialog[open]")) return; // a dialog has the keyboard (Escape closes it)
    if (event.key === "Escape") {
      if (actions.busy()) {
        event.preventDefault();
        actions.stop();
        return;
      }
      const openMenu = root.querySelector("details.menu[open]");
      if (openMenu) {
        openMenu.open = false;
        openMenu.querySelector("summary").focus();
      } else {
        actions.closeDrawer();
      }
      return;
    }
    if (mod && event.shiftKey && event.key.toLowerCase() === "o") {
      event.preventDefault();
      actions.newChat();
    } else if (mod && !event.shiftKey && event.key.toLowerCase() === "k") {
      event.preventDefault();
      actions.search();
    } else if (mod && event.key === "/") {
      event.preventDefault();
      actions.focusComposer();
    } else if (event.key === "?" && !mod && !typing(event.target) && !dialog.open) {
      event.preventDefault();
      dialog.showModal();
    }
  });

  // Menus close on clicks outside them, or on the phone sheet's backdrop (the <details>' own ::before).
  document.addEventListener("click", (event) => {
    for (const menu of root.querySelectorAll("details.menu[open]")) {
      if (!menu.contains(event.target) || event.target === menu) menu.open = false;
    }
  });
}
