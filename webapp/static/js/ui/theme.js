// The theme: System (follow prefers-color-scheme, live; the default), Light or Dark, remembered
// in this browser. ../theme.js puts a saved Light or Dark on <html> before the first paint;
// System is the absence of a choice, so the stylesheet's media query decides and follows the
// system as it changes. Two controls set it: the header menu's System / Light / Dark choice and
// the sidebar's quick toggle (flips what is shown now); each shows what the other set.
import { icon } from "./icons.js";

const KEY = "bchat.theme";
const CHOICES = ["system", "light", "dark"];
const systemDark = matchMedia("(prefers-color-scheme: dark)");

export function themeChoice() {
  const theme = document.documentElement.dataset.theme;
  return theme === "light" || theme === "dark" ? theme : "system";
}

const shown = () => (themeChoice() === "system" ? (systemDark.matches ? "dark" : "light") : themeChoice());

export function setTheme(choice) {
  if (!CHOICES.includes(choice)) return;
  try {
    if (choice === "system") localStorage.removeItem(KEY);
    else localStorage.setItem(KEY, choice);
  } catch {
    /* storage refused (private mode): the choice lasts for this page */
  }
  if (choice === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = choice;
  document.dispatchEvent(new CustomEvent("bchat:theme", { detail: { choice } }));
}

// group: an element holding buttons with data-theme-choice (role="radio").
export function initThemeChoice(group) {
  const buttons = [...group.querySelectorAll("[data-theme-choice]")];
  function show() {
    const choice = themeChoice();
    for (const button of buttons) {
      const on = button.dataset.themeChoice === choice;
      button.setAttribute("aria-checked", String(on));
      button.tabIndex = on ? 0 : -1; // one tab stop; arrows move within (a radio group)
    }
  }
  for (const button of buttons) button.addEventListener("click", () => setTheme(button.dataset.themeChoice));
  group.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (!step) return;
    event.preventDefault();
    const next = (CHOICES.indexOf(themeChoice()) + step + CHOICES.length) % CHOICES.length;
    setTheme(CHOICES[next]);
    buttons[next].focus();
  });
  document.addEventListener("bchat:theme", show);
  show();
}

export function initThemeToggle(toggle) {
  function show() {
    const next = shown() === "dark" ? "light" : "dark";
    toggle.replaceChildren(icon(next === "dark" ? "moon" : "sun"));
    toggle.setAttribute("aria-label", `Switch to the ${next} theme`);
    toggle.title = `Switch to the ${next} theme (System, Light or Dark: the ⋯ menu)`;
  }
  toggle.addEventListener("click", () => setTheme(shown() === "dark" ? "light" : "dark"));
  systemDark.addEventListener("change", show);
  document.addEventListener("bchat:theme", show);
  show();
}
