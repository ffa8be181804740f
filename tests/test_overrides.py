"""The overrides store (selection/overrides.py): round trip, merge, remove, bad files, apply."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from webkd.selection.overrides import (OverridesError, apply_overrides, import_overrides_file, load_entries,
                                 load_overrides, record_overrides)

A, B, C, V = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def test_store_round_trip_and_format(tmp_path):
    store = tmp_path / "run" / "overrides.json"
    assert load_overrides(store) == {}                       # no store yet
    ch = record_overrides(store, accept=[A], reject=[B], note="checked by hand")
    assert ch.added == {A: "accept", B: "reject"} and ch.total == 2
    assert load_overrides(store) == {A: "accept", B: "reject"}
    doc = json.loads(store.read_text())                      # the documented format, exactly
    assert doc["version"] == 1 and set(doc) == {"version", "entries"}
    assert doc["entries"][A]["action"] == "accept" and doc["entries"][A]["note"] == "checked by hand"
    assert doc["entries"][B]["time"].endswith("+00:00")      # ISO 8601, UTC
    assert not list(store.parent.glob(".overrides.json.*"))  # no temp file left behind


def test_merge_later_call_wins_and_remove(tmp_path):
    store = tmp_path / "overrides.json"
    record_overrides(store, accept=[A, B])
    ch = record_overrides(store, reject=[B, C])
    assert ch.changed == {B: ("accept", "reject")} and ch.added == {C: "reject"}
    assert load_overrides(store) == {A: "accept", B: "reject", C: "reject"}
    ch = record_overrides(store, reject=[C])
    assert ch.unchanged == {C: "reject"} and not ch.any
    ch = record_overrides(store, remove=[A, V])
    assert ch.removed == {A: "accept"} and ch.missing == [V] and ch.total == 2
    assert load_overrides(store) == {B: "reject", C: "reject"}
    assert any("removed" in line for line in ch.lines())
    with pytest.raises(OverridesError, match="more than one action"):
        record_overrides(store, accept=[A], reject=[A])
    with pytest.raises(OverridesError, match="non-empty string"):
        record_overrides(store, accept=[""])


def test_concurrent_writers_keep_every_entry(tmp_path):
    store = tmp_path / "overrides.json"
    ids = [f"{k:064x}" for k in range(40)]

    def work(part):
        for i in part:
            record_overrides(store, reject=[i])

    threads = [threading.Thread(target=work, args=(ids[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load_overrides(store) == {i: "reject" for i in ids}


def test_import_gallery_export(tmp_path):
    store = tmp_path / "overrides.json"
    record_overrides(store, accept=[A])
    export = tmp_path / "export.json"    # as the page writes it (entries only need "action")
    export.write_text(json.dumps({"version": 1, "entries": {A: {"action": "reject"}, B: {"action": "accept", "note": "n"}}}))
    ch = import_overrides_file(store, export)
    assert ch.changed == {A: ("accept", "reject")} and ch.added == {B: "accept"}
    e = load_entries(store)
    assert e[B]["note"] == "n" and e[A]["note"] == "imported from export.json" and e[A]["time"]


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level must be a JSON object"),
    ('{"version": 2, "entries": {}}', "unsupported version 2"),
    ('{"version": 1}', "missing 'entries'"),
    ('{"version": 1, "entries": []}', "'entries' must be an object"),
    ('{"version": 1, "entries": {"x": "reject"}}', "must be an object with an 'action'"),
    ('{"version": 1, "entries": {"x": {"action": "keep"}}}', "unknown action 'keep'"),
    ('{"version": 1, "entries": {"x": {}}}', "unknown action None"),
    ('{"version": 1, "entries": {"x": {"action": "accept", "note": 3}}}', "'note' must be a string"),
    ('{"version": 1, "entries": {"": {"action": "accept"}}}', "non-empty string"),
    ('{"version": 1, "entries": {}, "extra": 1}', "unknown top-level key"),
])
def test_bad_files_give_clear_errors_and_change_nothing(tmp_path, content, match):
    store = tmp_path / "overrides.json"
    record_overrides(store, reject=[A])
    before = store.read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(OverridesError, match=match) as info:
        import_overrides_file(store, bad)
    assert "bad.json" in str(info.value)                       # the message names the file
    assert store.read_bytes() == before
    with pytest.raises(OverridesError, match="no such file"):
        import_overrides_file(store, tmp_path / "missing.json")
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(OverridesError, match="not UTF-8|not valid JSON"):
        import_overrides_file(store, bad)


def test_broken_store_is_an_error_not_an_empty_store(tmp_path):
    store = tmp_path / "overrides.json"
    store.write_text('{"version": 1, "entries": {"x": {"action": "maybe"}}}')
    with pytest.raises(OverridesError, match="unknown action 'maybe'"):
        load_overrides(store)
    with pytest.raises(OverridesError):                        # never silently overwritten
        record_overrides(store, accept=[A])


def test_apply_semantics():
    ids = [A, B, C, V, "e" * 64]
    keep = np.array([True, False, True, False, False])
    reason = np.array(["selected", "low_confidence", "selected", "validation", "near_duplicate"])
    ov = {A: "reject", B: "accept", V: "accept", "e" * 64: "accept", "zz": "reject"}
    k2, r2 = apply_overrides(keep, reason, ids, ov)
    assert k2.tolist() == [False, True, True, False, True]
    assert r2.tolist() == ["override", "override", "selected", "validation", "override"]
    assert keep.tolist() == [True, False, True, False, False]   # inputs untouched
    assert reason[0] == "selected" and r2.dtype.kind == "U"
    k3, r3 = apply_overrides(keep, reason.astype(object), ids, {})
    assert (k3 == keep).all() and list(r3) == list(reason)
    with pytest.raises(ValueError, match="row-aligned"):
        apply_overrides(keep[:2], reason, ids, ov)
    with pytest.raises(OverridesError, match="unknown override action"):
        apply_overrides(keep, reason, ids, {A: "keep"})


# --------------------------------------------------------------------------------------------
# hostile input (issue 12, item 11): escape sequences in ids are shown, not executed; a
# 100k-deep JSON file is one clear line, not a RecursionError
# --------------------------------------------------------------------------------------------
EVIL = "\x1b[2J\x1b]0;owned\x07" + "e" * 8 + "\u202e\x00"     # clear screen, set title, bidi, NUL


def test_ids_with_escape_sequences_are_echoed_as_text(tmp_path, capsys):
    from webkd.flows.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    store = run / "overrides.json"
    lines = "\n".join(record_overrides(store, reject=[EVIL], note="\x1b[31mred note").lines())
    assert "\x1b" not in lines and "\\x1b[2J\\x1b]0;owned\\x07" in lines and "\\u202e\\x00" in lines
    assert load_overrides(store) == {EVIL: "reject"}                # stored as given, only the echo escapes

    for argv in (["override", str(run), "--accept", EVIL, "--note", "\x1b[5mblink"],   # record + warning
                 ["override", str(run)],                                               # list the store
                 ["override", str(run), "--accept", EVIL, "--reject", EVIL]):          # an error line
        main(argv)
        out = capsys.readouterr()
        text = out.out + out.err
        assert not any(not (c.isprintable() or c == "\n") for c in text), repr(text)
        assert "\\x1b[2J" in text, (argv, text)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("content", [
    _nested(100_000),                                                       # the issue's file
    '{"version": 1, "entries": {"x": {"action": "accept", "note": ' + _nested(100_000) + "}}}",
    '{"version": 1, "entries": ' + "{" * 50_000,                             # deep and unbalanced
])
def test_deeply_nested_json_is_one_clear_line(tmp_path, capsys, content):
    from webkd.flows.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    deep = tmp_path / "deep.json"
    deep.write_text(content)
    with pytest.raises(OverridesError, match=r"deep\.json: JSON nested more than \d+ levels deep") as info:
        import_overrides_file(run / "overrides.json", deep)
    assert "gallery" in str(info.value) and not (run / "overrides.json").exists()
    assert main(["override", str(run), str(deep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deep.json" in err[0] and "nested" in err[0]
    (run / "overrides.json").write_text(content)                    # the store itself: same line
    with pytest.raises(OverridesError, match="overrides.json: JSON nested"):
        load_overrides(run / "overrides.json")


def test_a_legitimate_store_is_not_too_deep(tmp_path):
    store = tmp_path / "overrides.json"
    store.write_text(json.dumps({"version": 1, "entries": {"[{x": {"action": "accept", "note": "]]]{{{[[["}}}))
    assert load_overrides(store) == {"[{x": "accept"}             # brackets inside strings do not count


def test_relabel_entries_round_trip_apply_and_page_decisions(tmp_path):
    from webkd.selection.overrides import apply_labels, load_labels, record_page_decisions
    from webkd.training.pool import pool_state

    store = tmp_path / "overrides.json"
    ch = record_overrides(store, accept=[A], relabel={A: "pants", B: None, C: "shoes"})
    assert ch.added == {A: "accept -> pants", B: "relabel -> off-class", C: "relabel -> shoes"}
    doc = json.loads(store.read_text())
    assert doc["entries"][B] == {"action": "relabel", "label": None, "note": "", "time": doc["entries"][B]["time"]}
    assert load_overrides(store) == {A: "accept", B: "relabel", C: "relabel"}
    assert load_labels(store) == {A: "pants", B: None, C: "shoes"}
    # a relabel forces no decision; accept still does
    keep, reason = apply_overrides(np.array([False, True, False]), np.array(["below_class_threshold", "selected", "off_class"]),
                                   [A, B, C], load_overrides(store))
    assert keep.tolist() == [True, True, False] and reason.tolist() == ["override", "selected", "off_class"]
    rows, cls = apply_labels([C, V, B, A], load_labels(store), ["t-shirt", "pants", "shoes"])
    assert dict(zip(rows.tolist(), cls.tolist())) == {0: 2, 2: -1, 3: 1}
    with pytest.raises(OverridesError, match=r"label\(s\) \['shoes'\] are not classes"):
        apply_labels([C], load_labels(store), ["t-shirt", "pants"])
    # a label change changes what a student is trained on; no labels: the digest of before
    s0 = pool_state([A, B], {A: "accept"}, "f")
    assert s0 == pool_state([A, B], {A: "accept"}, "f", {})
    assert pool_state([A, B], {A: "accept"}, "f", {A: "pants"}) != pool_state([A, B], {A: "accept"}, "f", {A: "shoes"})
    # what a served page sends: validated whole, then merged
    ch = record_page_decisions(store, {"entries": {V: {"action": "reject"}}, "remove": [C]})
    assert ch.added == {V: "reject"} and ch.removed == {C: "relabel -> shoes"}
    with pytest.raises(OverridesError, match="needs a 'label'"):
        record_page_decisions(store, {"entries": {A: {"action": "relabel"}}})
    with pytest.raises(OverridesError, match="'label' must be a class name"):
        record_page_decisions(store, {"entries": {A: {"action": "relabel", "label": 3}}})
    assert set(load_overrides(store)) == {A, B, V}


def test_override_cli_relabel(tmp_path, capsys):
    from webkd.flows.__main__ import main
    from webkd.selection.overrides import load_labels

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps({"data": {"classes": ["t-shirt", "pants"]}}))
    assert main(["override", str(run), "--relabel", f"{A}=pants", f"{B}=off-class", "--reject", B]) == 0
    out = capsys.readouterr().out
    assert f"+ relabel -> pants {A}" in out and f"+ reject -> off-class {B}" in out
    assert load_labels(run / "overrides.json") == {A: "pants", B: None}
    assert main(["override", str(run), "--relabel", f"{C}=hat"]) == 2
    assert "'hat' is not a class of this run (t-shirt, pants, or off-class)" in capsys.readouterr().err
    assert main(["override", str(run), "--relabel", "nolabel"]) == 2
    assert "expected ID=CLASS" in capsys.readouterr().err
