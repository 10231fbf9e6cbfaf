/* mtpeft-bench leaderboard page: sortable tables, filters, plots and detail rows.
 * Data: window.LEADERBOARD_DATA (data.js, written by leaderboard/html.py). Text reaches the page through
 * textContent only, never innerHTML, so no string from a result file can become markup. */
(function () {
  "use strict";
  var DATA = window.LEADERBOARD_DATA;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits, sign) {
    if (v === null || v === undefined) return "–";
    var s = v.toFixed(digits);
    return sign && v >= 0 ? "+" + s : s;
  }
  function half(row, key) {
    if (!row.ci || !row.ci[key] || row.ci[key][0] === null) return null;
    return (row.ci[key][1] - row.ci[key][0]) / 2;
  }
  function valueText(row, key, sign, digits) {
    // digits: the task's decimals as LEADERBOARD.md prints them (tables.task_decimals); 2 for Δm
    var v = row.values[key], h = half(row, key), d = digits === undefined ? 2 : digits;
    if (v === null) return "–";
    return h === null ? fmt(v, d, sign) : fmt(v, d, sign) + " ± " + h.toFixed(d);
  }
  function paramsText(row) { return row.params_text; }  // as LEADERBOARD.md prints it

  function columns(section) {
    var cols = [
      { key: "rank", header: "#", num: true, value: function (r, i) { return i + 1; }, text: function (r, i) { return String(i + 1); } },
      { key: "method", header: "Method", value: function (r) { return r.label; }, text: function (r) { return r.label; } },
      { key: "config", header: "Config", value: function (r) { return r.config_text; }, text: function (r) { return r.config_text; } },
      { key: "source", header: "Source", value: function (r) { return r.source; }, text: function (r) { return r.source; }, flags: true },
    ];
    section.tasks.forEach(function (t) {
      cols.push({ key: t.name, header: t.header, num: true,
        value: function (r) { return r.values[t.name]; }, text: function (r) { return valueText(r, t.name, false, t.decimals); } });
    });
    cols.push({ key: "delta_m", header: "Δm % ↑", num: true,
      value: function (r) { return r.values.delta_m; }, text: function (r) { return valueText(r, "delta_m", true); } });
    cols.push({ key: "delta_m_printed", header: "Δm printed", num: true,
      value: function (r) { return r.delta_m_printed; }, text: function (r) { return fmt(r.delta_m_printed, 2, true); } });
    cols.push({ key: "params_m", header: "Trainable (M) ↓", num: true,
      value: function (r) { return r.params_sort; }, text: paramsText });
    cols.push({ key: "encoder_m", header: "Encoder-side (M) ↓", num: true,
      value: function (r) { return r.encoder_m; },
      text: function (r) { return r.encoder_text; } });
    cols.push({ key: "n_seeds", header: "Seeds", num: true,
      value: function (r) { return r.kind === "reproduced" ? r.n_seeds : null; },
      text: function (r) { return r.kind === "reproduced" ? r.n_seeds + " (" + r.seeds + ")" : "–"; } });
    cols.push({ key: "selection", header: "Selection", value: function (r) { return r.selection; }, text: function (r) { return r.selection || "–"; } });
    cols.push({ key: "img_s", header: "Train img/s ↑", num: true,
      value: function (r) { return r.img_s; }, text: function (r) { return fmt(r.img_s, 1); } });
    cols.push({ key: "mem_gib", header: "Peak mem (GiB) ↓", num: true,
      value: function (r) { return r.mem_gib; }, text: function (r) { return fmt(r.mem_gib, 2); } });
    return cols;
  }

  function detailContent(section, row) {
    var box = el("div", { "class": "detail" });
    var dl = el("dl");
    function item(term, value, pre) {
      dl.appendChild(el("dt", null, term));
      var dd = el("dd");
      if (pre) dd.appendChild(el("pre", null, value)); else dd.textContent = value;
      dl.appendChild(dd);
      return dd;
    }
    item("Method", row.method + (row.id ? " (" + row.id + ")" : ""));
    item("Config", JSON.stringify(row.config), true);
    item("Interval", row.ci_method);
    if (row.ci) {
      var parts = [];
      section.tasks.concat([{ name: "delta_m", header: "Δm %" }]).forEach(function (t) {
        var c = row.ci[t.name];
        var d = (t.decimals || 2) + 1;  // one decimal more than the table
        parts.push(t.header + ": " + fmt(row.values[t.name], d) + " [" + fmt(c[0], d) + ", " + fmt(c[1], d) + "]");
      });
      item("95% intervals", parts.join("\n"), true);
    }
    if (row.kind === "reproduced") {
      item("Seeds", row.seeds + " (" + row.n_seeds + " run(s)), preset " + row.preset + ", selection " + row.selection);
      row.runs.forEach(function (run) {
        item("Reproduce", run.command, true);
        var env = run.env || {};
        var prov = Object.keys(env).sort().map(function (k) { return k + ": " + env[k]; });
        item("Provenance", prov.length ? prov.join("\n") : "(none recorded)", true);
        var dd = item("Result", "");
        var a = el("a", { href: run.file, "class": "result-link" }, run.run_id + ".json");
        dd.appendChild(a);
        if (!run.per_image) dd.appendChild(document.createTextNode(" (no per-image statistics)"));
      });
    } else {
      item("Source", row.source + (row.verified ? " (verified)" : " (unverified secondary quote)"));
    }
    row.flags.forEach(function (f) { item("Flag " + f.mark, f.note); });
    if (row.notes) item("Notes", row.notes);
    box.appendChild(dl);
    return box;
  }

  function pareto(points) {
    // indices on the front: best Δm at <= parameters (ties: fewer parameters win), by increasing x
    var order = points.map(function (p, i) { return i; });
    order.sort(function (a, b) { return points[a].x - points[b].x || points[b].y - points[a].y || a - b; });
    var front = [], best = -Infinity;
    order.forEach(function (i) { if (points[i].y > best) { front.push(i); best = points[i].y; } });
    return front;
  }

  function hover(section, row) {
    var lines = [row.label + " " + row.config_text, "source: " + row.source];
    section.tasks.forEach(function (t) { lines.push(t.header + ": " + valueText(row, t.name, false, t.decimals)); });
    lines.push("Δm: " + valueText(row, "delta_m", true) + " %");
    lines.push("trainable: " + paramsText(row) + " M");
    return lines.join("<br>").replace(/</g, "&lt;").replace(/&lt;br>/g, "<br>");
  }

  var PLOTS = {
    params: { key: "params_m", title: "Δm vs trainable parameters", axis: "trainable parameters (M, log)", log: true, front: true },
    img_s: { key: "img_s", title: "Δm vs training throughput", axis: "train images / s", log: false, front: false },
    mem_gib: { key: "mem_gib", title: "Δm vs peak training memory", axis: "peak memory (GiB)", log: false, front: false },
  };

  function drawPlot(div, section, rows, spec) {
    var any = section.rows.some(function (r) { return r[spec.key] !== null && r[spec.key] > 0; });
    if (!any) { div.classList.add("empty"); return; }
    var pts = rows.filter(function (r) { return r[spec.key] !== null && r[spec.key] > 0 && r.values.delta_m !== null; });
    var xy = pts.map(function (r) { return { x: r[spec.key], y: r.values.delta_m }; });
    var traces = [{
      type: "scatter", mode: "markers", name: "rows",
      x: xy.map(function (p) { return p.x; }), y: xy.map(function (p) { return p.y; }),
      hovertext: pts.map(function (r) { return hover(section, r); }), hoverinfo: "text",
      marker: { size: 9, color: pts.map(function (r) { return r.kind === "reproduced" ? "#d62728" : "#1f77b4"; }),
        symbol: pts.map(function (r) { return r.kind === "reproduced" ? "diamond" : "circle"; }) },
      error_y: { type: "data", symmetric: false, visible: true,
        array: pts.map(function (r) { return r.ci ? r.ci.delta_m[1] - r.values.delta_m : 0; }),
        arrayminus: pts.map(function (r) { return r.ci ? r.values.delta_m - r.ci.delta_m[0] : 0; }) },
    }];
    if (spec.front) {
      var f = pareto(xy);
      traces.push({ type: "scatter", mode: "lines", name: "Pareto front", hoverinfo: "skip",
        x: f.map(function (i) { return xy[i].x; }), y: f.map(function (i) { return xy[i].y; }),
        line: { shape: "hv", dash: "dash", color: "#555" } });
    }
    var layout = { title: { text: spec.title }, margin: { l: 60, r: 20, t: 40, b: 50 }, showlegend: false,
      xaxis: { title: { text: spec.axis }, type: spec.log ? "log" : "linear" }, yaxis: { title: { text: "Δm (%)" } } };
    window.Plotly.react(div, traces, layout, { displayModeBar: false, responsive: false });
  }

  function setupSection(node, section) {
    var state = { sortKey: null, dir: 1, filters: {} };
    var cols = columns(section);
    var thead = node.querySelector("table.board thead"), tbody = node.querySelector("table.board tbody");
    var hr = el("tr");
    cols.forEach(function (c) {
      var th = el("th", { "data-key": c.key }, c.header);
      th.appendChild(el("span", { "class": "arrow" }, ""));
      th.addEventListener("click", function () {
        state.dir = state.sortKey === c.key ? -state.dir : (c.num ? -1 : 1);
        state.sortKey = c.key;
        render();
      });
      hr.appendChild(th);
    });
    thead.appendChild(hr);
    // each row keeps its rank (the Δm order of LEADERBOARD.md) whatever the sort
    var items = section.rows.map(function (r, i) { return { row: r, rank: i, open: false }; });

    function visible(r) {
      return Object.keys(state.filters).every(function (f) { return !state.filters[f] || String(r[f]) === state.filters[f]; });
    }
    function sortValue(c, it) { return c.key === "rank" ? it.rank : c.value(it.row, it.rank); }
    function render() {
      var ordered = items.slice();
      if (state.sortKey) {
        var c = cols.filter(function (x) { return x.key === state.sortKey; })[0];
        ordered.sort(function (a, b) {
          var va = sortValue(c, a), vb = sortValue(c, b);
          var na = va === null || va === undefined || va === "", nb = vb === null || vb === undefined || vb === "";
          if (na || nb) return na === nb ? a.rank - b.rank : (na ? 1 : -1); // missing values last, both ways
          var d = c.num ? va - vb : String(va).localeCompare(String(vb));
          return d !== 0 ? state.dir * d : a.rank - b.rank;
        });
      }
      thead.querySelectorAll("th").forEach(function (th) {
        th.querySelector(".arrow").textContent = th.getAttribute("data-key") === state.sortKey ? (state.dir > 0 ? "▲" : "▼") : "";
      });
      while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
      ordered.forEach(function (it) {
        var r = it.row;
        var tr = el("tr", { "class": "row " + r.kind, "data-rank": String(it.rank + 1), "data-kind": r.kind });
        if (!visible(r)) tr.style.display = "none";
        cols.forEach(function (c) {
          var td = el("td", { "class": (c.num ? "num " : "") + c.key, "data-key": c.key }, c.text(r, it.rank));
          if (c.flags) r.flags.forEach(function (f) { td.appendChild(el("span", { "class": "flag " + f.kind, title: f.note }, f.mark)); });
          tr.appendChild(td);
        });
        tr.addEventListener("click", function () { it.open = !it.open; render(); });
        tbody.appendChild(tr);
        if (it.open && visible(r)) {
          var dr = el("tr", { "class": "detail" }), td = el("td", { colspan: String(cols.length) });
          td.appendChild(detailContent(section, r));
          dr.appendChild(td);
          tbody.appendChild(dr);
        }
      });
      var shown = items.filter(function (it) { return visible(it.row); }).map(function (it) { return it.row; });
      node.querySelectorAll(".plot").forEach(function (div) { drawPlot(div, section, shown, PLOTS[div.getAttribute("data-plot")]); });
    }
    node.querySelectorAll("select[data-filter]").forEach(function (sel) {
      sel.addEventListener("change", function () { state.filters[sel.getAttribute("data-filter")] = sel.value; render(); });
    });
    render();
  }

  DATA.sections.forEach(function (s) {
    var node = document.querySelector('section[data-section="' + s.id + '"]');
    if (node) setupSection(node, s);
  });
  document.body.setAttribute("data-ready", "1");
})();
