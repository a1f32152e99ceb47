// Quiver's web UI: a few pages over quiverd's /api (server/src/ui.rs). Plain JavaScript, no
// build step. Every value from the server enters the page as text (textContent), never as HTML.
"use strict";

const STATUS_NAMES = ["present", "not_found", "stale", "defaulted", "unavailable"];
// SVG presentation attributes take colours, not CSS variables.
const COLORS = {
  present: "#2f9e62",
  not_found: "#9aa3b5",
  stale: "#d69e2e",
  defaulted: "#805ad5",
  unavailable: "#c23a2b",
  baseline: "#9aa3b5",
  served: "#2f5bd3",
  ingested: "#d69e2e",
};
const TOKEN_KEY = "quiver.token";
let node = null; // /api/node
let refreshTimer = null;

// ---- DOM helpers ----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function table(headers, rows, opts) {
  const numeric = (opts && opts.numeric) || [];
  return h(
    "table",
    opts && opts.id ? { id: opts.id } : {},
    h("thead", {}, h("tr", {}, headers.map((t, i) => h("th", { class: numeric.includes(i) ? "num" : null }, t)))),
    h(
      "tbody",
      {},
      rows.length
        ? rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: numeric.includes(i) ? "num" : null }, c))))
        : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "None."))
    )
  );
}

function badge(text, kind) {
  return h("span", { class: "badge " + (kind || "") }, text);
}

// ---- Formatting -----------------------------------------------------------------------------

function fmtInt(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US");
}

function fmtNum(x, digits) {
  if (x === null || x === undefined) return "—";
  return Number(x).toFixed(digits === undefined ? 3 : digits);
}

function fmtDuration(sec) {
  if (sec === null || sec === undefined) return "—";
  const a = Math.abs(sec);
  const sign = sec < 0 ? "-" : "";
  if (a < 1) return sign + (a * 1000).toFixed(0) + " ms";
  if (a < 120) return sign + a.toFixed(1) + " s";
  if (a < 7200) return sign + (a / 60).toFixed(1) + " min";
  if (a < 172800) return sign + (a / 3600).toFixed(1) + " h";
  return sign + (a / 86400).toFixed(1) + " d";
}

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function fmtRate(x) {
  if (x === null || x === undefined) return "—";
  return (x * 100).toFixed(1) + " %";
}

// ---- The API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, { headers, cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, body.code || String(r.status), body.message || r.statusText);
  return body;
}

// ---- Charts (SVG) ---------------------------------------------------------------------------

const CW = 420;
const CH = 150;
const PAD = { l: 48, r: 8, t: 8, b: 22 };

function axisLabel(v, unit) {
  if (unit === "s") return fmtDuration(v);
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(2);
}

