// Loaded before the stylesheet (a classic, blocking script: the CSP allows no inline one) so a
// theme the visitor chose is on <html> before the first paint. Without a choice ("System", the
// default) the page follows prefers-color-scheme in CSS, live. ui/theme.js owns the controls.
(() => {
  try {
    const theme = localStorage.getItem("bchat.theme");
    if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  } catch {
    /* storage refused (private mode): follow the system */
  }
})();
