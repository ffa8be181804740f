"""A run's review data: its ledgers, manifest, quarantine and overrides read into column arrays
(`load_run` -> `RunData`), and the summary every review surface prints (`summarize` ->
`RunSummary`: kept / rejected / validation per class and per web query, top reasons), with the
run's counts from `selection.counts`. The gallery page (`selection.gallery`), `webkd inspect`
and the curation artifact all read a run through here.

Which decision an image shows: its newest ledger row (its row in the newest
`selection/epoch_<k>.parquet` that has it); its history lists every epoch's decision.

Which student prediction an image shows: the exported student's (`export/student_predictions.parquet`,
written at export: one pass of the deployed student over the pool, so the champion's own
predictions), else the student prediction of its newest ledger row that has one (a KD^3 selection
scores the student each epoch; other modes leave -1), else none. `items["student_epoch"]` says
which: -1 the export, k the epoch-k ledger, -2 none.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from webkd.pipeline.paths import RunPaths, ledgers_in
from webkd.pipeline.records import (BELOW_BUDGET, BELOW_CLASS_THRESHOLD, FALLBACK, KNN_DISAGREE, LEDGER_REASONS,
                                    LOW_CONFIDENCE, LOW_RELEVANCE, NEAR_DUPLICATE, NO_SELECTION, NOT_SAMPLED,
                                    OFF_CLASS, OVERRIDE, SELECTED, VALIDATION)
from webkd.pipeline.records import load_quarantine
from webkd.selection.counts import Collapse, QueryShare, count_run, query_shares_line
from webkd.selection.overrides import load_entries

log = logging.getLogger(__name__)

# Ledger reason codes (pipeline.records.LEDGER_REASONS), in display order, each with a short tag
# for the compact per-epoch history and its line of help.
_TAGS = {SELECTED: "sel", NO_SELECTION: "all", FALLBACK: "fb", OVERRIDE: "ovr", BELOW_CLASS_THRESHOLD: "thr", LOW_CONFIDENCE: "conf",
         KNN_DISAGREE: "knn", NOT_SAMPLED: "rnd", BELOW_BUDGET: "bud", LOW_RELEVANCE: "rel", OFF_CLASS: "off",
         NEAR_DUPLICATE: "dup", VALIDATION: "val"}
REASONS: dict[str, tuple[str, str]] = {r: (_TAGS[r], text) for r, text in LEDGER_REASONS.items()}
_NAN = float("nan")
# Ledger columns the page reads, with the value used when an (older) ledger lacks one.
_LEDGER_DEFAULTS: dict[str, Any] = {
    "row": -1, "split": "train", "weight": _NAN, "pseudo_label": -1, "confidence": _NAN,
    "threshold": _NAN, "teacher_share": _NAN, "teacher_top1": -1, "teacher_top2": -1,
    "teacher_p1": _NAN, "teacher_p2": _NAN, "student_pred": -1, "student_conf": _NAN,
    "web_label": None, "web_class": -1, "knn_agree": _NAN,
}
_LEDGER_REQUIRED = ("id", "kept", "reason")


class GalleryError(ValueError):
    """A run directory the gallery cannot read (unreadable ledger, ...); the message says which."""


# ============================================================================================
# reading a run
# ============================================================================================
def _read_ledgers(selection_dir: Path) -> dict[str, np.ndarray]:
    """All ledgers concatenated (oldest epoch first), one numpy array per column."""
    parts: list[dict[str, np.ndarray]] = []
    for epoch, path in ledgers_in(selection_dir):
        try:
            t = pq.read_table(path)
        except Exception as exc:
            raise GalleryError(f"{path}: unreadable ledger ({type(exc).__name__}: {exc})") from None
        missing = [c for c in _LEDGER_REQUIRED if c not in t.column_names]
        if missing:
            raise GalleryError(f"{path}: ledger lacks column(s) {missing}")
        n = t.num_rows
        cols: dict[str, np.ndarray] = {
            "id": np.asarray(t["id"].to_pylist(), dtype=object),
            "kept": np.asarray(t["kept"].to_numpy(zero_copy_only=False), dtype=bool),
            "reason": np.asarray(t["reason"].to_pylist(), dtype=object),
            "epoch": (np.asarray(t["epoch"].to_numpy(zero_copy_only=False), dtype=np.int64)
                      if "epoch" in t.column_names else np.full(n, epoch, dtype=np.int64)),
        }
        for name, default in _LEDGER_DEFAULTS.items():
            if name not in t.column_names:
                cols[name] = np.full(n, default, dtype=object if default is None or isinstance(default, str)
                                     else type(default))
            elif isinstance(default, str) or default is None:
                cols[name] = np.asarray(t[name].to_pylist(), dtype=object)
            else:
                col = t[name]
                if col.null_count:
                    col = pc.fill_null(col, default)
                arr = col.to_numpy(zero_copy_only=False)
                cols[name] = np.asarray(arr, dtype=np.float64 if isinstance(default, float) else np.int64)
        parts.append(cols)
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run_classes(run_dir: str | Path, classes: Sequence[str] | None = None) -> list[str]:
    """Teacher class names: given, else `data.classes` of the run's resolved config.yaml."""
    return _run_classes(RunPaths(Path(run_dir)), classes)