// A line chart of points [t_ms, value|null]: gaps where the value is null.
function lineChart(title, points, unit, color) {
  const svg = s("svg", { viewBox: `0 0 ${CW} ${CH}`, role: "img", "aria-label": title });
  const vals = points.map((p) => p[1]).filter((v) => v !== null && Number.isFinite(v));
  const box = h("div", { class: "chart" }, h("div", { class: "title" }, title), svg);
  if (points.length === 0 || vals.length === 0) {
    const why = points.length === 0 && title.includes("per second") ? "collecting: a rate needs two samples" : "no data yet";
    svg.appendChild(s("text", { x: CW / 2, y: CH / 2, "text-anchor": "middle" }, why));
    return box;
  }
  const t0 = points[0][0];
  const t1 = Math.max(points[points.length - 1][0], t0 + 1);
  const vmax = Math.max(...vals, 0) || 1;
  const vmin = Math.min(...vals, 0);
  const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * (CW - PAD.l - PAD.r);
  const y = (v) => CH - PAD.b - ((v - vmin) / (vmax - vmin || 1)) * (CH - PAD.t - PAD.b);
  svg.appendChild(s("line", { x1: PAD.l, y1: y(vmin), x2: CW - PAD.r, y2: y(vmin), stroke: "#e2e5ec" }));
  svg.appendChild(s("line", { x1: PAD.l, y1: y(vmax), x2: CW - PAD.r, y2: y(vmax), stroke: "#eef1f6" }));
  svg.appendChild(s("text", { x: PAD.l - 4, y: y(vmax) + 4, "text-anchor": "end" }, axisLabel(vmax, unit)));
  svg.appendChild(s("text", { x: PAD.l - 4, y: y(vmin) + 4, "text-anchor": "end" }, axisLabel(vmin, unit)));
  svg.appendChild(s("text", { x: PAD.l, y: CH - 6 }, new Date(t0).toISOString().slice(11, 19)));
  svg.appendChild(s("text", { x: CW - PAD.r, y: CH - 6, "text-anchor": "end" }, new Date(t1).toISOString().slice(11, 19)));
  let d = "";
  let pen = false;
  for (const [t, v] of points) {
    if (v === null || !Number.isFinite(v)) {
      pen = false;
      continue;
    }
    d += (pen ? "L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
    pen = true;
  }
  svg.appendChild(s("path", { d, fill: "none", stroke: color, "stroke-width": 2 }));
  for (const [t, v] of points) {
    if (v !== null && Number.isFinite(v)) svg.appendChild(s("circle", { cx: x(t), cy: y(v), r: 2.2, fill: color }));
  }
  return box;
}

// Rates between consecutive samples of a counter: [t_ms, per second]. A sample closer than
// half an interval to the one before (the live one, just after a periodic one) is skipped: a
// rate over a few milliseconds says nothing.
function rates(t, counter) {
  const out = [];
  const minGap = (node.sample_interval_ms || 10000) / 2;
  let j = 0;
  for (let i = 1; i < t.length; i++) {
    if (t[i] - t[j] < minGap) continue;
    out.push([t[i], Math.max(0, counter[i] - counter[j]) / ((t[i] - t[j]) / 1000)]);
    j = i;
  }
  return out;
}

// One horizontal bar per row, split by status: rows [[label, counts[5]]].
function statusBars(rows) {
  const rowH = 20;
  const labelW = 160;
  const width = 1000;
  const svg = s("svg", { viewBox: `0 0 ${width} ${rows.length * rowH + 4}`, role: "img", "aria-label": "served statuses" });
  rows.forEach(([label, counts], i) => {
    const total = counts.reduce((a, b) => a + b, 0);
    const y = i * rowH + 2;
    svg.appendChild(s("text", { x: 0, y: y + 14 }, label));
    if (total === 0) {
      svg.appendChild(s("text", { x: labelW, y: y + 14 }, "no answers in the window"));
      return;
    }
    let x = labelW;
    const span = width - labelW - 70;
    counts.forEach((n, k) => {
      if (n === 0) return;
      const w = (n / total) * span;
      const r = s("rect", { x, y, width: Math.max(w, 1), height: rowH - 6, fill: COLORS[STATUS_NAMES[k]] });
      r.appendChild(s("title", {}, `${STATUS_NAMES[k]}: ${fmtInt(n)}`));
      svg.appendChild(r);
      x += w;
    });
    svg.appendChild(s("text", { x: width - 66, y: y + 14 }, fmtInt(total)));
  });
  return svg;
}

function legend(items) {
  return h("div", { class: "legend" }, items.map(([name, color]) => h("span", { style: `--swatch: ${color}` }, name)));
}

// Histograms side by side: for each bucket, one bar per series (shares of that series' total).
function histograms(buckets, series) {
  const width = 640;
  const height = 170;
  const pad = { l: 40, r: 6, t: 8, b: 40 };
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "histograms" });
  const shares = series.map(([, , counts]) => {
    const total = counts.reduce((a, b) => a + b, 0);
    return counts.map((c) => (total > 0 ? c / total : 0));
  });
  const max = Math.max(0.01, ...shares.flat());
  const groupW = (width - pad.l - pad.r) / Math.max(buckets.length, 1);
  const barW = Math.max(2, (groupW - 6) / Math.max(series.length, 1));
  const y = (v) => height - pad.b - (v / max) * (height - pad.t - pad.b);
  svg.appendChild(s("text", { x: pad.l - 4, y: y(max) + 4, "text-anchor": "end" }, (max * 100).toFixed(0) + "%"));
  svg.appendChild(s("line", { x1: pad.l, y1: y(0), x2: width - pad.r, y2: y(0), stroke: "#c9cfdb" }));
  buckets.forEach((label, b) => {
    const gx = pad.l + b * groupW + 3;
    series.forEach(([name, color], k) => {
      const v = shares[k][b] || 0;
      const r = s("rect", { x: gx + k * barW, y: y(v), width: barW - 1, height: Math.max(0, y(0) - y(v)), fill: color });
      r.appendChild(s("title", {}, `${name} ${label}: ${(v * 100).toFixed(1)}%`));
      svg.appendChild(r);
    });
    // About 6 px a character: labels that do not fit keep their lower edge.
    const room = Math.floor(groupW / 6);
    const lower = label.startsWith("[") ? "≥ " + label.slice(1).split(",")[0] : label;
    const fit = label.length <= room ? label : lower.length <= room ? lower : lower.slice(0, Math.max(room - 1, 1)) + "…";
    svg.appendChild(s("text", { x: gx + groupW / 2 - 3, y: height - pad.b + 14, "text-anchor": "middle" }, fit));
  });
  return svg;
}

