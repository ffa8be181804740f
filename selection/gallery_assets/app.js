/* webkd gallery. Vanilla JS, no network. Every string from the data reaches the DOM through
   textContent or element attributes, never through the HTML parser. */
"use strict";
(function () {
  const M = window.WEBKD_META;
  const CH = window.WEBKD_CHUNKS || [];
  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // ---- data: columns concatenated over the chunks ----
  const D = {};
  for (const k of M.columns) D[k] = [];
  for (const ch of CH) for (const k of M.columns) D[k] = D[k].concat(ch[k]);
  const N = D.id ? D.id.length : 0;
  const byId = new Map();
  for (let i = 0; i < N; i++) byId.set(D.id[i], i);
  const R = M.reasons, RI = M.reason_info;
  const className = (k) => (k >= 0 && k < M.classes.length) ? M.classes[k] : (k < 0 ? "(none)" : "class " + k);
  const studentSource = (e) => (e === -1 ? "the exported student (" + (M.student || "export") + ")" :
    "the student scored for the epoch-" + e + " selection");
  const webName = (w) => (w >= 0 ? M.web_labels[w] : "(none)");
  const members = new Map();             // representative index -> member indices (in the ledger)
  for (let i = 0; i < N; i++) {
    const d = D.dup[i];
    if (d === null || !byId.has(d)) continue;
    const r = byId.get(d);
    if (!members.has(r)) members.set(r, []);
    members.get(r).push(i);
  }
  const extras = new Map();              // representative id -> extra (not in ledger) positions
  for (let j = 0; j < M.extra.id.length; j++) {
    const rep = M.extra.rep[j];
    if (!extras.has(rep)) extras.set(rep, []);
    extras.get(rep).push(j);
  }

  // ---- state ----
  const DEFAULTS = {view: "pseudo", cls: "*", tab: "kept", reason: "*", smin: 0, smax: 1, q: "",
                    group: true, ovOnly: false, sort: "desc", page: 0, cell: null, like: null};
  const S = Object.assign({}, DEFAULTS);
  let LIST = [], TILES = [];

  // ---- overrides made on this page (memory + localStorage) ----
  // An entry: {action: "accept" | "reject" | null, label: undefined (no correction) | class name |
  // null (off-class), time}; exported as the store's format (action "relabel" for a label alone).
  const LSKEY = "webkd-overrides:" + M.run.key;
  const OV = new Map();
  const storedAction = (i) => (D.so[i] === 1 ? "accept" : D.so[i] === 2 ? "reject" : null);
  const storedLabel = (i) => (D.sl[i] === -2 || D.sl[i] === -3 ? undefined : D.sl[i] === -1 ? null : M.classes[D.sl[i]]);
  const labelText = (l) => (l === null ? "off-class" : l);
  function sameAsStored(i, e) {
    return i !== undefined && storedAction(i) === e.action && storedLabel(i) === e.label;
  }
  function loadOV() {
    try {
      const raw = window.localStorage ? window.localStorage.getItem(LSKEY) : null;
      if (!raw) return;
      const o = JSON.parse(raw);
      for (const id of Object.keys(o)) {
        const e = o[id];
        if (!e) continue;
        const action = e.action === "accept" || e.action === "reject" ? e.action : null;
        const label = "label" in e && (e.label === null || typeof e.label === "string") ? e.label : undefined;
        if (!action && label === undefined) continue;
        const x = {action: action, label: label, time: String(e.time || "")};
        if (sameAsStored(byId.get(id), x)) continue;   // already in the store
        OV.set(id, x);
      }
    } catch (err) { console.warn("webkd: cannot read saved overrides", err); }
  }
  function saveOV() {
    try {
      if (window.localStorage) window.localStorage.setItem(LSKEY, JSON.stringify(Object.fromEntries(OV)));
    } catch (err) { /* private mode, quota: the in-memory copy still works */ }
    $("n-ov").textContent = String(OV.size);
  }
  // the entry a tile shows: the page's when it has one, else the store's
  function current(id) {
    if (OV.has(id)) return OV.get(id);
    const i = byId.get(id);
    return {action: i === undefined ? null : storedAction(i), label: i === undefined ? undefined : storedLabel(i)};
  }
  // patch: {action} and / or {label}; an entry equal to the store's is no page override
  function setOV(id, patch) {
    const cur = current(id), e = {action: cur.action, label: cur.label, time: new Date().toISOString()};
    if (patch === null) { OV.delete(id); APP.changed([id]); return; }
    if ("action" in patch) e.action = patch.action;
    if ("label" in patch) e.label = patch.label;
    const i = byId.get(id);
    if (sameAsStored(i, e) || (i === undefined && !e.action && e.label === undefined)) OV.delete(id); else OV.set(id, e);
    APP.changed([id]);
  }
  function toEntry(e, note) {
    const x = {action: e.action || (e.label !== undefined ? "relabel" : null), note: note, time: e.time};
    if (e.label !== undefined) x.label = e.label;
    return x;
  }
  function exportOV() {
    const entries = {};
    for (const [id, e] of OV) { const x = toEntry(e, "gallery"); if (x.action) entries[id] = x; }
    const text = JSON.stringify({version: 1, entries: entries}, null, 2) + "\n";
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
    a.download = "overrides.json";
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 2000);
  }

  // ---- filtering ----
  const classKey = (i) => (S.view === "pseudo" ? D.pl[i] : D.wl[i]);
  function textHit(i, q) {
    const parts = [D.id[i], D.uri[i], D.cap[i], D.url[i], webName(D.wl[i]), className(D.pl[i])];
    for (const p of parts) if (p && String(p).toLowerCase().indexOf(q) >= 0) return true;
    return false;
  }
  function pass(i, skip) {
    if (skip !== "class" && S.cls !== "*" && classKey(i) !== S.cls) return false;
    if (skip !== "reason" && S.reason !== "*" && D.reason[i] !== S.reason) return false;
    if (skip !== "tab") {
      if (S.tab === "kept" && !D.kept[i]) return false;
      if (S.tab === "rejected" && (D.kept[i] || D.val[i])) return false;   // validation is not a rejection
      if (S.tab === "validation" && !D.val[i]) return false;
    }
    const c = D.conf[i];
    if (c === null) { if (S.smin > 0 || S.smax < 1) return false; }
    else if (c < S.smin || c > S.smax) return false;
    if (S.ovOnly && !OV.has(D.id[i])) return false;
    if (S.cell && (D.wl[i] !== S.cell[0] || D.pl[i] !== S.cell[1])) return false;
    if (S.like !== null && S.like !== i && D.nb[S.like].indexOf(i) < 0) return false;
    if (S.q && !textHit(i, S.q)) return false;
    return true;
  }
  function classOptions() {
    const keys = new Set();
    for (let i = 0; i < N; i++) keys.add(classKey(i));
    const arr = Array.from(keys);
    if (S.view === "pseudo") arr.sort((a, b) => a - b);
    else arr.sort((a, b) => webName(a).localeCompare(webName(b)));
    const sel = $("f-class");
    sel.replaceChildren();
    const all = el("option", null, "all classes"); all.value = "*"; sel.appendChild(all);
    for (const k of arr) {
      const o = el("option", null, S.view === "pseudo" ? className(k) : webName(k));
      o.value = String(k); o.dataset.name = o.textContent; sel.appendChild(o);
    }
    sel.value = S.cls === "*" ? "*" : String(S.cls);
  }
  function reasonOptions() {
    const sel = $("f-reason");
    const all = el("option", null, "all reasons"); all.value = "*"; sel.appendChild(all);
    R.forEach((r, k) => {
      const o = el("option", null, r); o.value = String(k); o.dataset.name = r;
      o.title = RI[r] ? RI[r][1] : r; sel.appendChild(o);
    });
  }
  // a filter's options show how many rows each value has under the other filters
  function countOptions(selectId, counts, allLabel) {
    let total = 0;
    for (const o of $(selectId).options) {
      if (o.value === "*") continue;
      const n = counts.get(Number(o.value)) || 0; total += n;
      o.textContent = o.dataset.name + " (" + n + ")";
    }
    $(selectId).options[0].textContent = allLabel + " (" + total + ")";
  }
  function update() {
    let nk = 0, nr = 0, nv = 0;
    const cc = new Map(), rc = new Map(), list = [];
    for (let i = 0; i < N; i++) {
      if (pass(i, "tab")) { if (D.kept[i]) nk++; else if (D.val[i]) nv++; else nr++; }
      if (pass(i, "class")) { const k = classKey(i); cc.set(k, (cc.get(k) || 0) + 1); }
      if (pass(i, "reason")) rc.set(D.reason[i], (rc.get(D.reason[i]) || 0) + 1);
      if (pass(i, null)) list.push(i);
    }
    $("n-kept").textContent = String(nk);
    $("n-rejected").textContent = String(nr);
    $("n-val").textContent = String(nv);
    $("n-all").textContent = String(nk + nr + nv);
    countOptions("f-class", cc, "all classes");
    countOptions("f-reason", rc, "all reasons");
    const sgn = S.sort === "asc" ? 1 : -1;
    const le = (x) => (D.le[x] === null ? -9 : D.le[x]);
    const simTo = (x) => (x === S.like ? 2 : D.ns[S.like][D.nb[S.like].indexOf(x)]);
    list.sort((a, b) => {
      if (S.like !== null) return simTo(b) - simTo(a);
      if (S.sort === "le" && le(a) !== le(b)) return le(b) - le(a);   // likely label errors first, by margin
      const ca = D.conf[a] === null ? -1 : D.conf[a], cb = D.conf[b] === null ? -1 : D.conf[b];
      const s2 = S.sort === "le" ? 1 : sgn;
      return ca !== cb ? s2 * (ca - cb) : (D.id[a] < D.id[b] ? -1 : 1);
    });
    APP.filterNote();
    let tiles = list;
    if (S.group) {
      const inList = new Set(list);
      tiles = list.filter((i) => {
        const d = D.dup[i];
        if (d === null) return true;
        const r = byId.get(d);
        return r === undefined || !inList.has(r);
      });
    }
    LIST = list; TILES = tiles;
    $("n-shown").textContent = String(list.length);
    $("n-tiles").textContent = String(tiles.length);
    for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === S.tab);
    const pages = Math.max(1, Math.ceil(tiles.length / M.page_size));
    S.page = Math.min(Math.max(0, S.page), pages - 1);
    renderPage(pages);
  }

  // ---- tiles ----
  function fmt(p, d) { return (p === null || p === undefined) ? "-" : Number(p).toFixed(d === undefined ? 2 : d); }
  function thumb(g) {
    const T = M.thumbs, d = el("div", "thumb");
    d.style.width = d.style.height = T.size + "px";
    if (g === null || g < 0 || g === undefined) { d.classList.add("missing"); return d; }
    const s = Math.floor(g / T.per_sheet), j = g % T.per_sheet;
    d.style.backgroundImage = 'url("' + T.dir + "/" + T.sheets[s] + '")';
    d.style.backgroundPosition = (-(j % T.cols) * T.size) + "px " + (-Math.floor(j / T.cols) * T.size) + "px";
    return d;
  }
  function line(cls, label, text, title) {
    const d = el("div", "line " + cls);
    if (label) d.appendChild(el("span", "muted", label + " "));
    d.appendChild(el("span", "v", text));
    d.title = title !== undefined ? String(title) : String(text);
    return d;
  }
  function baseName(u) {
    if (!u) return "-";
    const s = String(u), k = Math.max(s.lastIndexOf("/"), s.lastIndexOf("\\"));
    return k >= 0 ? s.slice(k + 1) : s;
  }
  function ovState(t, id, i) {
    const e = OV.get(id), c = current(id), st = storedAction(i), sl = storedLabel(i);
    t.classList.toggle("ov-accept", !!e && e.action === "accept");
    t.classList.toggle("ov-reject", !!e && e.action === "reject");
    t.querySelector("button.acc").classList.toggle("on", c.action === "accept");
    t.querySelector("button.rej").classList.toggle("on", c.action === "reject");
    const sel = t.querySelector("select.relabel");
    sel.value = c.label === undefined ? "" : c.label === null ? "\u0000off" : "c" + M.classes.indexOf(c.label);
    const s = t.querySelector(".ovstate");
    const words = (a, l) => [a, l === undefined ? null : "label " + labelText(l)].filter((x) => x).join(", ");
    s.textContent = e ? "page: " + (words(e.action, e.label) || "cleared") :
      (st || sl !== undefined ? "stored: " + words(st, sl) : "");
  }
  function relabelSelect(id) {
    const sel = el("select", "relabel");
    sel.title = "correct the label (the image's class for training and validation)";
    const o0 = el("option", null, "label: web query's"); o0.value = ""; sel.appendChild(o0);
    M.classes.forEach((c, k) => { const o = el("option", null, c); o.value = "c" + k; sel.appendChild(o); });
    const off = el("option", null, "off-class"); off.value = "\u0000off"; sel.appendChild(off);
    sel.addEventListener("change", () => {
      const v = sel.value;
      setOV(id, {label: v === "" ? undefined : v === "\u0000off" ? null : M.classes[Number(v.slice(1))]});
      saveOV();
      APP.refreshTile(id);
    });
    return sel;
  }
  function history(i) {
    const h = D.h[i], box = el("div", "hist f-hist");
    for (let k = 0; k + 2 < h.length; k += 3) {
      const e = h[k], kept = h[k + 1], r = R[h[k + 2]];
      const tag = RI[r] ? RI[r][0] : r;
      const val = !kept && r === "validation";
      const c = el("span", "chip " + (kept ? "k" : val ? "v" : "r"), e + (kept ? "\u2713" : val ? "\u00b7" : "\u2717") + tag);
      c.title = "epoch " + e + ": " + (kept ? "kept" : val ? "validation" : "rejected") + " (" + r + ")";
      box.appendChild(c);
    }
    return box;
  }
  function groupStrip(i, box) {
    const strip = el("div", "group");
    for (const m of members.get(i) || []) {
      const w = el("div", "member");
      w.appendChild(thumb(D.g[m]));
      w.appendChild(el("div", "line", R[D.reason[m]]));
      w.title = D.id[m] + "\n" + (D.uri[m] || "") + "\n" + decision(m) + " (" + R[D.reason[m]] + ")";
      strip.appendChild(w);
    }
    for (const j of extras.get(D.id[i]) || []) {
      const w = el("div", "member");
      w.appendChild(thumb(M.extra.g[j]));
      w.appendChild(el("div", "line", "no ledger row"));
      w.title = M.extra.id[j] + "\n" + (M.extra.uri[j] || "");
      strip.appendChild(w);
    }
    box.appendChild(strip);
  }
  const decision = (i) => (D.kept[i] ? "kept" : D.val[i] ? "validation" : "rejected");
  function tile(i) {
    const id = D.id[i], r = R[D.reason[i]];
    const t = el("article", "tile " + decision(i));
    t.dataset.id = id;
    const top = el("div", "top");
    const th = thumb(D.g[i]);
    th.classList.add("open"); th.title = "large view, decision history, more like this";
    th.addEventListener("click", () => APP.openViewer(i));
    top.appendChild(th);
    const info = el("div", "info");
    const head = el("div", "line");
    head.appendChild(el("span", "score f-score", fmt(D.conf[i], 3)));
    head.appendChild(document.createTextNode(" "));
    const b = el("span", "badge f-reason", r); b.title = RI[r] ? RI[r][1] : r; head.appendChild(b);
    head.appendChild(el("span", "muted f-weight", " w " + fmt(D.weight[i])));
    if (D.val[i]) head.appendChild(el("span", "muted", " val"));
    info.appendChild(head);
    info.appendChild(line("f-web", "web:", webName(D.wl[i])));
    info.appendChild(line("f-file", "file:", baseName(D.uri[i]), D.uri[i] || ""));
    info.appendChild(line("f-pl", "pseudo:", className(D.pl[i]) + " (thr " + fmt(D.thr[i]) + ")"));
    info.appendChild(line("f-student", "student:", D.sp[i] < 0 ? "-" : className(D.sp[i]) + " " + fmt(D.sc[i]),
                          D.sp[i] < 0 ? "no student prediction yet" : studentSource(D.se[i])));
    top.appendChild(info);
    t.appendChild(top);
    t.appendChild(line("f-teacher", "teacher:", className(D.t1[i]) + " " + fmt(D.p1[i]) + " \u00b7 " +
                       className(D.t2[i]) + " " + fmt(D.p2[i]) +
                       (D.alpha[i] === null ? "" : "  (\u03b1 " + fmt(D.alpha[i]) + ")")));
    if (D.cap[i]) t.appendChild(line("f-cap", "caption:", D.cap[i]));
    if (D.url[i]) {
      const u = String(D.url[i]);
      if (/^https?:\/\//i.test(u)) {
        const d = el("div", "line f-url"), a = el("a", null, u);
        a.href = u; a.rel = "noopener noreferrer nofollow"; a.target = "_blank";
        d.appendChild(el("span", "muted", "url: ")); d.appendChild(a); d.title = u; t.appendChild(d);
      } else t.appendChild(line("f-url", "url:", u));
    }
    if (D.knn[i] !== null) t.appendChild(line("f-knn", "kNN agree:", fmt(D.knn[i])));
    if (D.le[i] !== null) {
      const d = el("div", "f-le"), txt = line("f-le-text", "likely label error:", "suggest " + className(D.sg[i]) + " (margin " + fmt(D.le[i]) + ")",
                     "confident learning: the teacher is confident in " + className(D.sg[i]) + ", not in the web query's class");
      d.appendChild(txt);
      const fix = el("button", "fix", "Relabel to " + className(D.sg[i]));
      fix.type = "button";
      fix.addEventListener("click", () => { setOV(id, {label: M.classes[D.sg[i]]}); saveOV(); APP.refreshTile(id); });
      d.appendChild(fix);
      t.appendChild(d);
    }
    t.appendChild(history(i));
    const idl = line("f-id", "id:", id.slice(0, 16), id);
    t.appendChild(idl);
    if (D.dup[i] !== null) t.appendChild(line("f-dupof", "near-dup of:", String(D.dup[i]).slice(0, 16), D.dup[i]));
    const nm = (members.get(i) || []).length + (extras.get(id) || []).length;
    const bar = el("div", "ovbar");
    const ba = el("button", "acc", "Accept"), br = el("button", "rej", "Reject");
    ba.type = "button"; br.type = "button";
    ba.title = "force keep (override)"; br.title = "force reject (override)";
    const st = el("span", "ovstate");
    bar.appendChild(ba); bar.appendChild(br); bar.appendChild(relabelSelect(id)); bar.appendChild(st);
    if (D.nb[i].length) {
      const like = el("button", "like", "More like this");
      like.type = "button"; like.title = "its nearest neighbours in the FAISS index";
      like.addEventListener("click", () => APP.showLike(i));
      bar.appendChild(like);
    }
    if (nm) {
      const g = el("button", "grp", "+" + nm + " near-dup" + (nm > 1 ? "s" : ""));
      g.type = "button";
      g.addEventListener("click", () => {
        const open = t.querySelector(".group");
        if (open) open.remove(); else groupStrip(i, t);
      });
      bar.appendChild(g);
    }
    t.appendChild(bar);
    const click = (action) => {
      setOV(id, {action: current(id).action === action ? null : action});
      saveOV();
      ovState(t, id, i);
    };
    ba.addEventListener("click", () => click("accept"));
    br.addEventListener("click", () => click("reject"));
    ovState(t, id, i);
    return t;
  }
  function pager(box, pages) {
    box.replaceChildren();
    if (pages <= 1) return;
    const prev = el("button", null, "\u2039 Prev"), next = el("button", null, "Next \u203a");
    prev.type = next.type = "button";
    prev.disabled = S.page === 0; next.disabled = S.page >= pages - 1;
    prev.addEventListener("click", () => { S.page--; renderPage(pages); window.scrollTo(0, 0); });
    next.addEventListener("click", () => { S.page++; renderPage(pages); window.scrollTo(0, 0); });
    box.appendChild(prev);
    box.appendChild(el("span", "pageinfo", "page " + (S.page + 1) + " / " + pages));
    box.appendChild(next);
  }
  function renderPage(pages) {
    const grid = $("grid");
    const start = S.page * M.page_size, part = TILES.slice(start, start + M.page_size);
    const frag = document.createDocumentFragment();
    for (const i of part) frag.appendChild(tile(i));
    grid.replaceChildren(frag);
    if (!part.length) grid.appendChild(el("div", "empty", N ? "No images match the filters." :
      "No ledger yet: run selection (webkd distill / curate) first."));
    pager($("pager-top"), pages);
    pager($("pager-bottom"), pages);
  }

  // ---- summary table ----
  function summaryTable(title, rows, view) {
    const tb = el("table", "sum"), head = el("tr");
    for (const h of [title, "kept", "rejected", "top rejection reasons"]) head.appendChild(el("th", null, h));
    tb.appendChild(head);
    for (const c of rows) {
      const tr = el("tr"), td = el("td"), a = el("a", null, c.name);
      a.title = "show this class";
      a.addEventListener("click", () => {
        S.view = view; $("f-view").value = view; classOptions();
        S.cls = view === "pseudo" ? c.key : M.web_labels.indexOf(c.name);
        $("f-class").value = String(S.cls); S.tab = "all"; S.page = 0; update();
        $("controls").scrollIntoView();
      });
      td.appendChild(a); tr.appendChild(td);
      tr.appendChild(el("td", null, c.kept));
      tr.appendChild(el("td", null, c.rejected));
      tr.appendChild(el("td", "why", c.reasons.map((x) => x[0] + " " + x[1]).join(", ")));
      tb.appendChild(tr);
    }
    return tb;
  }
  function summary() {
    const s = M.summary, box = $("summary-body"), wrap = el("div", "sumwrap");
    wrap.appendChild(summaryTable("pseudo-label", s.by_pseudo, "pseudo"));
    wrap.appendChild(summaryTable("web query", s.by_query, "query"));
    box.appendChild(wrap);
    box.appendChild(el("p", "reasons", "Top rejection reasons: " +
      (s.reasons.length ? s.reasons.slice(0, 8).map((x) => x[0] + " " + x[1]).join(", ") : "-")));
    box.appendChild(el("p", "shares", "Web queries (train rows): " + s.shares_line));
    if (s.collapsed.length) {
      const c = $("collapse");
      c.hidden = false;
      c.appendChild(el("div", null, "Warning: " + s.collapsed.length + " class(es) lost (nearly) all their kept images"));
      for (const x of s.collapsed) c.appendChild(el("p", "collapsed", x.line));
    }
    const ep = M.run.epochs;
    $("run-info").textContent = N + " images (" + M.run.records + " manifest records), kept " + s.kept +
      ", rejected " + s.rejected + ", validation " + s.validation + "; epochs " + (ep.length ? ep[0] + ".." + ep[ep.length - 1] : "-") +
      "; " + s.groups + " near-duplicate groups; stored overrides: " + M.stored_overrides +
      "; rendered " + M.run.rendered;
    $("run-info").title = M.run.path;
    if (M.overrides_error) { $("warn").hidden = false; $("warn").textContent = "Overrides store: " + M.overrides_error; }
  }

  // ---- controls ----
  function num(v, d) { const x = parseFloat(v); return isNaN(x) ? d : x; }
  function wire() {
    const re = () => { S.page = 0; update(); };
    $("f-view").addEventListener("change", (e) => { S.view = e.target.value; S.cls = "*"; classOptions(); re(); });
    $("f-class").addEventListener("change", (e) => { S.cls = e.target.value === "*" ? "*" : Number(e.target.value); re(); });
    $("f-reason").addEventListener("change", (e) => { S.reason = e.target.value === "*" ? "*" : Number(e.target.value); re(); });
    $("f-smin").addEventListener("input", (e) => { S.smin = num(e.target.value, 0); re(); });
    $("f-smax").addEventListener("input", (e) => { S.smax = num(e.target.value, 1); re(); });
    $("f-q").addEventListener("input", (e) => { S.q = e.target.value.trim().toLowerCase(); re(); });
    $("f-sort").addEventListener("change", (e) => { S.sort = e.target.value; re(); });
    $("f-group").addEventListener("change", (e) => { S.group = e.target.checked; re(); });
    $("f-ovonly").addEventListener("change", (e) => { S.ovOnly = e.target.checked; re(); });
    $("b-reset").addEventListener("click", () => {
      Object.assign(S, DEFAULTS);
      $("f-view").value = "pseudo"; $("f-reason").value = "*"; $("f-smin").value = "0"; $("f-smax").value = "1";
      $("f-q").value = ""; $("f-sort").value = "desc"; $("f-group").checked = true; $("f-ovonly").checked = false;
      classOptions(); update();
    });
    for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => { S.tab = b.dataset.tab; re(); });
    const bulk = (action) => {
      APP.batch(() => { for (const i of LIST) setOV(D.id[i], action === undefined ? null : {action: action}); });
      saveOV(); update();
    };
    $("b-accept-all").addEventListener("click", () => bulk("accept"));
    $("b-reject-all").addEventListener("click", () => bulk("reject"));
    $("b-clear-filter").addEventListener("click", () => bulk(undefined));
    $("b-export").addEventListener("click", exportOV);
    let armed = 0;
    $("b-clear-all").addEventListener("click", (e) => {      // two clicks, no dialog
      if (Date.now() - armed > 4000) { armed = Date.now(); e.target.textContent = "Click again to clear all"; return; }
      armed = 0; e.target.textContent = "Clear all page overrides"; OV.clear(); saveOV(); update();
    });
  }

  // ---- what review.js (matrix, large view, more like this, the local server) hooks into ----
  const APP = window.WEBKD_APP = {
    M: M, D: D, N: N, S: S, OV: OV, byId: byId, el: el, thumb: thumb, fmt: fmt, className: className,
    webName: webName, decision: decision, current: current, setOV: setOV, saveOV: saveOV, toEntry: toEntry,
    storedLabel: storedLabel, update: update, labelText: labelText, reasonName: (k) => R[k],
    changed: () => {}, started: () => {}, filterNote: () => {}, openViewer: () => {}, showLike: () => {},
    batch: (f) => f(),
    refreshTile: (id) => {
      const t = document.querySelector('.tile[data-id="' + CSS.escape(id) + '"]');
      if (t) ovState(t, id, byId.get(id));
    },
  };
  loadOV();
  summary();
  reasonOptions();
  classOptions();
  wire();
  saveOV();
  // review.js (loaded next) installs its hooks before this runs
  document.addEventListener("DOMContentLoaded", () => { update(); document.body.dataset.ready = "1"; APP.started(); });
})();
