/* referral-watch console: live countdowns and the search box. Plain JavaScript, no build. */
(function () {
  "use strict";
  var expired = document.body.getAttribute("data-expired") || "expired";
  // Count from the server's clock, not this device's (which may be off by minutes).
  var serverNow = Date.parse(document.body.getAttribute("data-now") || "");
  var offset = isNaN(serverNow) ? 0 : serverNow - Date.now();

  function pad(n) { return n < 10 ? "0" + n : String(n); }

  function format(ms) {
    var past = ms < 0;
    var s = Math.floor(Math.abs(ms) / 1000);
    var d = Math.floor(s / 86400); s -= d * 86400;
    var h = Math.floor(s / 3600); s -= h * 3600;
    var m = Math.floor(s / 60); s -= m * 60;
    var text = (d ? d + "d " : "") + pad(h) + ":" + pad(m) + ":" + pad(s);
    return past ? expired + " −" + text : text;
  }

  var clocks = Array.prototype.slice.call(document.querySelectorAll("[data-deadline]"));
  function tick() {
    var now = Date.now() + offset;
    clocks.forEach(function (el) {
      var left = Date.parse(el.getAttribute("data-deadline")) - now;
      el.textContent = format(left);
      if (left < 0) { el.classList.add("past"); }
    });
  }
  if (clocks.length) { tick(); window.setInterval(tick, 1000); }

  var box = document.getElementById("q");
  var table = document.getElementById("waiting");
  if (box && table) {
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var count = document.getElementById("count");
    var none = document.getElementById("no-match");
    var total = count ? count.textContent : "";
    box.addEventListener("input", function () {
      var words = box.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      rows.forEach(function (row) {
        var text = row.getAttribute("data-search") || "";
        var hit = words.every(function (w) { return text.indexOf(w) >= 0; });
        row.hidden = !hit;
        if (hit) { shown += 1; }
      });
      if (count) { count.textContent = words.length ? shown + " / " + total : total; }
      if (none) { none.hidden = shown > 0; }
    });
  }
})();