// ---- Pages ----------------------------------------------------------------------------------

function page(name, ...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children.flat().filter((c) => c));
  main.setAttribute("data-page", name);
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.route === name.split(":")[0]));
}

function freshnessBadge(g) {
  if (g.sla_breached) return badge("SLA breached", "bad");
  if (g.freshness_sla_s !== null && g.freshness_sla_s !== undefined) return badge("within SLA", "ok");
  return badge("no SLA");
}

async function overview(show) {
  const [reg, health] = await Promise.all([api("/api/registry"), api("/api/health")]);
  const hByGroup = Object.fromEntries(health.groups.map((g) => [g.group, g]));
  const slaBad = health.groups.filter((g) => g.sla_breached).length;
  const nullBad = health.groups.flatMap((g) => g.features).filter((f) => f.null_rate_breached).length;
  const driftBad = health.groups.filter((g) => g.drift_breached).length;
  const card = (label, value, id) => h("div", { class: "card", id }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
  const rows = reg.groups.map((g) => {
    const hg = hByGroup[g.name] || {};
    const answers = (hg.features || []).reduce((a, f) => a + f.counts.reduce((x, y) => x + y, 0), 0);
    return [
      h("a", { href: "#/group/" + encodeURIComponent(g.name) }, g.name),
      g.entity_type,
      "v" + g.serving_version,
      fmtInt(g.features.length),
      fmtDuration(hg.freshness_s),
      hg.group ? freshnessBadge(hg) : "—",
      fmtInt(hg.values_written),
      fmtInt(answers),
    ];
  });
  show(
    "overview",
    h("h1", {}, "Overview"),
    h(
      "div",
      { class: "cards" },
      card("Region", node.region, "card-region"),
      card("Up since", fmtTime(node.started_ms).slice(0, 16)),
      card("Entity types", reg.entity_types.length, "card-entity-types"),
      card("Feature groups", reg.groups.length, "card-groups"),
      card("SLA breaches", slaBad),
      card("Null-rate breaches", nullBad),
      card("Drifting groups", driftBad)
    ),
    h("h2", {}, "Feature groups"),
    table(
      ["Group", "Entity type", "Serving", "Features", "Freshness", "SLA", "Values written", `Answers (${fmtDuration(health.window_s)})`],
      rows,
      { id: "groups", numeric: [3, 4, 6, 7] }
    ),
    h("p", { class: "muted" }, `Served-feature log: ${fmtInt(health.log_answers_written)} answers written, ${fmtInt(health.log_answers_dropped)} dropped.`)
  );
}

async function registryPage(show) {
  const reg = await api("/api/registry");
  const types = reg.entity_types.map((e) => [
    h("strong", {}, e.name),
    e.join_keys.map((k) => h("span", { class: "tag" }, `${k.name}: ${k.type}`)),
    e.description,
  ]);
  const groups = reg.groups.map((g) => [
    h("a", { href: "#/group/" + encodeURIComponent(g.name) }, g.name),
    g.versions.map((v) => badge(`v${v.version} ${v.state}`, v.state === "serving" ? "serving" : "")),
    g.entity_type,
    g.owner || "—",
    g.tags.map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)),
    fmtInt(g.features.length),
    g.description,
  ]);
  show(
    "registry",
    h("h1", {}, "Registry"),
    h("h2", {}, "Entity types"),
    table(["Name", "Join keys", "Description"], types, { id: "entity-types" }),
    h("h2", {}, "Feature groups"),
    table(["Group", "Versions", "Entity type", "Owner", "Tags", "Features", "Description"], groups, { id: "feature-groups", numeric: [5] })
  );
}

