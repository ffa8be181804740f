"""pipeline/index.py on embeddings of real images (PACS, clothing photos): FAISS vs numpy brute
force, index choice by size and memory, save/load, blocked search, near-duplicate groups of
re-encoded copies, and the index stage on a run directory."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from webkd.pipeline import index as ix
from webkd.pipeline.config import IndexConfig, RunPaths
from webkd.pipeline.index_stage import index_run
from webkd.pipeline.records import QuarantineRow, Record, load_manifest, load_quarantine, save_manifest, save_quarantine
from webkd.pipeline.storage import atomic_save_npy

SIDE = 16  # embeddings are PCA'd 16x16 RGB pixel vectors


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """One OpenMP thread: on the shared 2-core test machine, k-means over PQ sub-vectors (many
    tiny parallel regions) runs ~10x slower with 2 spinning threads than with 1."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


class PixelEmbedder:
    """Deterministic real-image features: 16x16 RGB pixels, per-image standardised (brightness and
    contrast removed), projected on the top principal axes of a reference set of real images."""

    def __init__(self, reference: np.ndarray, dim: int):
        x = self._pixels(reference)
        self.mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.proj = vt[:dim].T  # (768, dim)

    @staticmethod
    def _pixels(images: np.ndarray) -> np.ndarray:
        x = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((SIDE, SIDE), Image.BILINEAR),
                                 dtype=np.float32).ravel() / 255.0 for im in images])  # (N, 768)
        return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-3)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return ((self._pixels(images) - self.mean) @ self.proj).astype(np.float32)  # (N, dim)


@pytest.fixture(scope="module")
def real_images(pacs32, clothing) -> np.ndarray:
    """3,000 real images as 32x32 RGB: PACS (all four domains) and clothing photos."""
    rng = np.random.default_rng(0)
    p = pacs32.images[rng.choice(len(pacs32.images), 2000, replace=False)]
    c = clothing.images[rng.choice(len(clothing.images), 1000, replace=False)]
    c32 = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.LANCZOS)) for im in c])
    return np.concatenate([p, c32])


@pytest.fixture(scope="module")
def embedder(pacs32, clothing) -> PixelEmbedder:
    rng = np.random.default_rng(1)
    ref = [pacs32.images[rng.choice(len(pacs32.images), 800, replace=False)],
           np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.LANCZOS))
                     for im in clothing.images[rng.choice(len(clothing.images), 800, replace=False)]])]
    return PixelEmbedder(np.concatenate(ref), dim=64)


@pytest.fixture(scope="module")
def emb(real_images, embedder) -> np.ndarray:
    return embedder(real_images)  # (3000, 64)


# --------------------------------------------------------------------------------------------
def test_choose_factory_by_size_and_memory():
    cfg = IndexConfig(flat_max=1000, memory_budget_mb=64)
    assert ix.choose_factory(1000, 64, cfg) == "Flat"
    assert ix.choose_factory(40_000, 64, cfg) == "IVF800,Flat"          # 4*sqrt(n)
    assert ix.choose_factory(3000, 64, cfg) == "IVF76,Flat"             # clamped: >= 39 points per list
    big = ix.choose_factory(1_000_000, 128, cfg)                         # 512 MB raw > 64 MB
    nlist, pq = big.split(",")
    assert nlist == "IVF4000" and pq.startswith("PQ") and 128 % int(pq[2:]) == 0
    assert 1_000_000 * int(pq[2:]) <= 64 * 2**20                         # codes fit the budget
    tiny = IndexConfig(flat_max=10_000, memory_budget_mb=0.01)
    assert ix.choose_factory(3000, 64, tiny).startswith("IVF") and "PQ" in ix.choose_factory(3000, 64, tiny)
    assert ix.choose_factory(100, 64, tiny) == "Flat"                    # too few vectors to train PQ
    assert ix.choose_factory(10, 8, IndexConfig(factory="HNSW32")) == "HNSW32"
    with pytest.raises(ValueError):
        ix.choose_factory(0, 64, cfg)


