/* The dashboard's charts: the last hour from /dashboard/history, drawn with uPlot and
   redrawn every few seconds without reloading the page. No inline script (the CSP). */
(function () {
  "use strict";
  var root = document.getElementById("charts");
  if (!root || typeof uPlot === "undefined") { return; }
  var every = Math.max(1, Number(root.dataset.every) || 5) * 1000;
  var palette = ["#0b5cad", "#2e7d32", "#8a5a00", "#b3261e", "#6a1b9a", "#00838f"];
  var charts = {};

  function width(figure) { return Math.max(300, figure.clientWidth - 16); }

  function specs(h) {
    var lagNames = Object.keys(h.lag).sort();
    return [
      { id: "chart-rate", names: ["msg/s"], values: [h.rate] },
      { id: "chart-outcomes", names: ["acked", "retried", "parked"],
        values: [h.acked, h.retried, h.parked], colors: [palette[1], palette[2], palette[3]] },
      { id: "chart-depth", names: ["ready"], values: [h.depth] },
      { id: "chart-lag", names: lagNames, values: lagNames.map(function (n) { return h.lag[n]; }) }
    ];
  }

  function draw(h) {
    specs(h).forEach(function (spec) {
      var figure = document.getElementById(spec.id);
      if (!figure) { return; }
      var data = [h.t].concat(spec.values);
      var key = spec.names.join("\u0000");
      var chart = charts[spec.id];
      if (chart && chart.key === key) { chart.plot.setData(data); return; }
      if (chart) { chart.plot.destroy(); }
      var old = figure.querySelector(".empty");
      if (old) { figure.removeChild(old); }
      if (!spec.names.length) {
        var note = document.createElement("p");
        note.className = "empty";
        note.textContent = "no destination has pushed from this CRM yet";
        figure.appendChild(note);
        delete charts[spec.id];
        return;
      }
      var series = [{}].concat(spec.names.map(function (name, i) {
        var color = (spec.colors || palette)[i % palette.length];
        return { label: name, stroke: color, width: 2, spanGaps: false };
      }));
      var opts = {
        width: width(figure), height: 180, series: series,
        scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(1, max * 1.1)]; } } },
        axes: [{}, { size: 56 }],
        legend: { show: true }
      };
      charts[spec.id] = { key: key, plot: new uPlot(opts, data, figure) };
    });
    root.dataset.points = String(h.t.length);
    root.dataset.draws = String(Number(root.dataset.draws || 0) + 1);
  }

  function load() {
    fetch(root.dataset.source, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (reply) {
        var type = reply.headers.get("content-type") || "";
        return reply.ok && type.indexOf("application/json") === 0 ? reply.json() : null;
      })
      .then(function (h) { if (h) { draw(h); } })
      .catch(function () { /* the next tick tries again */ });
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      var figure = document.getElementById(id);
      charts[id].plot.setSize({ width: width(figure), height: 180 });
    });
  });
  load();
  window.setInterval(load, every);
}());