function groupVersionView(v) {
  const props = [
    ["Version", [`v${v.version} `, badge(v.state.state, v.state.state === "serving" ? "serving" : "")]],
    ["Entity type", v.entity_type],
    ["Owner", v.owner || "—"],
    ["Description", v.description || "—"],
    ["Tags", v.tags.length ? v.tags.map(([k, val]) => h("span", { class: "tag" }, `${k}=${val}`)) : "—"],
    ["Source (lineage)", v.source ? h("code", {}, v.source) : "—"],
    ["Transformation", v.transformation ? h("code", {}, v.transformation) : "—"],
    ["Code hash", v.code_hash ? h("code", {}, v.code_hash) : "—"],
    ["TTL", v.ttl_s ? fmtDuration(v.ttl_s) : "none"],
    ["Freshness SLA", v.freshness_sla_s ? fmtDuration(v.freshness_sla_s) : "none"],
    ["Created", fmtTime(v.created_ms)],
    ["Features", `${v.state.own_features} own, ${v.state.shared_features} shared with earlier versions`],
  ];
  if (v.state.retirement) {
    const r = v.state.retirement;
    props.push(["Retired", `by ${r.by} at ${fmtTime(r.at_ms)}; dropped after ${fmtTime(r.drop_after_ms)} (${r.reason || "no reason"})`]);
  }
  const dl = h("dl", { class: "props" }, props.map(([k, val]) => [h("dt", {}, k), h("dd", {}, val)]));
  const features = v.features.map((f) => [
    h("strong", {}, f.name),
    f.dim ? `${f.type}[${f.dim}]` : f.type,
    f.default === null ? h("span", { class: "muted" }, "none") : h("code", {}, f.default),
    f.max_null_rate === null ? "—" : fmtRate(f.max_null_rate),
    f.max_psi === null ? "default" : fmtNum(f.max_psi, 2),
    f.max_ks === null ? "default" : fmtNum(f.max_ks, 2),
    f.description,
  ]);
  return [
    dl,
    h("h3", {}, "Features"),
    table(["Feature", "Type", "Default", "Max null rate", "Max PSI", "Max KS", "Description"], features, { id: "features" }),
  ];
}

async function groupPage(show, name) {
  const g = await api("/api/group?name=" + encodeURIComponent(name));
  const holder = h("div", { id: "version" });
  const tabs = h("div", { class: "tabs" });
  const showVersion = (v) => {
    holder.replaceChildren(...groupVersionView(v));
    tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("active", b.dataset.version === String(v.version)));
  };
  for (const v of g.versions) {
    tabs.appendChild(h("button", { "data-version": v.version, type: "button", onclick: () => showVersion(v) }, `v${v.version} · ${v.state.state}`));
  }
  const promotions = g.promotions.map((p) => [
    fmtTime(p.at_ms),
    p.kind,
    p.from_version ? `v${p.from_version} → v${p.to_version}` : `v${p.to_version}`,
    p.by || "—",
    p.reason || "—",
    p.forced ? badge("forced", "warn") : "",
  ]);
  show(
    "group",
    h("h1", {}, "Feature group ", h("span", { class: "mono", id: "group-name" }, g.name)),
    h("p", {}, h("a", { href: "#/health" }, "Health"), " · ", h("a", { href: "#/drift/" + encodeURIComponent(g.name) }, "Drift")),
    tabs,
    holder,
    h("h2", {}, "Promotions"),
    table(["When", "Kind", "Versions", "By", "Reason", ""], promotions, { id: "promotions" })
  );
  const serving = g.versions.find((v) => v.version === g.serving_version) || g.versions[g.versions.length - 1];
  if (serving) showVersion(serving);
}