def _tie_rows(scores: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """Rows where two of the reference top-k scores are within tol (order not defined there)."""
    return (np.abs(np.diff(scores, axis=1)) < tol).any(axis=1)


def test_flat_equals_numpy_brute_force(emb):
    k = 10
    index = ix.build_index(emb, IndexConfig())
    assert ix.choose_factory(*emb.shape, IndexConfig()) == "Flat"
    queries = emb[::3]
    s, i = ix.search(index, queries, k)
    bs, bi = ix.brute_force_knn(emb, queries, k)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    exact = (i == bi).all(axis=1)
    ties = _tie_rows(bs)
    # ids agree exactly except where two reference scores are equal to float precision
    assert (exact | ties).all(), np.flatnonzero(~(exact | ties))
    assert exact.mean() > 0.99
    for r in np.flatnonzero(~exact):
        assert set(i[r]) == set(bi[r]) or np.isclose(s[r, -1], bs[r, -1], atol=1e-5)
    assert (i[:, 0] == np.arange(0, len(emb), 3)).mean() > 0.97   # a query finds itself first


def test_ivf_recall_vs_brute_force(emb):
    cfg = IndexConfig(flat_max=500, nprobe=16)
    factory = ix.choose_factory(*emb.shape, cfg)
    assert factory.startswith("IVF") and factory.endswith(",Flat")
    index = ix.build_index(emb, cfg)
    _, approx = ix.search(index, emb, 10)
    _, exact = ix.brute_force_knn(emb, emb, 10)
    recall = ix.recall_at_k(approx, exact)
    assert recall >= 0.95, recall
    ix.set_nprobe(index, 1)  # fewer probes must cost recall, or the IVF path is not being exercised
    assert ix.recall_at_k(ix.search(index, emb, 10)[1], exact) < recall


def test_ivfpq_past_memory_budget_still_searchable(emb):
    cfg = IndexConfig(flat_max=100_000, memory_budget_mb=0.05, nprobe=16)  # 3000*64*4 B = 0.73 MB
    factory = ix.choose_factory(*emb.shape, cfg)
    assert factory == "IVF76,PQ16"  # 16-byte codes: 48 kB, within the 52 kB budget
    index = ix.build_index(emb, cfg)
    assert index.ntotal == len(emb)
    s, i = ix.search(index, emb[:200], 10)
    assert (i >= 0).all() and np.isfinite(s).all()
    _, exact = ix.brute_force_knn(emb, emb[:200], 10)
    assert ix.recall_at_k(i, exact) >= 0.5


def test_fast_scan_ivfpq_past_ivfpq_min_gives_cosines(emb, tmp_path):
    """Past ivfpq_min: 4-bit fast-scan IVF-PQ with exact re-ranking, built with L2 on the unit
    vectors; `search` still returns cosines (the same scores as brute force on the neighbours it
    finds), and the probes and the re-ranking factor travel with the saved file."""
    import faiss

    cfg = IndexConfig(flat_max=500, ivfpq_min=1000, refine_k_factor=4.0)
    factory = ix.choose_factory(*emb.shape, cfg)
    assert factory == "IVF76,PQ32x4fs,RFlat" and ix.is_fast_scan(factory)   # 2 sqrt(3000) -> 3000 // 39; m = 64 / 2
    assert ix.resolve_nprobe(cfg, factory) == ix.FAST_SCAN_NPROBE
    index = ix.build_index(emb, cfg)
    assert index.metric_type == faiss.METRIC_L2 and ix.index_nprobe(index) == ix.FAST_SCAN_NPROBE
    s, i = ix.search(index, emb, 10)
    bs, bi = ix.brute_force_knn(emb, emb, 10)
    recall = ix.recall_at_k(i, bi)
    assert recall >= 0.9, recall
    assert (i[:, 0] == np.arange(len(emb))).mean() > 0.99          # a row finds itself first, at cosine ~1
    np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-4)
    x = ix.normalize(emb)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", x, x[i]), atol=1e-4)   # exact re-ranked cosines
    assert (np.diff(s, axis=1) <= 1e-6).all()                                     # best first
    # fewer candidates re-ranked, fewer probes: lower recall (both settings are live)
    ix.set_nprobe(index, 1)
    ix.set_k_factor(index, 1.0)
    assert ix.recall_at_k(ix.search(index, emb, 10)[1], bi) < recall
    ix.set_nprobe(index, 6)
    ix.set_k_factor(index, 3.0)
    loaded = ix.load_index(ix.save_index(index, tmp_path / "fs.faiss"))
    assert ix.index_nprobe(loaded) == 6 and faiss.downcast_index(loaded).k_factor == 3.0
    np.testing.assert_array_equal(ix.search(loaded, emb[:300], 10)[1], ix.search(index, emb[:300], 10)[1])


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_save_load_round_trip(emb, tmp_path, factory):
    cfg = IndexConfig(factory=factory, nprobe=8)
    index = ix.build_index(emb, cfg)
    path = ix.save_index(index, tmp_path / "index" / "t.faiss")
    assert [p.name for p in path.parent.iterdir()] == ["t.faiss"]  # no temp file left behind
    loaded = ix.load_index(path, nprobe=8)
    a = ix.search(index, emb[:300], 10)
    b = ix.search(loaded, emb[:300], 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(FileNotFoundError, match="webkd index"):
        ix.load_index(tmp_path / "missing.faiss")


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_blocked_search_equals_unblocked(emb, factory):
    index = ix.build_index(emb, IndexConfig(factory=factory, nprobe=4))
    q = emb[:500]
    one = ix.search(index, q, 7, block_size=10_000)
    many = ix.search(index, q, 7, block_size=13)   # 13 < 20: faiss's non-BLAS path for Flat
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_allclose(one[0], many[0], rtol=0, atol=1e-6)
    bf_one = ix.brute_force_knn(emb, q, 7, block_size=10_000)
    bf_many = ix.brute_force_knn(emb, q, 7, block_size=11)
    np.testing.assert_array_equal(bf_one[1], bf_many[1])
    np.testing.assert_array_equal(bf_one[0], bf_many[0])


def test_search_edge_cases(emb):
    index = ix.build_index(emb[:5], IndexConfig())
    s, i = ix.search(index, emb[:2], 8)                  # k larger than the index
    assert (i[:, 5:] == -1).all() and (i[:, :5] >= 0).all()
    bs, bi = ix.brute_force_knn(emb[:5], emb[:2], 8)
    np.testing.assert_array_equal(i, bi)
    with pytest.raises(ValueError, match="dimension"):
        ix.search(index, emb[:2, :10], 3)
    z = ix.normalize(np.array([[0.0, 0.0], [3.0, 4.0], [np.nan, 1.0]]))
    np.testing.assert_allclose(z, [[0, 0], [0.6, 0.8], [0, 1]])
    assert ix.recall_at_k(np.array([[1, 2, -1]]), np.array([[1, 2, 3]])) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# near duplicates of real photos
# --------------------------------------------------------------------------------------------
def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _resized(img: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((side, side), Image.LANCZOS))


def _variants(img: np.ndarray) -> list[np.ndarray]:
    """The same photo as a web crawl finds it again: JPEG q60, JPEG q95, slightly resized."""
    return [_jpeg(img, 60), _jpeg(img, 95), _resized(img, img.shape[0] - 6)]


@pytest.fixture(scope="module")
def dup_pool(clothing, pacs32):
    """Real originals (clothing photos at 64 px, PACS photos at 32 px) with re-encoded and
    resized copies, shuffled; returns (images list, group id per image)."""
    rng = np.random.default_rng(3)
    photo = pacs32.domain_names.index("photo")
    originals = [clothing.images[i] for i in rng.choice(len(clothing.images), 20, replace=False)]
    originals += [pacs32.images[i] for i in rng.choice(np.flatnonzero(pacs32.domains == photo), 20, replace=False)]
    images, group = [], []
    for g, img in enumerate(originals):
        copies = _variants(img) if g % 2 == 0 else []     # half the originals stay singletons
        for im in [img] + copies:
            images.append(im)
            group.append(g)
    order = rng.permutation(len(images))
    return [images[i] for i in order], np.asarray(group)[order]


def test_near_duplicate_groups_of_real_copies(dup_pool, embedder):
    images, group = dup_pool
    e = np.concatenate([embedder(np.stack([im])) for im in images])  # mixed sizes: one at a time
    rep = ix.near_duplicate_groups(e, threshold=0.98, k=10)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        assert (rep[members] == members.min()).all(), f"group {g} not merged: {rep[members]}"
    # distinct photos stay apart: one representative per original
    assert len(np.unique(rep)) == len(np.unique(group))
    assert (rep <= np.arange(len(rep))).all()  # the representative is the earliest row
    # stable when rows are appended: the same reps for old rows, new copies join old groups
    extra = [_jpeg(images[0], 75)]
    rep2 = ix.near_duplicate_groups(np.concatenate([e, embedder(np.stack(extra))]), threshold=0.98)
    np.testing.assert_array_equal(rep2[:len(rep)], rep)
    assert rep2[-1] == rep[0]
    # an IVF-PQ index only proposes candidates; exact cosines decide
    cfg = IndexConfig(factory="IVF4,PQ8x4", nprobe=4)
    pq_rep = ix.near_duplicate_groups(e, 0.98, k=10, index=ix.build_index(e, cfg))
    np.testing.assert_array_equal(pq_rep, rep)


def test_near_duplicate_threshold_matters(dup_pool, embedder):
    images, group = dup_pool
    e = np.concatenate([embedder(np.stack([im])) for im in images])
    assert (ix.near_duplicate_groups(e, threshold=1.01) == np.arange(len(e))).all()  # nothing merges
    assert len(np.unique(ix.near_duplicate_groups(e, threshold=-1.0, k=len(e)))) == 1  # all merge


# --------------------------------------------------------------------------------------------
# the stage on a run directory
# --------------------------------------------------------------------------------------------
def _write_records(root, images, labels, start=0, batch=0) -> list[Record]:
    recs = []
    for j, (img, lab) in enumerate(zip(images, labels)):
        p = root / "web" / lab / f"img_{start + j:04d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, format="JPEG", quality=90)
        data = p.read_bytes()
        recs.append(Record(id=hashlib.sha256(data).hexdigest(), uri=str(p), source=f"folder:{root / 'web'}",
                           web_label=lab, web_labels=[lab], length=len(data), width=img.shape[1],
                           height=img.shape[0], format="JPEG", mode="RGB", batch=batch))
    return recs


def _embed_files(recs, embedder) -> np.ndarray:
    return np.concatenate([embedder(np.stack([np.asarray(Image.open(r.uri).convert("RGB"))])) for r in recs])


def test_index_run_marks_near_duplicates(tmp_path, clothing, embedder):
    paths = RunPaths(tmp_path / "run")
    rng = np.random.default_rng(5)
    pick = rng.choice(len(clothing.images), 12, replace=False)
    imgs = [clothing.images[i] for i in pick]
    labels = [clothing.class_names[clothing.labels[i]] for i in pick]
    # rows 12, 13: copies of rows 2 and 5 (found again under another query)
    imgs += [_jpeg(imgs[2], 60), _resized(imgs[5], 58)]
    labels += ["web_copy", "web_copy"]
    recs = _write_records(paths.root, imgs, labels)
    save_manifest(paths.manifest, recs)
    old = QuarantineRow(uri="x.jpg", source="folder:x", reason="truncated", detail="kept as is")
    save_quarantine(paths.quarantine, [old])
    atomic_save_npy(paths.features("pix"), _embed_files(recs, embedder).astype(np.float16))
    cfg = IndexConfig(near_dup_threshold=0.98, k=5, near_dup_space="embedding", center=False)

    report = index_run(paths, "pix", cfg)
    assert "pix" in str(report) and report.near_duplicates == 2 and report.groups == 2
    man = load_manifest(paths.manifest)
    status = [r.status for r in man]
    assert status == ["ok"] * 12 + ["near_duplicate"] * 2
    assert man[12].dup_of == man[2].id and man[13].dup_of == man[5].id
    q = load_quarantine(paths.quarantine)
    assert sorted((r.reason, r.dup_of) for r in q) == sorted(
        [("truncated", None), ("near_duplicate", man[2].id), ("near_duplicate", man[5].id)])
    loaded = ix.load_index(paths.index("pix"))
    assert loaded.ntotal == 14

    # a re-run changes nothing and adds no second quarantine row
    again = index_run(paths, "pix", cfg)
    assert again.changed == 0 and len(load_quarantine(paths.quarantine)) == 3

    # incremental: an appended copy of row 2 joins row 2's group; row 2 stays the representative
    more = _write_records(paths.root, [_jpeg(imgs[2], 95)], ["late"], start=14, batch=1)
    save_manifest(paths.manifest, man + more)
    atomic_save_npy(paths.features("pix"), _embed_files(man + more, embedder).astype(np.float16))
    index_run(paths, "pix", cfg)
    man = load_manifest(paths.manifest)
    assert man[14].status == "near_duplicate" and man[14].dup_of == man[2].id
    assert len([r for r in load_quarantine(paths.quarantine) if r.reason == "near_duplicate"]) == 3

    # a stricter threshold dissolves the groups: rows reset to ok, quarantine rows go away
    strict = index_run(paths, "pix", IndexConfig(near_dup_threshold=0.999999, k=5, near_dup_space="embedding"))
    assert strict.near_duplicates == 0 and strict.changed == 3
    assert all(r.status == "ok" and r.dup_of is None for r in load_manifest(paths.manifest))
    assert [r.reason for r in load_quarantine(paths.quarantine)] == ["truncated"]


def test_leader_grouping_does_not_chain():
    """a~b and b~c but not a~c: c must not end up in a's group through b."""
    t = np.deg2rad
    vecs = np.array([[1, 0], [np.cos(t(8)), np.sin(t(8))], [np.cos(t(16)), np.sin(t(16))]], np.float32)
    th = float(np.cos(t(10)))              # 8 degrees apart merge, 16 degrees apart do not
    rep = ix.near_duplicate_groups(vecs, th, k=2)
    assert rep.tolist() == [0, 0, 2]


def test_perceptual_vectors_find_real_copies_and_keep_distinct_photos(dup_pool):
    images, group = dup_pool
    size = 32
    pix = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])
    v = ix.perceptual_vectors(pix, side=16)
    assert v.shape == (len(images), 768)
    np.testing.assert_allclose(v.mean(1), 0, atol=1e-4)
    # the hardest copy here (a 32 px photo shrunk by 6 px and blown up again) scores 0.9898;
    # distinct photos score <= 0.67
    rep = ix.near_duplicate_groups(v, threshold=0.985, k=10)
    assert len(np.unique(rep)) == len(np.unique(group))
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        assert len(np.unique(rep[members])) == 1


