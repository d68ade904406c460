// The moderation inbox's keyboard: j/k move the selection, a accepts, r rejects the
// selected action (the row's own htmx forms do the request). No inline script: the
// console's Content-Security-Policy allows scripts from /static only.
(function () {
  "use strict";
  var current = 0;

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll("#inbox tbody tr[data-action]"));
  }

  function select(index) {
    var list = rows();
    if (!list.length) { return; }
    current = Math.max(0, Math.min(index, list.length - 1));
    list.forEach(function (row, i) {
      row.classList.toggle("current", i === current);
      row.setAttribute("aria-selected", i === current ? "true" : "false");
    });
    list[current].scrollIntoView({ block: "nearest" });
  }

  function press(key) {
    var row = rows()[current];
    var button = row && row.querySelector('button[data-key="' + key + '"]');
    if (!button || button.form.dataset.sent) { return; }
    button.form.dataset.sent = "1"; // one press, one request
    button.form.requestSubmit(button);
    select(current + 1); // on to the next action while this one is decided
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) { return; }
    if (event.key === "j") { select(current + 1); }
    else if (event.key === "k") { select(current - 1); }
    else if (event.key === "a" || event.key === "r") { press(event.key); }
    else { return; }
    event.preventDefault();
  });

  // A decision someone else made first answers 409 (a missing action 404): show it in
  // the row like any other outcome instead of htmx's default of not swapping errors.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var status = event.detail.xhr.status;
    if (status === 409 || status === 404) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // Each decision's answer carries the fresh waiting count (HX-Trigger): everyone's
  // decisions, not only this page's.
  document.addEventListener("moderationWaiting", function (event) {
    var total = document.getElementById("waiting-total");
    if (total && typeof event.detail.value === "number") { total.textContent = String(event.detail.value); }
  });

  document.addEventListener("DOMContentLoaded", function () { select(0); });
})();