async function healthPage(show) {
  const health = await api("/api/health");
  const sections = health.groups.map((g) => {
    const ser = g.series;
    const fresh = ser.t_ms.map((t, i) => [t, ser.freshness_s[i]]);
    const charts = h(
      "div",
      { class: "charts" },
      lineChart("Freshness (now − newest event time)", fresh, "s", "#2f5bd3"),
      lineChart("Ingest (values written per second)", rates(ser.t_ms, ser.written), "", "#2f9e62"),
      lineChart("Serve (feature values answered per second)", rates(ser.t_ms, ser.served), "", "#805ad5")
    );
    const rows = g.features.map((f) => [f.feature, f.counts]);
    const answered = rows.some(([, c]) => c.some((n) => n > 0));
    const feats = g.features.map((f) => [
      f.feature,
      ...f.counts.map(fmtInt),
      fmtRate(f.null_rate),
      f.max_null_rate === null ? "—" : fmtRate(f.max_null_rate),
      f.null_rate_breached ? badge("breached", "bad") : badge("ok", "ok"),
    ]);
    return h(
      "div",
      { class: "section", "data-group": g.group },
      h("h2", {}, h("a", { href: "#/group/" + encodeURIComponent(g.group) }, g.group), ` v${g.version} `, freshnessBadge(g)),
      h(
        "p",
        { class: "muted" },
        `Newest event ${fmtTime(g.newest_event_ms)} · freshness ${fmtDuration(g.freshness_s)} · SLA ${g.freshness_sla_s ? fmtDuration(g.freshness_sla_s) : "none"} · ${fmtInt(g.values_written)} values written since start`
      ),
      charts,
      h("h3", {}, `Served statuses per feature (last ${fmtDuration(health.window_s)})`),
      answered ? legend(STATUS_NAMES.map((n) => [n, COLORS[n]])) : h("p", { class: "muted" }, "No online answers in the window."),
      answered ? h("div", { class: "bars" }, statusBars(rows)) : null,
      table(["Feature", "Present", "Not found", "Stale", "Defaulted", "Unavailable", "Null rate", "Max", ""], feats, { numeric: [1, 2, 3, 4, 5, 6] })
    );
  });
  show(
    "health",
    h("h1", {}, "Health"),
    h("p", { class: "muted" }, `Sampled every ${fmtDuration(node.sample_interval_ms / 1000)} for the last hour (kept in quiverd's memory), plus now.`),
    sections.length ? sections : h("p", { class: "muted" }, "No feature groups.")
  );
}

async function replicationPage(show) {
  const r = await api("/api/replication");
  const peers = r.peers.map((p) => [
    String(p.region),
    h("code", {}, p.address),
    badge(p.state.replace("PEER_STATE_", "").toLowerCase(), p.state === "PEER_STATE_STREAMING" ? "ok" : "warn"),
    p.caught_up ? badge("yes", "ok") : badge("no", "warn"),
    fmtInt(p.lag_seqnos),
    fmtDuration(p.lag_seconds),
    fmtInt(p.batches_applied),
    fmtInt(p.bootstraps),
    fmtTime(p.last_contact_ms),
    p.last_error || "—",
  ]);
  show(
    "replication",
    h("h1", {}, "Replication"),
    h(
      "div",
      { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, "This region"), h("div", { class: "value" }, r.region)),
      h("div", { class: "card" }, h("div", { class: "label" }, "Last sequence number"), h("div", { class: "value" }, fmtInt(r.last_seqno))),
      h("div", { class: "card" }, h("div", { class: "label" }, "Concurrent versions"), h("div", { class: "value" }, fmtInt(r.conflicts)))
    ),
    r.peers.length === 0 ? h("p", { class: "muted", id: "no-peers" }, "Replication is off: this node has no peers.") : null,
    h("h2", {}, "Peers"),
    table(["Region", "Address", "State", "Caught up", "Lag (seqnos)", "Lag", "Batches", "Bootstraps", "Last contact", "Last error"], peers, {
      id: "peers",
      numeric: [4, 5, 6, 7],
    }),
    h("h2", {}, "Knowledge"),
    // A region's counter is the hybrid-clock stamp (µs) of its newest write this node holds.
    table(["Region", "Newest write known", "Counter"], r.knowledge.map((k) => [String(k.region), fmtTime(k.counter / 1000), h("code", {}, String(k.counter))]), {
      id: "knowledge",
      numeric: [2],
    })
  );
}

