"""The Python API's steps on a real local Ray, over the session's trained run: api.encode publishes and
opens a table, the model loaded from its lineage gives each row's numbers, and the table reads as a
Ray Dataset."""

from __future__ import annotations

import numpy as np
import pytest

import vaedist
from vaedist import api
from vaedist.config import config_from_dict

pytestmark = pytest.mark.integration


def test_encode_then_the_model_and_the_ray_dataset_agree_with_the_table(trained_run, tmp_path):
    cfg, result = trained_run
    cfg = config_from_dict(cfg.to_dict(), ["encode.splits=[test]", "encode.num_samples_iw=4"])
    table = api.encode(cfg, checkpoint=result.best_checkpoint, out=str(tmp_path / "latents"))
    assert isinstance(table, vaedist.Table) and table.num_rows == 4000

    lineage = table.lineage
    model = vaedist.load_model(lineage.checkpoint)
    assert model.checkpoint.startswith(result.best_checkpoint)
    data = vaedist.read_images(lineage.shards_dir, split="test", max_shards=1)
    keys = slice(0, 64)
    rows = table.to_pandas().set_index("index").loc[data.indices[keys]]
    parts = model.loss(data.images[keys], indices=data.indices[keys], split="test",
                       num_samples=lineage.num_samples_mc, seed=lineage.seed)
    np.testing.assert_allclose(parts.loss.numpy(), rows["loss"], rtol=1e-5)
    log_px = model.log_px(data.images[keys], num_samples=lineage.num_samples_iw, indices=data.indices[keys],
                          split="test", seed=lineage.seed)
    np.testing.assert_allclose(log_px.numpy(), rows["log_px"], rtol=1e-5)

    from ray.data.expressions import col

    ds = table.to_ray()
    assert ds.count() == 4000
    assert ds.filter(expr=col("label") == 3).count() == int((table.to_pandas().label == 3).sum())
