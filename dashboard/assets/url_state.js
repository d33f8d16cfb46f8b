// Keeps the address bar equal to the page state (replaceState: no reload, no router round trip),
// and carries the chosen runs over to the menu links.
window.dash_clientside = Object.assign({}, window.dash_clientside, {
  moescope: {
    syncUrl: function (search) {
      if (search === undefined || search === null) {
        return window.dash_clientside.no_update;
      }
      if (window.location.search !== search) {
        window.history.replaceState(window.history.state, "", window.location.pathname + search);
      }
      const runs = new URLSearchParams(search).get("runs");
      document.querySelectorAll("a.nav-link").forEach(function (a) {
        const url = new URL(a.href, window.location.href);
        if (runs) { url.searchParams.set("runs", runs); } else { url.searchParams.delete("runs"); }
        a.href = url.pathname + url.search;
      });
      return search;
    }
  }
});
