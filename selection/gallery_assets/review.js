/* webkd gallery, part 2: the web query x pseudo-label matrix, the large view of one image (its
   decision history, more like this), and the write path to a local `webkd inspect --serve`.
   Same rules as app.js: data reaches the DOM through textContent / attributes only. */
"use strict";
(function () {
  const A = window.WEBKD_APP, M = A.M, D = A.D, S = A.S, el = A.el;
  const $ = (id) => document.getElementById(id);
  const tok = document.querySelector('meta[name="webkd-server"]');   // only in the page the local server hands out
  const SERVER = tok && location.protocol.startsWith("http") ? {token: tok.getAttribute("content")} : null;

  // ---- web query x pseudo-label matrix ----
  function matrix() {
    const box = $("matrix-body"), K = M.classes.length;
    const rows = new Map();                          // web label index -> counts per pseudo-label (+ none)
    for (let i = 0; i < A.N; i++) {
      if (!rows.has(D.wl[i])) rows.set(D.wl[i], new Array(K + 1).fill(0));
      const p = D.pl[i];
      rows.get(D.wl[i])[p >= 0 && p < K ? p : K]++;
    }
    const keys = Array.from(rows.keys()).sort((a, b) => A.webName(a).localeCompare(A.webName(b)));
    const tb = el("table", "matrix"), head = el("tr");
    head.appendChild(el("th", null, "web query \u2193 / pseudo-label \u2192"));
    for (let k = 0; k < K; k++) head.appendChild(el("th", null, A.className(k)));
    head.appendChild(el("th", null, "(none)"));
    tb.appendChild(head);
    for (const w of keys) {
      const tr = el("tr");
      tr.appendChild(el("td", null, A.webName(w)));
      rows.get(w).forEach((n, k) => {
        const td = el("td");
        if (n) {
          const a = el("a", "cell", n);
          a.dataset.w = String(w); a.dataset.p = String(k < K ? k : -1);
          a.title = "show the images of query " + A.webName(w) + " with pseudo-label " + A.className(k < K ? k : -1);
          a.addEventListener("click", () => {
            S.cell = [w, k < K ? k : -1]; S.like = null; S.tab = "all"; S.page = 0; A.update();
            $("controls").scrollIntoView();
          });
          td.appendChild(a);
          if (w >= 0 && M.classes.indexOf(A.webName(w)) === k) td.classList.add("diag");
        }
        tr.appendChild(td);
      });
      tb.appendChild(tr);
    }
    box.appendChild(tb);
  }

  // ---- the note naming a matrix cell / more-like-this filter, with a way out ----
  A.filterNote = () => {
    const box = $("f-note");
    box.replaceChildren();
    let text = null;
    if (S.cell) text = "web query " + A.webName(S.cell[0]) + " \u00d7 pseudo-label " + A.className(S.cell[1]);
    if (S.like !== null) text = "more like " + String(D.id[S.like]).slice(0, 16) + " (" + D.nb[S.like].length + " nearest in the index)";
    box.hidden = text === null;
    if (text === null) return;
    box.appendChild(el("span", null, text + " "));
    const x = el("button", "clear", "clear");
    x.type = "button";
    x.addEventListener("click", () => { S.cell = null; S.like = null; S.page = 0; A.update(); });
    box.appendChild(x);
  };
  A.showLike = (i) => {
    S.like = i; S.cell = null; S.tab = "all"; S.page = 0; closeViewer(); A.update();
    $("controls").scrollIntoView();
  };

  // ---- large view ----
  function largeImage(i) {
    const id = D.id[i], uri = D.uri[i] ? String(D.uri[i]) : "";
    if (SERVER) return "/api/image?id=" + encodeURIComponent(id);
    if (location.protocol === "file:" && uri.startsWith("/"))
      return "file://" + uri.split("/").map(encodeURIComponent).join("/");
    return null;
  }
  function closeViewer() { const v = $("viewer"); v.hidden = true; v.querySelector(".body").replaceChildren(); }
  function historyTable(i) {
    const h = D.h[i], x = D.hx[i], tb = el("table", "hist-table");
    const head = el("tr");
    for (const c of ["epoch", "decision", "reason", "pseudo-label", "confidence", "threshold", "weight"]) head.appendChild(el("th", null, c));
    tb.appendChild(head);
    for (let k = 0, j = 0; k + 2 < h.length; k += 3, j += 4) {
      const r = A.reasonName(h[k + 2]), tr = el("tr");
      const dec = h[k + 1] ? "kept" : r === "validation" ? "validation" : "rejected";
      for (const v of [h[k], dec, r, A.className(x[j]), A.fmt(x[j + 1], 3), A.fmt(x[j + 2], 3), A.fmt(x[j + 3], 3)])
        tr.appendChild(el("td", null, v));
      tb.appendChild(tr);
    }
    return tb;
  }
  A.openViewer = (i) => {
    const v = $("viewer"), body = v.querySelector(".body");
    body.replaceChildren();
    const top = el("div", "vtop"), pic = el("div", "vpic");
    const src = largeImage(i);
    const big = A.thumb(D.g[i]);
    big.classList.add("big");
    pic.appendChild(big);
    if (src) {
      const img = el("img", "large");
      img.alt = "image " + D.id[i];
      img.addEventListener("load", () => big.remove());
      img.addEventListener("error", () => img.remove());
      img.src = src;
      pic.appendChild(img);
    }
    top.appendChild(pic);
    const info = el("div", "vinfo");
    const c = A.current(D.id[i]);
    const rows = [["id", D.id[i]], ["file", D.uri[i] || "-"], ["web query", A.webName(D.wl[i])],
                  ["decision", A.decision(i) + " (" + A.reasonName(D.reason[i]) + ")"],
                  ["pseudo-label", A.className(D.pl[i]) + " " + A.fmt(D.conf[i], 3)],
                  ["teacher", A.className(D.t1[i]) + " " + A.fmt(D.p1[i]) + " \u00b7 " + A.className(D.t2[i]) + " " + A.fmt(D.p2[i])],
                  ["override", [c.action, c.label === undefined ? null : "label " + A.labelText(c.label)].filter((x) => x).join(", ") || "-"]];
    if (D.le[i] !== null) rows.push(["likely label error", "suggest " + A.className(D.sg[i]) + " (margin " + A.fmt(D.le[i]) + ")"]);
    for (const [k, val] of rows) {
      const d = el("div", "line");
      d.appendChild(el("span", "muted", k + ": ")); d.appendChild(el("span", "v v-" + k.replace(/ /g, "-"), val));
      info.appendChild(d);
    }
    info.appendChild(el("h3", null, "Decision history (every epoch's ledger)"));
    info.appendChild(historyTable(i));
    top.appendChild(info);
    body.appendChild(top);
    body.appendChild(el("h3", null, "More like this" + (M.neighbours ? " (nearest in index/" + M.neighbours.encoder + ".faiss, cosine similarity)" : "")));
    const strip = el("div", "likes");
    D.nb[i].forEach((j, k) => {
      const w = el("div", "likeitem");
      w.dataset.id = D.id[j];
      w.appendChild(A.thumb(D.g[j]));
      w.appendChild(el("div", "sim", A.fmt(D.ns[i][k], 3)));
      w.appendChild(el("div", "line", A.className(D.pl[j])));
      w.title = D.id[j] + "\n" + (D.uri[j] || "") + "\n" + A.decision(j);
      w.addEventListener("click", () => A.openViewer(j));
      strip.appendChild(w);
    });
    if (!D.nb[i].length) strip.appendChild(el("div", "muted", "no FAISS index of this run's manifest: no neighbours"));
    body.appendChild(strip);
    if (D.nb[i].length) {
      const all = el("button", "like-grid", "Show them in the grid");
      all.type = "button";
      all.addEventListener("click", () => A.showLike(i));
      body.appendChild(all);
    }
    v.hidden = false;
  };

  // ---- the write path to `webkd inspect --serve` ----
  let pending = null, batching = false;
  function status(text, bad) {
    const s = $("serve-status");
    s.hidden = false; s.textContent = text; s.classList.toggle("bad", !!bad);
  }
  function applyStore(store) {   // the store as the server has it now -> the page's stored columns
    const so = {accept: 1, reject: 2, relabel: 3};
    for (let i = 0; i < A.N; i++) { D.so[i] = 0; D.sl[i] = -2; }
    for (const id of Object.keys(store.entries)) {
      const i = A.byId.get(id), e = store.entries[id];
      if (i === undefined) continue;
      D.so[i] = so[e.action] || 0;
      D.sl[i] = !("label" in e) ? -2 : e.label === null ? -1 : M.classes.indexOf(e.label) >= 0 ? M.classes.indexOf(e.label) : -3;
    }
  }
  function send(ids) {
    const entries = {}, remove = [];
    for (const id of ids) {
      const e = A.OV.get(id);
      if (!e) continue;
      const x = A.toEntry(e, "gallery (served)");
      if (x.action) entries[id] = x; else remove.push(id);
    }
    if (!Object.keys(entries).length && !remove.length) return;
    status("saving " + (Object.keys(entries).length + remove.length) + " decision(s) to the run\u2026");
    fetch("/api/overrides", {method: "POST", headers: {"Content-Type": "application/json", "X-Webkd-Token": SERVER.token},
                             body: JSON.stringify({entries: entries, remove: remove})})
      .then((r) => r.json().then((j) => [r.ok, j]))
      .then(([ok, j]) => {
        if (!ok) { status("not saved (kept on this page, export still works): " + j.error, true); return; }
        applyStore(j.store);
        for (const id of ids) {
          const e = A.OV.get(id), i = A.byId.get(id);
          if (e && i !== undefined) A.OV.delete(id);
        }
        A.saveOV();
        for (const id of ids) A.refreshTile(id);
        status("saved to the run: " + j.total + " override(s) in " + j.store_path + " (applied at the next curate / distill / refresh)");
        document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
      })
      .catch((err) => status("not saved (server unreachable; kept on this page): " + err, true));
  }
  if (SERVER) {
    A.changed = (ids) => { if (batching) { for (const id of ids) pending.add(id); } else send(ids); };
    A.batch = (f) => { batching = true; pending = new Set(); try { f(); } finally { batching = false; send(Array.from(pending)); } };
    A.started = () => {
      document.body.dataset.served = "1";
      fetch("/api/overrides").then((r) => r.json()).then((store) => {
        applyStore(store); A.update();
        const ids = Array.from(A.OV.keys());
        if (ids.length) send(ids);                    // page decisions made offline reach the run now
        status("connected to webkd inspect --serve: decisions are written to the run's overrides store");
      }).catch((err) => status("server unreachable: " + err, true));
    };
    $("footer-text").textContent = "Served by webkd inspect --serve: each decision is written to the run's overrides store (file lock); export still works.";
  }

  matrix();
  $("viewer").querySelector("button.close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("viewer").hidden) closeViewer(); });
})();