def _run_classes(paths: RunPaths, classes: Sequence[str] | None) -> list[str]:
    """Teacher class names: given, else `data.classes` of the run's resolved config.yaml."""
    if classes is not None:
        return [str(c) for c in classes]
    if paths.config.exists():
        try:
            raw = yaml.safe_load(paths.config.read_text()) or {}
            return [str(c) for c in (raw.get("data") or {}).get("classes") or []]
        except (yaml.YAMLError, AttributeError, OSError) as exc:
            log.warning("%s: cannot read data.classes (%s); showing class numbers", paths.config, exc)
    return []


@dataclass
class ClassCount:
    """Kept / rejected of one class (a pseudo-label or a web query) and its top rejection reasons."""

    key: int | str
    name: str
    kept: int
    rejected: int
    reasons: list[tuple[str, int]]


@dataclass
class RunData:
    """Everything the page and the text summary show, read once from a run directory."""

    root: Path
    classes: list[str]
    epochs: list[int]
    items: dict[str, np.ndarray]          # newest decision per image, manifest order; see load_run
    history: dict[str, list[int]]         # id -> flat [epoch, kept, reason index, ...]
    detail: dict[str, list]               # id -> flat [pseudo-label, confidence, threshold, weight, ...] per epoch
    reasons: list[str]                    # reason codes; items["reason"] indexes into it
    uri: dict[str, str]                   # id -> uri / caption / url from the manifest
    caption: dict[str, str | None]
    url: dict[str, str | None]
    dup_of: dict[str, str]                # near-duplicate member id -> representative id
    manifest_rows: dict[str, int]         # id -> manifest row
    status: Counter
    quarantine: Counter
    overrides: dict[str, str]             # id -> action of the store
    labels: dict[str, str | None] = field(default_factory=dict)   # id -> corrected label (None: off-class)
    overrides_error: str | None = None
    student_source: str | None = None     # the exported student whose predictions are shown

    @property
    def n(self) -> int:
        return len(self.items.get("id", ()))

    def class_name(self, k: int) -> str:
        if 0 <= k < len(self.classes):
            return self.classes[k]
        return "(none)" if k < 0 else f"class {k}"


