// The shared snapshot page works without JavaScript; this renders replies' markdown through
// the same sanitising renderer as the chat page, draws the icons and adds copy buttons.
import { renderMarkdown } from "./render.js";
import { copyWithFeedback, fillIcons, iconButton } from "./ui/icons.js";

fillIcons(document);
for (const message of document.querySelectorAll('[data-testid="message"]')) {
  const body = message.querySelector(".body");
  const text = body.textContent;
  if (body.hasAttribute("data-markdown")) {
    body.classList.remove("plain");
    renderMarkdown(body, text);
  }
  const actions = document.createElement("div");
  actions.className = "message-actions";
  const copy = iconButton("copy", "Copy message", { testid: "copy", ui: true, onClick: () => copyWithFeedback(copy, text) });
  actions.append(copy);
  message.append(actions);
}
