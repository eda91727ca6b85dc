// Sharing and files for the open conversation: the share box (link, copy, update, new link,
// stop), export links, the list of shared links (revocable even after the conversation is
// deleted) and importing an exported file.
import { api } from "../api.js";

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
    $("copy-share").addEventListener("click", async () => {
      this.url.select();
      await navigator.clipboard?.writeText(this.url.value).catch(() => {});
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

  open(conversationId, { shared = false } = {}) {
    this.conversationId = conversationId;
    this.actions.hidden = !conversationId;
    this.box.hidden = true;
    if (conversationId) {
      this.exportJson.href = api.exportUrl(conversationId, "json");
      this.exportMd.href = api.exportUrl(conversationId, "markdown");
      this.actions.querySelector('[data-testid="share"]').textContent = shared ? "Shared 🔗" : "Share";
    }
  }

  async share(newLink) {
    const share = await api.share(this.conversationId, newLink);
    this.url.value = share.url;
    this.box.hidden = false;
    this.actions.querySelector('[data-testid="share"]').textContent = "Shared 🔗";
    await this.handlers.onChanged();
  }

  async unshare() {
    await api.unshare(this.conversationId);
    this.box.hidden = true;
    this.actions.querySelector('[data-testid="share"]').textContent = "Share";
    await this.handlers.onChanged();
  }

  async refreshList() {
    const { shares } = await api.shares();
    this.listHeading.hidden = shares.length === 0;
    this.list.replaceChildren(...shares.map((share) => {
      const li = document.createElement("li");
      li.dataset.testid = "share-item";
      const link = document.createElement("a");
      link.href = share.url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      link.textContent = share.conversation_exists ? share.title : `${share.title} (deleted chat)`;
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.textContent = "✕";
      revoke.title = "Revoke this link";
      revoke.dataset.testid = "revoke";
      revoke.addEventListener("click", () => this.run(async () => {
        await api.revokeShare(share.id);
        if (share.conversation_id === this.conversationId) this.box.hidden = true;
        await this.handlers.onChanged();
      }));
      li.append(link, revoke);
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
