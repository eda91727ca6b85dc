// The error banner: it says what went wrong until its cause is gone (the socket is back,
// another conversation is opened, the next message is sent) or the reader dismisses it.
// It may offer Retry, or the server engine when the browser's could not run the model.
export function initBanner(root, { onUseServer }) {
  const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  const box = $("error");
  let retryAction = null;

  function show(message, { offerServer = false, cause = "", retry = null } = {}) {
    $("error-text").textContent = message;
    $("use-server").hidden = !offerServer;
    retryAction = retry;
    $("retry").hidden = !retry;
    box.hidden = !message;
    box.dataset.cause = cause;
  }

  $("dismiss-error").addEventListener("click", () => show(""));
  $("retry").addEventListener("click", () => {
    const retry = retryAction;
    show("");
    retry?.();
  });
  $("use-server").addEventListener("click", () => {
    show("");
    onUseServer();
  });

  return {
    show,
    // what the banner on screen is about ("" when none is shown)
    get cause() {
      return box.hidden ? "" : box.dataset.cause;
    },
    clear(cause) {
      if (!box.hidden && (!cause || box.dataset.cause === cause)) show("");
    },
  };
}