def test_index_run_pixel_space_and_centring(tmp_path, clothing, embedder):
    paths = RunPaths(tmp_path / "run")
    rng = np.random.default_rng(7)
    imgs = [clothing.images[i] for i in rng.choice(len(clothing.images), 10, replace=False)]
    imgs += [_jpeg(imgs[3], 70)]
    recs = _write_records(paths.root, imgs, ["q"] * len(imgs))
    save_manifest(paths.manifest, recs)
    atomic_save_npy(paths.features("pix"), _embed_files(recs, embedder).astype(np.float16))
    pix = np.stack([np.asarray(Image.open(r.uri).convert("RGB").resize((32, 32), Image.LANCZOS)) for r in recs])
    with pytest.raises(ValueError, match="pixel cache"):
        index_run(paths, "pix", IndexConfig())
    report = index_run(paths, "pix", IndexConfig(), pixels=pix)
    man = load_manifest(paths.manifest)
    assert report.near_duplicates == 1 and man[10].dup_of == man[3].id
    # the index holds centred vectors; the saved centre reproduces them for queries
    center = ix.load_index_center(paths.index("pix"))
    emb = np.load(paths.features("pix")).astype(np.float32)
    np.testing.assert_allclose(center, emb.mean(0), rtol=1e-5, atol=1e-5)
    q = ix.index_vectors(emb, center)
    _, ids = ix.search(ix.load_index(paths.index("pix")), q, 1)
    assert (ids[:, 0] == np.arange(len(emb))).all()


def test_index_run_refuses_misaligned_cache(tmp_path, clothing, embedder):
    paths = RunPaths(tmp_path / "run")
    recs = _write_records(paths.root, list(clothing.images[:4]), ["a"] * 4)
    save_manifest(paths.manifest, recs)
    with pytest.raises(FileNotFoundError, match="webkd features"):
        index_run(paths, "pix", IndexConfig())
    atomic_save_npy(paths.features("pix"), _embed_files(recs[:3], embedder).astype(np.float16))
    with pytest.raises(ValueError, match="row-aligned"):
        index_run(paths, "pix", IndexConfig())
