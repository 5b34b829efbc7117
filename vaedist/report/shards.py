"""The datapoints behind a latent table's rows: their images, read from the shards the table names,
and the shards' manifest and dataset, refused unless they are the ones the table was encoded from."""

from __future__ import annotations

import numpy as np

from vaedist import analyses, data, schema, storage
from vaedist.data import DatasetInfo
from vaedist.lineage import Lineage


def _sources_of(con, latents_dir: str, keys: list[str], view: str = schema.VIEW_NAME) -> dict[str, str | None]:
    """key -> where the datapoint came from (the table's source column; None in older tables)."""
    if not keys:
        return {}
    rows = analyses.run_sql(latents_dir, f"SELECT DISTINCT key, source FROM {view} WHERE list_contains($keys, key)",
                            con=con, params={"keys": list(keys)}).to_pylist()
    return {row["key"]: row["source"] for row in rows}


def _images_of(con, latents_dir: str, shards_dir: str, keys: list[str], info: DatasetInfo,
               view: str = schema.VIEW_NAME) -> dict[str, np.ndarray]:
    """key -> the datapoint's pixels (uint8, flat), read from the shards the table names, each once."""
    if not keys:
        return {}
    where = analyses.run_sql(latents_dir, f"SELECT DISTINCT key, shard, index FROM {view} "
                             "WHERE list_contains($keys, key) ORDER BY key", con=con,
                             params={"keys": list(keys)}).to_pylist()
    images = {}
    for shard in sorted({row["shard"] for row in where}):
        path = storage.join(shards_dir, *shard.split("/"))
        indices, pixels, _ = data.load_split_arrays([path], info=info)
        position = {int(i): p for p, i in enumerate(indices)}
        for row in where:
            if row["shard"] != shard:
                continue
            if row["index"] not in position:
                raise data.DataError(f"shard {path} does not hold key {row['key']!r} named by the latent table "
                                     f"{latents_dir}; were the shards prepared again since encoding?")
            images[row["key"]] = pixels[position[row["index"]]]
    return images


def _open_shards(shards_dir: str, lineage: Lineage, latents_dir: str,
                 from_lineage: str) -> tuple[data.Manifest, DatasetInfo]:
    """(manifest, dataset) of the shards, refused unless they are the ones the table was encoded from."""
    try:
        manifest = data.read_manifest(shards_dir)
        shards_hash = data.manifest_hash(shards_dir)
    except data.DataError as e:
        raise data.DataError(f"{e}{from_lineage if shards_dir == lineage.shards_dir else ''}") from None
    if lineage.manifest_hash and lineage.manifest_hash != shards_hash:
        raise data.DataError(f"shards {shards_dir} have manifest hash {shards_hash[:12]}…, but latent table "
                             f"{latents_dir} was encoded from {lineage.manifest_hash[:12]}…; give the shards "
                             "it was encoded from")
    return manifest, manifest.dataset