async function driftPage(show, group) {
  const reg = await api("/api/registry");
  const select = h(
    "select",
    { id: "drift-group", onchange: (e) => (location.hash = "#/drift/" + encodeURIComponent(e.target.value)) },
    h("option", { value: "" }, "Choose a group…"),
    reg.groups.map((g) => h("option", { value: g.name, selected: g.name === group }, g.name))
  );
  const head = [h("h1", {}, "Drift"), h("p", {}, "Group: ", select)];
  if (!group) {
    show("drift", head, h("p", { class: "muted" }, "Drift compares a group's served and written values with its newest baseline (quiver baseline capture)."));
    return;
  }
  const d = await api("/api/drift?group=" + encodeURIComponent(group));
  if (!d.baseline) {
    show("drift:" + group, head, h("p", { class: "muted", id: "no-baseline" }, `${group} has no baseline: capture one from a training set with quiver baseline capture.`));
    return;
  }
  const byFeature = (src) => Object.fromEntries((d.drift[src] ? d.drift[src].features : []).map((f) => [f.feature, f]));
  const served = byFeature("served");
  const ingested = byFeature("ingested");
  const stat = (f) =>
    f && f.values + f.nulls === 0
      ? h("span", { class: "muted" }, "no values in the window")
      : f
      ? [
          `PSI ${fmtNum(f.psi)} (max ${fmtNum(f.max_psi, 2)}) · JS ${fmtNum(f.js)} · KS ${fmtNum(f.ks)} (max ${fmtNum(f.max_ks, 2)}) · ${fmtInt(f.values)} values, ${fmtInt(f.nulls)} nulls `,
          f.breached ? badge("drifting", "bad") : badge("ok", "ok"),
        ]
      : "not measured";
  const rows = d.baseline.features.map((b) => {
    const sv = served[b.feature];
    const iv = ingested[b.feature];
    const series = [["baseline", COLORS.baseline, b.counts]];
    if (sv) series.push(["served", COLORS.served, sv.counts]);
    if (iv) series.push(["ingested", COLORS.ingested, iv.counts]);
    return h(
      "div",
      { class: "hist-row", "data-feature": b.feature },
      h(
        "div",
        {},
        h("strong", {}, b.feature),
        h("div", { class: "muted" }, `${b.type}, ${fmtInt(b.rows)} baseline rows, ${fmtInt(b.nulls)} null`),
        h("div", {}, h("span", { class: "muted" }, "served: "), stat(sv)),
        h("div", {}, h("span", { class: "muted" }, "ingested: "), stat(iv))
      ),
      b.kind === "none" ? h("p", { class: "muted" }, "no summary") : h("div", { class: "chart" }, histograms(b.buckets, series))
    );
  });
  show(
    "drift:" + group,
    head,
    h(
      "p",
      { class: "muted" },
      `Baseline ${d.baseline.name} (from ${d.baseline.source || "?"}, captured ${fmtTime(d.baseline.captured_ms)}); served values ${fmtTime(d.drift.served.from_ms)} to ${fmtTime(d.drift.served.to_ms)}; written values over the last hour. Bars are shares of each side's values (nulls apart).`
    ),
    legend([
      ["baseline", COLORS.baseline],
      ["served", COLORS.served],
      ["ingested", COLORS.ingested],
    ]),
    h("div", { class: "section", id: "drift-features" }, rows)
  );
}

