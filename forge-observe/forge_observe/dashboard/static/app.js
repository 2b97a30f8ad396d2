// FORGE dashboard: live regions over Server-Sent Events (closed while the tab is hidden), relative
// times that stay current, theme switch, keyboard shortcuts. No inline script anywhere (CSP).
(function () {
  "use strict";
  var rtf = window.Intl && Intl.RelativeTimeFormat ? new Intl.RelativeTimeFormat(undefined, { numeric: "auto" }) : null;
  function rel(date) {
    var s = (date.getTime() - Date.now()) / 1000, a = Math.abs(s);
    if (a < 5) return "just now";
    var units = [[86400, "day"], [3600, "hour"], [60, "minute"], [1, "second"]];
    for (var i = 0; i < units.length; i++) {
      if (a >= units[i][0]) {
        var n = Math.round(s / units[i][0]);
        return rtf ? rtf.format(n, units[i][1]) : (Math.abs(n) + " " + units[i][1] + "s" + (n < 0 ? " ago" : ""));
      }
    }
    return "just now";
  }
  function refreshTimes(root) {
    (root || document).querySelectorAll("time[data-rel]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) t.textContent = rel(d);
    });
  }

  // theme: auto -> dark -> light
  var root = document.documentElement;
  var saved = localStorage.getItem("forge-theme");
  if (saved) root.setAttribute("data-theme", saved);

  var source = null, live = null, dot = null;
  function keepKey(field) {
    var form = field.closest("form");
    return (form ? form.getAttribute("data-form") || "" : "") + "|" + field.name;
  }
  // a log list merges the lines a fragment brings (the live stream reads only the newest ones) into
  // what the page searched, newest first, at most data-merge-lines of them
  function mergeLines(box, html) {
    var list = box.querySelector(".logs"), tmp = document.createElement("div");
    tmp.innerHTML = html;
    if (!list) return;
    var have = {};
    list.querySelectorAll(".line[data-key]").forEach(function (l) { have[l.getAttribute("data-key")] = true; });
    var fresh = Array.prototype.slice.call(tmp.querySelectorAll(".line[data-key]")).reverse();  // oldest first
    var added = 0;
    fresh.forEach(function (l) {
      if (have[l.getAttribute("data-key")]) return;
      var at = l.getAttribute("data-at"), lines = list.querySelectorAll(".line[data-at]"), before = null;
      for (var i = 0; i < lines.length; i++) {
        if (lines[i].getAttribute("data-at") <= at) { before = lines[i]; break; }
      }
      list.insertBefore(l, before);
      added++;
    });
    if (!added) return;
    var empty = list.querySelector(".empty");
    if (empty) empty.remove();
    var all = list.querySelectorAll(".line"), max = parseInt(box.getAttribute("data-merge-lines"), 10) || 200;
    for (var j = max; j < all.length; j++) all[j].remove();
  }
  function connect() {
    if (!live || source || document.hidden) return;
    source = new EventSource(live.getAttribute("data-live-url"));
    source.addEventListener("update", function (e) {
      var focused = document.activeElement && live.contains(document.activeElement) ? document.activeElement : null;
      var key = focused && (focused.hasAttribute("data-keep") ? "keep|" + keepKey(focused)
        : focused.getAttribute("data-action") + "|" + (focused.getAttribute("hx-vals") || ""));
      // what an operator typed into an action's form (an event payload) survives the swap
      var kept = {};
      live.querySelectorAll("[data-keep]").forEach(function (f) { kept[keepKey(f)] = f.value; });
      var merge = live.querySelector("[data-merge-lines]");
      if (merge) mergeLines(merge, e.data); else live.innerHTML = e.data;
      if (window.htmx) htmx.process(live);
      refreshTimes(live);
      live.querySelectorAll("[data-keep]").forEach(function (f) {
        var k = keepKey(f);
        if (!(k in kept)) return;
        f.value = kept[k];
        if (f.tagName === "SELECT" && f.selectedIndex < 0) f.selectedIndex = 0;
      });
      if (key) {  // keep keyboard focus on the same control after the swap
        var again = Array.prototype.find.call(live.querySelectorAll("[data-action], [data-keep]"), function (b) {
          return (b.hasAttribute("data-keep") ? "keep|" + keepKey(b)
            : b.getAttribute("data-action") + "|" + (b.getAttribute("hx-vals") || "")) === key;
        });
        if (again) again.focus();
      }
      live.dispatchEvent(new CustomEvent("forge:updated", { bubbles: true }));
    });
    source.onopen = function () { if (dot) { dot.hidden = false; dot.classList.remove("paused"); dot.textContent = "live"; } };
    source.onerror = function () { if (dot) { dot.classList.add("paused"); dot.textContent = "reconnecting"; } };
  }
  function disconnect() {
    if (source) { source.close(); source = null; }
    if (dot) { dot.classList.add("paused"); dot.textContent = "paused"; }
  }

  document.addEventListener("DOMContentLoaded", function () {
    refreshTimes();
    setInterval(refreshTimes, 5000);
    var theme = document.getElementById("theme");
    if (theme) theme.addEventListener("click", function () {
      var cur = root.getAttribute("data-theme");
      var dark = cur ? cur === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
      var next = dark ? "light" : "dark";
      root.setAttribute("data-theme", next);
      localStorage.setItem("forge-theme", next);
    });
    live = document.querySelector("#live[data-live-url]");
    dot = document.getElementById("livedot");
    connect();
    // no stream while nobody looks: the node's snapshot skips views nobody watches
    document.addEventListener("visibilitychange", function () { document.hidden ? disconnect() : connect(); });
    document.addEventListener("keydown", function (e) {
      if (e.key === "/" && !/INPUT|SELECT|TEXTAREA/.test(document.activeElement.tagName)) {
        var search = document.querySelector("[data-search]");
        if (search) { e.preventDefault(); search.focus(); }
      }
      if (e.key === "Escape") { var c = document.querySelector(".confirm"); if (c) c.remove(); }
    });
    document.addEventListener("click", function (e) {
      var t = e.target.closest("[data-dismiss]");
      if (t) { var c = t.closest(".confirm"); if (c) c.remove(); }
    });
    // a toast fades after a while; a confirmed bulk action closes its dialog
    document.body.addEventListener("htmx:afterSwap", function (e) {
      if (e.detail.target.id === "toast") {
        var c = document.querySelector(".confirm"); if (c && e.detail.requestConfig && e.detail.requestConfig.path.indexOf("/bulk/") >= 0) c.remove();
        var toast = e.detail.target.firstElementChild;
        setTimeout(function () { if (toast && toast.parentNode) toast.remove(); }, 8000);
      }
    });
  });
})();
