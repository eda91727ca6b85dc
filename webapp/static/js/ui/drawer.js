// The sidebar: a column on a desktop (collapsible, remembered), a drawer over the page on a
// phone. Returns what the shortcuts and the conversation views need of it.
export function initDrawer(root) {
  const $ = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  const phone = matchMedia("(max-width: 760px)");
  const toggle = $("sidebar-toggle");
  const scrim = $("scrim");
  const main = root.querySelector("main.chat");

  function setDrawer(open, { focus = true } = {}) {
    root.dataset.drawer = open ? "open" : "closed";
    scrim.hidden = !open;
    // While the drawer covers the page, Tab and screen readers stay in it.
    main.inert = open;
    toggle.setAttribute("aria-expanded", String(open));
    if (open && focus) $("new-chat").focus();
    else if (!open && focus && root.querySelector(".sidebar").contains(document.activeElement)) toggle.focus();
  }

  // The desktop column: "open" or "collapsed".
  function setSidebar(sidebar) {
    root.dataset.sidebar = sidebar;
    toggle.setAttribute("aria-expanded", String(sidebar !== "collapsed"));
  }

  toggle.addEventListener("click", () => {
    if (phone.matches) {
      setDrawer(root.dataset.drawer !== "open");
    } else {
      setSidebar(root.dataset.sidebar !== "collapsed" ? "collapsed" : "open");
      localStorage.setItem("bchat.sidebar", root.dataset.sidebar);
    }
  });
  $("sidebar-close").addEventListener("click", () => setDrawer(false));
  scrim.addEventListener("click", () => setDrawer(false));

  function layoutChanged() {
    setDrawer(false, { focus: false });
    if (!phone.matches) setSidebar(localStorage.getItem("bchat.sidebar") === "collapsed" ? "collapsed" : "open");
  }
  phone.addEventListener("change", layoutChanged);
  layoutChanged();

  return {
    phone,
    get open() {
      return root.dataset.drawer === "open";
    },
    close: ({ focus = true } = {}) => setDrawer(false, { focus }),
    closeOnPhone: () => {
      if (root.dataset.drawer === "open") setDrawer(false, { focus: false });
    },
    // The conversation list in view: the drawer on a phone, the column uncollapsed on a desktop.
    reveal: () => {
      if (phone.matches) setDrawer(true, { focus: false });
      else if (root.dataset.sidebar === "collapsed") toggle.click();
    },
  };
}