// ---- Sign-in and routing --------------------------------------------------------------------

function loginPage(message) {
  const input = h("input", { type: "password", id: "token", placeholder: "qvt_…", autocomplete: "off", required: true });
  const form = h(
    "form",
    {
      class: "login",
      id: "login",
      onsubmit: (e) => {
        e.preventDefault();
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        start();
      },
    },
    h("strong", {}, "This node needs a token"),
    h("span", { class: "muted" }, "A token with the read scope (admin for replication). It is kept in this tab only."),
    input,
    h("button", { type: "submit" }, "Sign in"),
    message ? h("div", { class: "error" }, message) : null
  );
  page("login", h("h1", {}, "Sign in"), form);
}

function renderWho() {
  const who = document.getElementById("who");
  const parts = [];
  if (node && node.signed_in) {
    const paused = !!sessionStorage.getItem(LIVE_KEY);
    parts.push(
      h(
        "button",
        {
          type: "button",
          id: "live",
          title: "The overview and health pages follow the counters",
          onclick: () => {
            if (paused) sessionStorage.removeItem(LIVE_KEY);
            else sessionStorage.setItem(LIVE_KEY, "1");
            renderWho();
            route();
          },
        },
        paused ? "Resume updates" : "Pause updates"
      )
    );
    parts.push(h("span", {}, `region ${node.region} · quiverd ${node.version}`));
    if (node.auth === "tokens") {
      parts.push(h("span", {}, `token ${node.token}`));
      parts.push(
        h(
          "button",
          {
            type: "button",
            onclick: () => {
              sessionStorage.removeItem(TOKEN_KEY);
              start();
            },
          },
          "Sign out"
        )
      );
    } else {
      parts.push(badge("no authentication", "warn"));
    }
  }
  who.replaceChildren(...parts);
  const admin = node && node.scopes && node.scopes.includes("admin");
  document.getElementById("nav-replication").style.display = admin ? "" : "none";
}

const LIVE_KEY = "quiver.paused";
// Each navigation (or refresh) gets a number; a page that finishes after a newer one started is
// dropped, with its refresh.
let generation = 0;

async function route() {
  clearTimeout(refreshTimer);
  const mine = ++generation;
  let name = "overview";
  try {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    name = parts[0] || "overview";
    const arg = parts[1] || "";
    // A page renders only if no newer navigation started meanwhile.
    const show = (...args) => {
      if (mine === generation) page(...args);
    };
    if (name === "overview") await overview(show);
    else if (name === "registry") await registryPage(show);
    else if (name === "group") await groupPage(show, arg);
    else if (name === "health") await healthPage(show);
    else if (name === "replication") await replicationPage(show);
    else if (name === "drift") await driftPage(show, arg);
    else show("missing", h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Overview")));
  } catch (e) {
    if (mine !== generation) return;
    if (e instanceof ApiError && e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      loginPage(e.message);
      return;
    }
    page("error", h("h1", {}, "Error"), h("div", { class: "error", id: "error" }, e instanceof ApiError ? `${e.code}: ${e.message}` : String(e)));
    return;
  }
  if (mine !== generation) return;
  document.getElementById("footer").textContent = `Updated ${fmtTime(Date.now())}`;
  // The live pages follow the counters, unless paused.
  if ((name === "overview" || name === "health") && !sessionStorage.getItem(LIVE_KEY)) {
    refreshTimer = setTimeout(route, Math.max(node.sample_interval_ms || 10000, 5000));
  }
}

async function start() {
  clearTimeout(refreshTimer);
  generation++; // whatever was loading belongs to the previous sign-in
  try {
    node = await api("/api/node");
  } catch (e) {
    node = null;
    renderWho();
    if (e instanceof ApiError && e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      loginPage(e.message);
    } else {
      page("error", h("h1", {}, "Error"), h("div", { class: "error" }, String(e.message || e)));
    }
    return;
  }
  renderWho();
  if (!node.signed_in) {
    loginPage(null);
    return;
  }
  await route();
}

window.addEventListener("hashchange", () => {
  if (node && node.signed_in) route();
});
start();
