// Sharing and files for the open conversation: the share box (link, copy, update, new link,
// stop), export links, the list of shared links (revocable even after the conversation is
// deleted) and importing an exported file.
import { api } from "../api.js";
import { state } from "../state.js";
import { copyWithFeedback, icon, iconButton } from "./icons.js";
import { el } from "./panel.js";

export class Sharing {
  constructor(root, { onError, onChanged, onImported }) {
    const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);
    this.actions = root.querySelector(".conversation-actions");
    this.box = $("share-box");
    this.url = $("share-url");
    this.exportJson = $("export-json");
    this.exportMd = $("export-md");
    this.list = $("share-list");
    this.listHeading = root.querySelector(".shares-heading");
    this.handlers = { onError, onChanged, onImported };
    this.conversationId = null;

    $("share").addEventListener("click", () => this.run(() => this.share(false)));
    $("refresh-share").addEventListener("click", () => this.run(() => this.share(false)));
    $("new-share-link").addEventListener("click", () => this.run(() => this.share(true)));
    $("unshare").addEventListener("click", () => this.run(() => this.unshare()));
    this.shareButton = $("share");
    $("copy-share").addEventListener("click", async (event) => {
      this.url.select();
      await copyWithFeedback(event.currentTarget, this.url.value);
    });
    $("import").addEventListener("change", (event) => this.run(() => this.importFile(event.target)));
  }

  async run(action) {
    try {
      await action();
    } catch (err) {
      this.handlers.onError(err.message);
    }
  }

  open(conversationId) {
    this.conversationId = conversationId;
    this.actions.hidden = !conversationId;
    this.box.hidden = true;
    if (conversationId) {
      this.exportJson.href = api.exportUrl(conversationId, "json");
      this.exportMd.href = api.exportUrl(conversationId, "markdown");
      this.showShared(state.conversations.some((c) => c.id === conversationId && c.shared));
    }
  }

  showShared(shared) {
    this.shareButton.replaceChildren(icon("link", { size: 16 }), el("span", "button-label", shared ? "Shared" : "Share"));
    this.shareButton.dataset.shared = String(shared);
  }

  async share(newLink) {
    const share = await api.share(this.conversationId, newLink);
    this.url.value = share.url;
    this.box.hidden = false;
    this.showShared(true);
    await this.handlers.onChanged();
  }

  async unshare() {
    await api.unshare(this.conversationId);
    this.box.hidden = true;
    this.showShared(false);
    await this.handlers.onChanged();
  }

  async refreshList() {
    const { shares } = await api.shares();
    this.listHeading.hidden = shares.length === 0;
    this.list.replaceChildren(...shares.map((share) => {
      const li = el("li", "", null, { testid: "share-item" });
      const link = el("a", "", null, { href: share.url, target: "_blank", rel: "noopener noreferrer" });
      link.append(icon("link", { size: 14 }),
        el("span", "conversation-title", share.conversation_exists ? share.title : `${share.title} (deleted chat)`));
      const revoke = iconButton("x", `Revoke the link to “${share.title}”`, {
        testid: "revoke",
        onClick: () => this.run(async () => {
          await api.revokeShare(share.id);
          if (share.conversation_id === this.conversationId) this.box.hidden = true;
          await this.handlers.onChanged();
        }),
      });
      const actions = el("span", "item-actions");
      actions.append(revoke);
      li.append(link, actions);
      return li;
    }));
  }

  async importFile(input) {
    const file = input.files?.[0];
    input.value = "";
    if (!file) return;
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch {
      throw new Error(`${file.name} is not a JSON file`);
    }
    const conversation = await api.importConversation(data);
    await this.handlers.onImported(conversation.id);
  }
}
