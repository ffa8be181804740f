"""The index at scale (pipeline/index_stage.py) on embeddings of real images (PACS): past the size
threshold an IVF-PQ index trained on a sample; a grown pool extends the saved index with only the
new rows (no retraining, old rows' search results unchanged); a pool grown past the retrain factor
is trained again; recall@10 against brute force is reported; memory-mapped loading; a kill between
the index file and its sidecar rebuilds instead of trusting a stale sidecar."""
from __future__ import annotations

import hashlib
import shutil

import faiss
import numpy as np
import pytest
from PIL import Image

from webkd.pipeline import index as ix
from webkd.pipeline.config import IndexConfig, RunPaths
from webkd.pipeline.index_stage import exact_knn_blocked, index_run
from webkd.pipeline.records import Record, save_manifest
from webkd.pipeline.storage import atomic_save_npy, read_json

KEY = "pix"
CFG = IndexConfig(flat_max=200, ivfpq_min=1000, nprobe=8, near_dup_threshold=None, recall_queries=300,
                  retrain_factor=2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def pool(pacs32):
    """(records, float16 embeddings) of 2,600 real PACS images: 8x8 RGB thumbnails, standardised
    per image (192 dims); ids are sha256 of the PNG bytes."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(pacs32.images), 2600, replace=False)
    recs, vecs = [], []
    for j, i in enumerate(pick):
        img = Image.fromarray(pacs32.images[i])
        v = np.asarray(img.resize((8, 8), Image.BILINEAR), np.float32).ravel()
        vecs.append((v - v.mean()) / (v.std() + 1e-3))
        cid = hashlib.sha256(pacs32.images[i].tobytes() + j.to_bytes(4, "little")).hexdigest()
        recs.append(Record(id=cid, uri=f"pacs/{i}.png", source="folder:pacs", web_label="q", web_labels=["q"],
                           width=32, height=32, format="PNG", mode="RGB"))
    return recs, np.stack(vecs).astype(np.float16)


def _write(paths: RunPaths, recs, emb, n: int) -> None:
    save_manifest(paths.manifest, recs[:n])
    atomic_save_npy(paths.features(KEY), emb[:n])


def _centroids(index) -> tuple[np.ndarray, np.ndarray]:
    ivf = faiss.extract_index_ivf(index)
    coarse = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    pq = faiss.vector_to_array(faiss.downcast_index(ivf).pq.centroids)
    return coarse, pq


def _search_old_rows(index, q: np.ndarray, n_old: int, k: int = 10):
    """k-NN restricted to ids < n_old (the old rows) through a FAISS id selector."""
    sel = faiss.IDSelectorRange(0, n_old)
    params = ivf = faiss.SearchParametersIVF(sel=sel, nprobe=CFG.nprobe)
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):     # fast-scan IVF-PQ + exact re-ranking: the selector goes to the IVF
        params = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor, base_index_params=ivf)
    return index.search(q, k, params=params)


def test_refresh_extends_index_and_old_rows_search_the_same(tmp_path, pool):
    recs, emb = pool
    paths = RunPaths(tmp_path / "run")

    _write(paths, recs, emb, 1200)
    first = index_run(paths, KEY, CFG)
    assert first.factory.startswith("IVF") and ",PQ" in first.factory     # past ivfpq_min: IVF-PQ
    assert first.action == "build" and first.added == 1200
    assert first.recall is not None and first.recall["queries"] == 300
    assert 0.3 < first.recall["recall_at_10"] <= 1.0, first.recall
    assert "recall@10" in str(first)
    old = ix.load_index(paths.index(KEY), nprobe=CFG.nprobe)
    center = ix.load_index_center(paths.index(KEY))
    q = ix.index_vectors(emb[:1200:7], center)                          # old rows as queries
    s_old, i_old = old.search(q, 10)
    coarse_old, pq_old = _centroids(old)

    # refresh: 300 new rows -> the saved index is extended, not trained again
    _write(paths, recs, emb, 1500)
    second = index_run(paths, KEY, CFG)
    assert second.action == "extend" and second.added == 300
    meta = read_json(ix.index_meta_path(paths.index(KEY)))
    assert meta["trained_rows"] == 1200 and meta["rows"] == 1500 and meta["factory"] == first.factory
    grown = ix.load_index(paths.index(KEY), nprobe=CFG.nprobe)
    assert grown.ntotal == 1500
    coarse, pq = _centroids(grown)
    np.testing.assert_array_equal(coarse, coarse_old)                    # same trained quantisers
    np.testing.assert_array_equal(pq, pq_old)
    np.testing.assert_array_equal(ix.load_index_center(paths.index(KEY)), center)  # same centring
    s_new, i_new = _search_old_rows(grown, q, 1200)
    np.testing.assert_array_equal(i_new, i_old)                          # old rows: same results
    np.testing.assert_array_equal(s_new, s_old)
    # the new rows are findable: each new row finds itself (PQ codes are lossy: most, not all)
    _, self_ids = grown.search(ix.index_vectors(emb[1200:1500], center), 10)
    assert np.mean([r in row for r, row in zip(range(1200, 1500), self_ids)]) > 0.9
    # nothing new: nothing rebuilt or rewritten
    assert index_run(paths, KEY, CFG).up_to_date

    # grown past retrain_factor x the 1200 rows it was trained on: trained again on the pool
    _write(paths, recs, emb, 2600)
    third = index_run(paths, KEY, CFG)
    assert third.action == "build" and third.added == 2600
    assert read_json(ix.index_meta_path(paths.index(KEY)))["trained_rows"] == 2600


def test_kill_between_index_and_sidecar_rebuilds(tmp_path, pool):
    recs, emb = pool
    paths = RunPaths(tmp_path / "run")
    _write(paths, recs, emb, 1200)
    index_run(paths, KEY, CFG)
    meta_path = ix.index_meta_path(paths.index(KEY))
    stale = tmp_path / "stale.json"
    shutil.copy(meta_path, stale)
    _write(paths, recs, emb, 1400)
    assert index_run(paths, KEY, CFG).action == "extend"
    shutil.copy(stale, meta_path)          # as if killed after the index file, before its sidecar
    _write(paths, recs, emb, 1500)
    again = index_run(paths, KEY, CFG)     # 1400 vectors in the file, the sidecar says 1200
    assert again.action == "build" and ix.load_index(paths.index(KEY)).ntotal == 1500


def test_settings_change_rebuilds_and_nprobe_does_not(tmp_path, pool):
    recs, emb = pool
    paths = RunPaths(tmp_path / "run")
    _write(paths, recs, emb, 1100)
    index_run(paths, KEY, CFG)
    _write(paths, recs, emb, 1150)
    assert index_run(paths, KEY, CFG.model_copy(update={"nprobe": 4})).action == "extend"
    _write(paths, recs, emb, 1200)
    assert index_run(paths, KEY, CFG.model_copy(update={"center": False})).action == "build"


def test_memory_mapped_load_searches_the_same(tmp_path, pool):
    recs, emb = pool
    paths = RunPaths(tmp_path / "run")
    _write(paths, recs, emb, 1200)
    index_run(paths, KEY, CFG)
    path = paths.index(KEY)
    q = ix.index_vectors(emb[:50], ix.load_index_center(path))
    full = ix.load_index(path, nprobe=8, mmap_over_mb=1e6)                # small: read into memory
    mapped = ix.load_index(path, nprobe=8, mmap_over_mb=0)                 # past the budget: mapped
    assert faiss.extract_index_ivf(mapped).invlists.__class__ is not faiss.ArrayInvertedLists
    np.testing.assert_array_equal(ix.search(full, q, 10)[1], ix.search(mapped, q, 10)[1])


def test_blocked_exact_search_equals_numpy_brute_force(pool):
    _, emb = pool
    center = emb[:1000].astype(np.float32).mean(0)
    q = ix.index_vectors(emb[:40], center)
    ids = exact_knn_blocked(emb[:1000], center, q, 10, block=128)
    _, ref = ix.brute_force_knn(ix.index_vectors(emb[:1000], center), q, 10)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, ref)]) / 10 > 0.999


def test_neighbors_of_every_row_in_chunks_equals_one_search(tmp_path, pacs32):
    """`training.pool.neighbors_of` (the all-rows k-NN of selection.knn) makes its queries a chunk
    of rows at a time: the same neighbours as one search of every row, itself left out, and the
    same as brute force for most rows (fast-scan IVF-PQ past ivfpq_min, re-ranked exactly)."""
    from types import SimpleNamespace

    import torch

    from webkd.pipeline.features import extract_features
    from webkd.training.pool import NeighborSearch, neighbors_of

    pix = np.ascontiguousarray(pacs32.images[:1500])                 # real PACS photos, 32 px
    paths = RunPaths(tmp_path / "run")
    recs = [Record(id=hashlib.sha256(p.tobytes() + i.to_bytes(4, "little")).hexdigest(), uri=f"pacs/{i}.png",
                   source="folder:pacs", web_label="q", web_labels=["q"], width=32, height=32, format="PNG",
                   mode="RGB") for i, p in enumerate(pix)]
    save_manifest(paths.manifest, recs)
    torch.manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 24)

    def encode(x):   # 8x8 thumbnails, standardised, randomly projected to 24 dims
        t = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        t = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-3)
        return SimpleNamespace(embedding=t @ proj, logits=t[:, :3])

    extract_features(encode, pix, KEY, "thumbs-v1", paths, device="cpu", row_ids=[r.id for r in recs])
    report = index_run(paths, KEY, CFG)
    assert ix.is_fast_scan(report.factory)
    chunked = neighbors_of(paths, NeighborSearch(KEY, k=5, block_size=97))
    whole = neighbors_of(paths, NeighborSearch(KEY, k=5, block_size=10_000))
    np.testing.assert_array_equal(chunked, whole)
    assert chunked.shape == (1500, 5) and not (chunked == np.arange(1500)[:, None]).any()   # never itself
    emb = np.load(paths.features(KEY))
    x = ix.index_vectors(emb, ix.load_index_center(paths.index(KEY)))
    _, exact = ix.brute_force_knn(x, x, 6)
    exact = np.array([[j for j in row if j != i][:5] for i, row in enumerate(exact)])
    assert ix.recall_at_k(chunked, exact) > 0.8