def load_run(run_dir: str | Path, classes: Sequence[str] | None = None) -> RunData:
    """Read manifest, quarantine, every ledger and the overrides store of a run directory."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise GalleryError(f"{paths.root}: no such run directory")
    names = _run_classes(paths, classes)

    uri: dict[str, str] = {}
    caption: dict[str, str | None] = {}
    url: dict[str, str | None] = {}
    dup_of: dict[str, str] = {}
    rows: dict[str, int] = {}
    status: Counter = Counter()
    if paths.manifest.exists():
        t = pq.read_table(paths.manifest, columns=["id", "uri", "caption", "url", "status", "dup_of"])
        c = {k: t[k].to_pylist() for k in t.column_names}
        for r, (i, u, cap, ur, st, d) in enumerate(zip(c["id"], c["uri"], c["caption"], c["url"],
                                                        c["status"], c["dup_of"])):
            rows[i], uri[i], caption[i], url[i] = r, u, cap, ur
            status[st] += 1
            if st == NEAR_DUPLICATE and d:
                dup_of[i] = d
    quarantine = Counter(q.reason for q in load_quarantine(paths.quarantine))

    overrides, labels, ov_err = {}, {}, None
    try:
        entries = load_entries(paths.overrides)
        overrides = {i: e["action"] for i, e in entries.items()}
        labels = {i: e["label"] for i, e in entries.items() if "label" in e}
    except ValueError as exc:  # a broken store must not stop the review page
        ov_err = str(exc)
        log.warning("overrides store unreadable: %s", exc)

    L = _read_ledgers(paths.selection_dir)
    epochs = [e for e, _ in paths.ledgers()]
    reasons = list(REASONS)
    history: dict[str, list[int]] = defaultdict(list)
    detail: dict[str, list] = defaultdict(list)
    items: dict[str, np.ndarray] = {}
    student_source = None
    if L:
        extra = sorted({str(r) for r in L["reason"]} - set(reasons))
        reasons += extra
        rmap = {r: k for k, r in enumerate(reasons)}
        r_idx = np.fromiter((rmap[str(r)] for r in L["reason"]), dtype=np.int64, count=len(L["reason"]))
        order = np.argsort(L["epoch"], kind="stable")          # oldest epoch first
        latest: dict[str, int] = {}
        for j in order.tolist():
            i = L["id"][j]
            latest[i] = j                                       # a newer epoch overwrites
            history[i] += (int(L["epoch"][j]), int(L["kept"][j]), int(r_idx[j]))
            detail[i] += (int(L["pseudo_label"][j]), *(_round(L[c][j]) for c in ("confidence", "threshold", "weight")))
        cur = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
        pos = np.array([rows.get(L["id"][j], 1 << 40) for j in cur.tolist()], dtype=np.int64)
        cur = cur[np.lexsort((L["row"][cur], pos))]             # manifest order, then ledger row
        items = {k: v[cur] for k, v in L.items()}
        items["reason_idx"] = r_idx[cur]
        student_source = _student_predictions(paths, L, order, items)
        unknown = sum(1 for i in items["id"] if i not in rows)
        if unknown and rows:
            log.warning("%d ledger ids are not in the manifest (ledger from another run?)", unknown)
    return RunData(root=paths.root, classes=names, epochs=epochs, items=items, history=dict(history),
                   detail=dict(detail), reasons=reasons, uri=uri, caption=caption, url=url, dup_of=dup_of,
                   manifest_rows=rows, status=status, quarantine=quarantine, overrides=overrides, labels=labels,
                   overrides_error=ov_err, student_source=student_source)


def _round(v: Any, nd: int = 3) -> float | None:
    v = float(v)
    return None if v != v else round(v, nd)


def _student_predictions(paths: RunPaths, L: dict[str, np.ndarray], order: np.ndarray,
                         items: dict[str, np.ndarray]) -> str | None:
    """Fill items' student_pred / student_conf / student_epoch (see the module docstring);
    returns the exported student's name when its predictions are used."""
    newest: dict[str, int] = {}                     # id -> newest ledger row with a student prediction
    for j in order[L["student_pred"][order] >= 0].tolist():
        newest[L["id"][j]] = j
    sp, sc = items["student_pred"].copy(), items["student_conf"].copy()
    se = np.where(sp >= 0, items["epoch"], -2)
    for k, i in enumerate(items["id"].tolist()):
        j = newest.get(i)
        if sp[k] < 0 and j is not None:
            sp[k], sc[k], se[k] = L["student_pred"][j], L["student_conf"][j], L["epoch"][j]
    source = None
    if paths.student_predictions.exists():
        try:
            t = pq.read_table(paths.student_predictions)
        except Exception as exc:  # a broken file must not stop the review page
            log.warning("%s unreadable (%s); showing ledger predictions", paths.student_predictions, exc)
        else:
            meta = t.schema.metadata or {}
            source = meta.get(b"webkd_source", b"export").decode("utf-8", "replace")
            pred = dict(zip(t["id"].to_pylist(), zip(t["student_pred"].to_pylist(), t["student_conf"].to_pylist())))
            for k, i in enumerate(items["id"].tolist()):
                if i in pred:
                    sp[k], sc[k], se[k] = pred[i][0], pred[i][1], -1
    items["student_pred"], items["student_conf"], items["student_epoch"] = sp, sc, se
    return source


