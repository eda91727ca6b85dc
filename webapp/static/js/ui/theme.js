// The theme toggle: light or dark, remembered in this browser. Without a choice the page
// follows prefers-color-scheme (../theme.js puts a saved choice on <html> before first paint).
import { icon } from "./icons.js";

export function initThemeToggle(toggle) {
  const systemDark = matchMedia("(prefers-color-scheme: dark)");
  const current = () => document.documentElement.dataset.theme || (systemDark.matches ? "dark" : "light");

  function show() {
    const next = current() === "dark" ? "light" : "dark";
    toggle.replaceChildren(icon(next === "dark" ? "moon" : "sun"));
    toggle.setAttribute("aria-label", `Switch to the ${next} theme`);
    toggle.title = `Switch to the ${next} theme`;
  }

  toggle.addEventListener("click", () => {
    const theme = current() === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = theme;
    localStorage.setItem("bchat.theme", theme);
    show();
  });
  systemDark.addEventListener("change", show);
  show();
}
