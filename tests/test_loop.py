"""training/loop.py: a fixed step budget per epoch (train.steps_per_epoch)."""
from __future__ import annotations

import numpy as np
import torch

from webkd.pipeline.config import ModelSpec, TrainConfig
from webkd.training.loop import train_one_epoch
from webkd.training.methods import build_method
from webkd.training.models import build_model
from webkd.training.pool import Pool


def _pool(pacs32, n: int) -> Pool:
    lab = pacs32.labels[:n].astype(np.int64)
    return Pool(pixels=pacs32.images[:n], ids=[str(i) for i in range(n)], split=np.full(n, "train", dtype=object),
                status=np.full(n, "ok", dtype=object), labels=lab, web_labels=[None] * n, web_class=lab,
                val_labels=np.full(n, -1, np.int64))


def test_steps_per_epoch_fixes_the_budget_whatever_the_kept_set(pacs32, one_thread):
    pool = _pool(pacs32, 40)
    seen: list[np.ndarray] = []
    ce = build_method("ce")
    model = build_model(ModelSpec(name="cnn_tiny"), 7)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    class Count(type(ce)):
        def forward(self, batch, student, teachers, progress):
            seen.append(batch["index"].numpy().copy())
            return super().forward(batch, student, teachers, progress)

    method = Count()
    rows = np.arange(0, 40, 4)                                   # 10 kept rows
    cfg = TrainConfig(method="ce", batch_size=4, steps_per_epoch=7)
    stats = train_one_epoch(model, [], method, pool, rows, np.ones(40, np.float32), cfg, opt, 0, 0.0, 0,
                            torch.device("cpu"))
    assert len(seen) == 7 and stats["seen"] == 28 and all(len(b) == 4 for b in seen)
    idx = np.concatenate(seen)
    assert set(idx) <= set(rows) and set(idx[:10]) == set(rows)  # whole passes first: every kept row once
    seen.clear()
    train_one_epoch(model, [], method, pool, rows, np.ones(40, np.float32), cfg.model_copy(update={"steps_per_epoch": None}),
                    opt, 0, 0.0, 0, torch.device("cpu"))
    assert len(seen) == 3                                        # one pass: 4 + 4 + 2
    seen.clear()
    n_train = int((pool.candidates & (pool.split == "train")).sum())
    train_one_epoch(model, [], method, pool, rows, np.ones(40, np.float32),
                    cfg.model_copy(update={"steps_per_epoch": "candidates"}), opt, 0, 0.0, 0, torch.device("cpu"))
    assert len(seen) == -(-n_train // 4) and set(np.concatenate(seen)) == set(rows)  # the no-selection budget