# ============================================================================================
# summary (the page's top table and `webkd inspect`)
# ============================================================================================
def _class_counts(keys: Sequence, names: dict, kept: np.ndarray, reasons: Sequence[str]) -> list[ClassCount]:
    k_count: Counter = Counter()
    r_count: Counter = Counter()
    why: dict[Any, Counter] = defaultdict(Counter)
    for key, k, r in zip(keys, kept.tolist(), reasons):
        if k:
            k_count[key] += 1
        else:
            r_count[key] += 1
            why[key][r] += 1
    out = [ClassCount(key=key, name=names[key], kept=k_count[key], rejected=r_count[key],
                      reasons=why[key].most_common(3))
           for key in set(k_count) | set(r_count)]
    return sorted(out, key=lambda c: (c.key if isinstance(c.key, int) else 0, str(c.name)))


@dataclass
class RunSummary:
    """Counts of a run: records, quarantine, newest decisions per class, reasons, overrides.
    The totals are `selection.counts.count_run`'s (the model card and the artifacts read the
    same); the class tables and reasons cover train rows (validation rows are not rejections)."""

    root: Path
    records: int
    status: dict[str, int]
    quarantine: dict[str, int]                # quarantined at ingest, by reason
    epochs: list[int]
    images: int                               # rows with a decision = kept + rejected + validation
    kept: int
    rejected: int
    validation: int
    validation_scored: int
    near_duplicates: int
    by_pseudo: list[ClassCount]
    by_query: list[ClassCount]
    reasons: list[tuple[str, int]]            # rejection reasons, most common first
    groups: int                               # near-duplicate groups
    group_members: int
    overrides: dict[str, int]                 # action -> count in the store
    overrides_error: str | None = None
    in_class: QueryShare = QueryShare(0, 0, float("nan"))    # train rows of in-class web queries
    off_class: QueryShare = QueryShare(0, 0, float("nan"))   # ... of off-class ones
    collapsed: list[Collapse] = field(default_factory=list)  # classes that lost their kept images
    class_names: list[str] = field(default_factory=list)

    def collapse_lines(self) -> list[str]:
        """One line per class that lost (nearly) all its kept images (`selection.counts`)."""
        def name(k: int) -> str:
            return self.class_names[k] if 0 <= k < len(self.class_names) else f"class {k}"
        return [c.line(name(c.pseudo_label)) for c in self.collapsed]

    def text(self) -> str:
        """A plain-text report (control characters from web strings made visible)."""
        p = _printable
        out = [f"run: {p(str(self.root))}"]
        st = ", ".join(f"{p(k)} {v}" for k, v in sorted(self.status.items()))
        out.append(f"records: {self.records}" + (f" ({st})" if st else ""))
        q = ", ".join(f"{p(k)} {v}" for k, v in sorted(self.quarantine.items(), key=lambda kv: -kv[1]))
        out.append(f"quarantined at ingest: {sum(self.quarantine.values())}" + (f" ({q})" if q else ""))
        if not self.epochs:
            out.append("ledgers: none yet (run selection / distill first)")
        else:
            out.append(f"ledgers: {len(self.epochs)} (epochs {self.epochs[0]}..{self.epochs[-1]}); "
                       f"newest decision of {self.images} images: kept {self.kept}, rejected {self.rejected}, "
                       f"validation {self.validation} ({self.validation_scored} scored)")
            for title, rows in (("by pseudo-label", self.by_pseudo), ("by web query", self.by_query)):
                out.append(f"  {title:<28} {'kept':>7} {'rejected':>9}  top reasons")
                for c in rows:
                    name = p(c.name)
                    name = name if len(name) <= 28 else name[:27] + "~"
                    why = ", ".join(f"{p(r)} {n}" for r, n in c.reasons)
                    out.append(f"  {name:<28} {c.kept:>7} {c.rejected:>9}  {why}")
            top = ", ".join(f"{p(r)} {n}" for r, n in self.reasons[:6])
            out.append(f"top rejection reasons: {top or '-'}")
            out.append(query_shares_line(self.in_class, self.off_class))
            out += [f"warning: {p(line)}" for line in self.collapse_lines()]
        out.append(f"near-duplicates: {self.near_duplicates} in {self.groups} groups ({self.group_members} members)")
        ov = ", ".join(f"{a} {n}" for a, n in sorted(self.overrides.items()))
        out.append(f"overrides: {sum(self.overrides.values())}" + (f" ({ov})" if ov else ""))
        if self.overrides_error:
            out.append(f"  warning: {p(self.overrides_error)}")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        def cc(rows: list[ClassCount]) -> list[dict[str, Any]]:
            return [{"key": c.key, "name": c.name, "kept": c.kept, "rejected": c.rejected,
                     "reasons": c.reasons} for c in rows]
        return {"records": self.records, "status": self.status, "quarantine": self.quarantine,
                "epochs": self.epochs, "images": self.images, "kept": self.kept,
                "rejected": self.rejected, "validation": self.validation,
                "validation_scored": self.validation_scored, "near_duplicates": self.near_duplicates, "by_pseudo": cc(self.by_pseudo), "by_query": cc(self.by_query),
                "reasons": self.reasons, "groups": self.groups, "group_members": self.group_members,
                "overrides": self.overrides,
                "shares_line": query_shares_line(self.in_class, self.off_class),
                "query_shares": {k: {"images": q.images, "kept": q.kept, "share": _num(q.share),
                                     "mean_weight": _num(q.mean_weight)}
                                 for k, q in (("in_class", self.in_class), ("off_class", self.off_class))},
                "collapsed": [{"class": c.pseudo_label, "epoch": c.epoch, "start": c.start,
                               "kept": c.kept, "last": c.last, "line": line}
                              for c, line in zip(self.collapsed, self.collapse_lines())]}


