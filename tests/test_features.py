"""pipeline/features.py: the pixel cache (row-aligned, incremental, fit modes) and the feature
cache (no recompute, incremental rows, fingerprint change, row alignment). Real image files
written from the shared data, ingested by the real ingest; a tiny real CNN as the encoder."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from webkd.pipeline.config import IngestConfig, ModelSpec, PreprocessSpec, RunPaths
from webkd.pipeline.features import (build_pixel_cache, extract_features, fit_square, load_features, pixel_meta_path,
                               resolve_device)
from webkd.pipeline.ingest import run_ingest
from webkd.pipeline.records import load_manifest
from webkd.training import models as M


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


def _pick(pacs32, n: int, offset: int = 0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(len(pacs32.labels))[offset:offset + n]


def _ingest(root, run) -> list:
    run_ingest([f"folder:{root}"], RunPaths(run), IngestConfig(), workers=1)
    return load_manifest(RunPaths(run).manifest)


def _direct(uri: str, size: int) -> np.ndarray:
    """Independent decode of a real file: Pillow, RGB, Lanczos squash."""
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS))


@pytest.fixture
def web(tmp_path, pacs32, query_folder_factory):
    """A folder: source of 14 real PACS images (JPEG files), ingested; returns (add, run, records),
    `add(n, offset, prefix)` writing n more real images into the same folder."""
    run = tmp_path / "run"

    def add(n: int, offset: int, prefix: str):
        idx = _pick(pacs32, n, offset)
        return query_folder_factory(pacs32.images[idx], pacs32.labels[idx], pacs32.class_names, name="web",
                                    prefix=prefix)

    root = add(14, 0, "a")
    return add, run, _ingest(root, run)


# --------------------------------------------------------------------------------------------
# pixel cache
# --------------------------------------------------------------------------------------------
def test_pixel_cache_row_aligned_and_incremental(web):
    add, run, records = web
    path = RunPaths(run).pixels(24, "squash")
    pix = build_pixel_cache(records, path, 24, "squash", workers=2)
    assert pix.dtype == np.uint8 and pix.shape == (len(records), 24, 24, 3)
    for i in (0, 5, len(records) - 1):
        np.testing.assert_array_equal(pix[i], _direct(records[i].uri, 24))
    first = np.array(pix)

    # unchanged manifest: nothing is decoded (the files could even be gone)
    gone = records[0].uri
    saved = open(gone, "rb").read()
    os.remove(gone)
    again = build_pixel_cache(records, path, 24, "squash")
    np.testing.assert_array_equal(again, first)

    # the source grows: only the new rows are decoded; row 0 keeps its pixels although its file is gone
    grown = _ingest(add(6, 100, "b"), run)
    assert len(grown) == len(records) + 6 and [r.id for r in grown[:len(records)]] == [r.id for r in records]
    pix2 = build_pixel_cache(grown, path, 24, "squash")
    assert pix2.shape[0] == len(grown)
    np.testing.assert_array_equal(pix2[:len(records)], first)
    for i in range(len(records), len(grown)):
        np.testing.assert_array_equal(pix2[i], _direct(grown[i].uri, 24))
    meta = json.loads(pixel_meta_path(path).read_text())
    assert meta["rows"] == len(grown) and meta["failed"] == []

    # another manifest (rows reordered): rebuilt; the row whose file is gone is black and listed
    shuffled = grown[::-1]
    pix3 = build_pixel_cache(shuffled, path, 24, "squash")
    gone_row = len(shuffled) - 1
    assert not pix3[gone_row].any()
    np.testing.assert_array_equal(pix3[0], pix2[len(grown) - 1])
    assert json.loads(pixel_meta_path(path).read_text())["failed"] == [gone_row]
    open(gone, "wb").write(saved)


def test_fit_modes_on_a_real_non_square_image(clothing):
    photo = Image.fromarray(clothing.images[42]).crop((0, 8, 64, 48))          # 64 x 40, real photo
    squash = fit_square(photo, 20, "squash")
    np.testing.assert_array_equal(squash, np.asarray(photo.resize((20, 20), Image.LANCZOS)))
    crop = fit_square(photo, 20, "crop")
    # the centre 40x40 square (Lanczos may read past its border, so compare the interior to a hard crop)
    np.testing.assert_array_equal(crop, np.asarray(photo.resize((20, 20), Image.LANCZOS, box=(12, 0, 52, 40))))
    hard = np.asarray(photo.crop((12, 0, 52, 40)).resize((20, 20), Image.LANCZOS)).astype(int)
    assert np.abs(crop[2:-2, 2:-2].astype(int) - hard[2:-2, 2:-2]).max() <= 2
    pad = fit_square(photo, 32, "pad")
    assert pad.shape == (32, 32, 3)
    assert not pad[:5].any() and not pad[-5:].any()             # letterbox bars top and bottom
    assert pad[8:24].mean() > 10
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_square(photo, 20, "stretch")


# --------------------------------------------------------------------------------------------
# feature cache
# --------------------------------------------------------------------------------------------
class Counting:
    """An encoder callable that counts the rows it is asked to encode."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> M.Outputs:
        assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        self.rows += len(x)
        return self.model(x)


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return M.build_model(ModelSpec(name="cnn_tiny", preprocess=PreprocessSpec(size=32)), num_classes=7)


