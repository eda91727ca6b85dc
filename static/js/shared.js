// The shared snapshot page works without JavaScript; this only renders replies' markdown
// through the same sanitising renderer as the chat page.
import { renderMarkdown } from "./render.js";

for (const body of document.querySelectorAll("[data-markdown]")) {
  const text = body.textContent;
  body.classList.remove("plain");
  renderMarkdown(body, text);
}