def _num(v: float) -> float | None:
    return None if v != v else round(float(v), 4)


def _printable(s: str) -> str:
    """Web strings go to a terminal: show control / escape characters as \\x.. escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def summarize(data: RunData) -> RunSummary:
    it = data.items
    train = np.asarray(it.get("split", np.zeros(0, dtype=object)), dtype=object) != "val"
    kept = it.get("kept", np.zeros(0, dtype=bool))[train]
    reasons = [data.reasons[k] for k in it.get("reason_idx", np.zeros(0, dtype=np.int64))[train].tolist()]
    pl = it.get("pseudo_label", np.zeros(0, dtype=np.int64))[train].tolist()
    wl = ["(none)" if w is None else str(w) for w in np.asarray(it.get("web_label", []), dtype=object)[train]]
    by_pseudo = _class_counts(pl, {k: data.class_name(k) for k in set(pl)}, kept, reasons)
    by_query = _class_counts(wl, {w: w for w in set(wl)}, kept, reasons)
    rej = Counter(r for r, k in zip(reasons, kept.tolist()) if not k)
    c = count_run(data.root)
    return RunSummary(
        root=data.root, records=c.records, status=dict(data.status),
        quarantine=c.quarantine, epochs=c.epochs, images=c.images, kept=c.kept, rejected=c.rejected,
        validation=c.validation, validation_scored=c.validation_scored, near_duplicates=c.near_duplicates,
        by_pseudo=by_pseudo,
        by_query=by_query, reasons=rej.most_common(), groups=len(set(data.dup_of.values())),
        group_members=len(data.dup_of), overrides=dict(Counter(data.overrides.values())),
        overrides_error=data.overrides_error, in_class=c.in_class, off_class=c.off_class,
        collapsed=c.collapsed, class_names=list(data.classes))


def summarize_run(run_dir: str | Path, classes: Sequence[str] | None = None) -> RunSummary:
    """The text summary behind `webkd inspect` (see RunSummary.text)."""
    return summarize(load_run(run_dir, classes))


# ============================================================================================
# the page
# ============================================================================================