def test_feature_cache_semantics(web):
    add, run, records = web
    paths = RunPaths(run)
    pix = build_pixel_cache(records, paths.pixels(32, "squash"), 32, "squash")
    model = _encoder()
    enc = Counting(model)
    fp = M.fingerprint(model, model.spec)
    ids = [r.id for r in records]

    fc = extract_features(enc, pix, "tiny", fp, paths, batch_size=5, device="cpu", row_ids=ids)
    n = len(records)
    assert fc.computed == n and enc.rows == n
    assert fc.embeddings.dtype == np.float16 and fc.embeddings.shape == (n, model.embed_dim)
    assert fc.logits.dtype == np.float16 and fc.logits.shape == (n, 7)
    meta = json.loads(paths.features_meta("tiny").read_text())
    assert (meta["fingerprint"], meta["rows"], meta["dim"], meta["num_classes"]) == (fp, n, model.embed_dim, 7)
    assert np.load(paths.features("tiny")).shape == (n, model.embed_dim)

    # row alignment: row i is a direct forward of image i alone
    with torch.no_grad():
        for i in (0, 6, n - 1):
            x = torch.from_numpy(np.array(pix[i:i + 1])).permute(0, 3, 1, 2).float() / 255.0
            out = model(x)
            np.testing.assert_allclose(fc.embeddings[i], out.embedding[0].numpy(), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(fc.logits[i], out.logits[0].numpy(), rtol=2e-3, atol=2e-3)
    first = np.array(fc.embeddings)

    # second call: nothing computed
    fc2 = extract_features(enc, pix, "tiny", fp, paths, batch_size=5, device="cpu", row_ids=ids)
    assert fc2.computed == 0 and enc.rows == n
    np.testing.assert_array_equal(fc2.embeddings, first)

    # appended rows: only those are computed, old rows untouched
    grown = _ingest(add(7, 200, "c"), run)
    pix2 = build_pixel_cache(grown, paths.pixels(32, "squash"), 32, "squash")
    fc3 = extract_features(enc, pix2, "tiny", fp, paths, batch_size=5, device="cpu", row_ids=[r.id for r in grown])
    assert fc3.computed == len(grown) - n == 7 and enc.rows == n + 7 and fc3.rows == len(grown)
    np.testing.assert_array_equal(fc3.embeddings[:n], first)
    with torch.no_grad():
        x = torch.from_numpy(np.array(pix2[-1:])).permute(0, 3, 1, 2).float() / 255.0
        np.testing.assert_allclose(fc3.logits[-1], model(x).logits[0].numpy(), rtol=2e-3, atol=2e-3)

    # another encoder (fingerprint changes): everything again
    other = _encoder(seed=1)
    enc2 = Counting(other)
    fp2 = M.fingerprint(other, other.spec)
    assert fp2 != fp
    fc4 = extract_features(enc2, pix2, "tiny", fp2, paths, batch_size=8, device="cpu")
    assert fc4.computed == len(grown) and enc2.rows == len(grown)
    assert not np.array_equal(fc4.embeddings[:n], first)
    loaded = load_features(paths, "tiny")
    assert loaded is not None and loaded.fingerprint == fp2 and loaded.rows == len(grown)


def test_extract_features_with_a_module_restores_its_mode(web, tmp_path):
    _, _, records = web
    paths = RunPaths(tmp_path / "run2")
    pix = build_pixel_cache(records, paths.pixels(32, "squash"), 32, "squash")
    model = _encoder()
    model.train()
    fc = extract_features(model, pix, "m", "fp-1", paths, batch_size=64, device="auto")
    assert fc.computed == len(records) and model.training
    assert np.isfinite(fc.embeddings.astype(np.float32)).all()
    # eval-mode features (BN running stats), not batch statistics
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.array(pix[:3])).permute(0, 3, 1, 2).float() / 255.0
        np.testing.assert_allclose(fc.logits[:3], model(x).logits.numpy(), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(model, np.zeros((2, 8, 8, 3), np.float32), "m", "fp-1", paths)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu-please")
