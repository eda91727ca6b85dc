// The conversation list: open, rename, delete. Owns no state beyond what it renders.

export class ConversationList {
  constructor(container, { onOpen, onRename, onDelete }) {
    this.container = container;
    this.handlers = { onOpen, onRename, onDelete };
    this.activeId = null;
  }

  render(conversations, activeId = this.activeId) {
    this.activeId = activeId;
    this.container.replaceChildren(...conversations.map((c) => this.item(c)));
  }

  item(conversation) {
    const li = document.createElement("li");
    li.dataset.testid = "conversation";
    li.dataset.conversationId = conversation.id;
    li.dataset.shared = String(Boolean(conversation.shared));
    if (conversation.id === this.activeId) li.classList.add("active");
    const link = document.createElement("a");
    link.href = `/c/${encodeURIComponent(conversation.id)}`;
    link.textContent = conversation.title;
    link.title = conversation.title;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      this.handlers.onOpen(conversation.id);
    });
    const rename = iconButton("✎", "Rename", "rename", () => {
      const title = prompt("Rename conversation", conversation.title);
      if (title && title.trim()) this.handlers.onRename(conversation.id, title.trim());
    });
    const remove = iconButton("✕", "Delete", "delete", () => {
      if (confirm(`Delete "${conversation.title}"?`)) this.handlers.onDelete(conversation.id);
    });
    li.append(link, rename, remove);
    return li;
  }
}

function iconButton(icon, label, testid, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = icon;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.dataset.testid = testid;
  button.addEventListener("click", onClick);
  return button;
}
