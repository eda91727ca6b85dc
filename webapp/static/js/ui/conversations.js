// The conversation list, grouped by date (Today, Yesterday, Previous 7 days, Older): open,
// rename, delete (in-page dialogs), and search results in the same place. Owns no state beyond
// what it renders, and the pages it loads as it scrolls (api.conversations: the array's `next`).
import { api } from "../api.js";
import { ask } from "./dialog.js";
import { icon, iconButton } from "./icons.js";
import { el } from "./panel.js";
import { groupBy } from "../tree.js";

const DAY = 24 * 60 * 60 * 1000;

// Which group a conversation last touched at `when` belongs to, seen from `now` (local days).
export function dateGroup(when, now = new Date()) {
  const startOfToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  const t = when.getTime();
  if (t >= startOfToday) return "Today";
  if (t >= startOfToday - DAY) return "Yesterday";
  if (t >= startOfToday - 7 * DAY) return "Previous 7 days";
  return "Older";
}

export class ConversationList {
  constructor(container, { onOpen, onRename, onDelete }) {
    this.container = container;
    this.handlers = { onOpen, onRename, onDelete };
    this.activeId = null;
    this.shown = null; // the list rendered, which grows by the pages loaded as it scrolls
    this.loading = false;
    // The end of the list coming into view (in the sidebar's own scrolling) loads the next page.
    this.observer = new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting)) this.loadMore();
    });
  }

  render(conversations, activeId = this.activeId) {
    this.activeId = activeId;
    this.shown = conversations;
    this.observer.disconnect();
    if (!conversations.length) {
      this.container.replaceChildren(el("p", "list-empty", "No conversations yet."));
      return;
    }
    const groups = groupBy(conversations, (c) => dateGroup(new Date(c.updated_at)));
    this.container.replaceChildren(...[...groups].map(([name, items], index) => {
      const section = el("section", "list-group");
      const heading = el("h2", "list-heading", name, { id: `group-${index}` });
      const list = el("ul", "conversations", null, { "aria-labelledby": heading.id });
      list.append(...items.map((c) => this.item(c)));
      section.append(heading, list);
      return section;
    }));
    if (conversations.next) {
      const more = el("p", "list-empty", "Loading more…", { testid: "list-more" });
      this.container.append(more);
      this.observer.observe(more);
    }
  }

  // The next page, appended to the list shown and rendered whole again, so a date group split
  // across two pages reads as one.
  async loadMore() {
    const shown = this.shown;
    if (!shown?.next || this.loading) return;
    this.loading = true;
    try {
      const { conversations: more } = await api.conversations(shown.next);
      if (shown !== this.shown) return; // the list was refreshed (or searched) meanwhile
      const known = new Set(shown.map((c) => c.id));
      shown.push(...more.filter((c) => !known.has(c.id)));
      shown.next = more.next;
      this.render(shown);
    } catch (err) {
      const more = this.container.querySelector('[data-testid="list-more"]');
      if (more) more.textContent = `Could not load more: ${err.message}`;
    } finally {
      this.loading = false;
    }
  }

  // Search results: a conversation and the words around the match.
  renderResults(results, query) {
    this.shown = null;
    this.observer.disconnect();
    if (!results.length) {
      this.container.replaceChildren(el("p", "list-empty", `Nothing matches “${query}”.`));
      return;
    }
    const heading = el("h2", "list-heading", `${results.length} found`, { id: "search-heading" });
    const list = el("ul", "conversations results", null, { "aria-labelledby": heading.id });
    list.append(...results.map((r) => {
      const li = el("li", "", null, { testid: "search-result" });
      li.dataset.conversationId = r.conversation_id;
      const link = this.link(r.conversation_id, "result-link");
      link.append(el("span", "result-title", r.title));
      if (r.snippet) link.append(el("span", "result-snippet", r.snippet));
      li.append(link);
      return li;
    }));
    this.container.replaceChildren(heading, list);
  }

  // A link to a conversation that opens it in this page.
  link(id, className, props) {
    const link = el("a", className, null, { href: `/c/${encodeURIComponent(id)}`, ...props });
    link.addEventListener("click", (event) => {
      event.preventDefault();
      this.handlers.onOpen(id);
    });
    return link;
  }

  item(conversation) {
    const li = el("li", conversation.id === this.activeId ? "active" : "", null, { testid: "conversation" });
    li.dataset.conversationId = conversation.id;
    li.dataset.shared = String(Boolean(conversation.shared));
    const link = this.link(conversation.id, "", { title: conversation.title });
    if (conversation.id === this.activeId) link.setAttribute("aria-current", "page");
    link.append(el("span", "conversation-title", conversation.title));
    if (conversation.shared) {
      const mark = el("span", "shared-mark", null, { title: "Shared" });
      mark.append(icon("link", { size: 14 }), el("span", "sr-only", " (shared)"));
      link.append(mark);
    }
    const rename = iconButton("pencil", `Rename “${conversation.title}”`, {
      testid: "rename",
      onClick: async () => {
        const title = await ask({
          title: "Rename conversation", input: { label: "Title", value: conversation.title },
          confirmLabel: "Rename", testid: "rename-dialog",
        });
        if (title) this.handlers.onRename(conversation.id, title);
      },
    });
    const remove = iconButton("trash", `Delete “${conversation.title}”`, {
      testid: "delete",
      onClick: async () => {
        const sure = await ask({
          title: "Delete conversation?",
          message: `“${conversation.title}” and its messages will be gone for good. Links you shared keep their snapshot until you revoke them.`,
          confirmLabel: "Delete", danger: true, testid: "delete-dialog",
        });
        if (sure) this.handlers.onDelete(conversation.id);
      },
    });
    const actions = el("span", "item-actions");
    actions.append(rename, remove);
    li.append(link, actions);
    return li;
  }
}
