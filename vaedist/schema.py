"""The latent table: one row per datapoint. The single source of truth for its columns, shared by
the encode job (writer), the query and report modules and the tests (readers).

Vectors are Arrow fixed-size lists of float32 (not Ray's tensor extension type) so the Parquet files
open as plain arrays in DuckDB, pandas and Ray Data with no vaedist code.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from vaedist.lineage import LINEAGE_FILE, Lineage, lineage_from_metadata

# 2: the optional epoch column; the lineage names the dataset and the noise scheme. 3: the source column;
# the lineage names the training manifest beside the encoded one (train_manifest_hash, same_data_as_training).
# 4: the bpd and bpd_iw columns; the lineage names the likelihood (and whether its data were binarised).
# The kl_groups column (and the lineage's latent_groups) came without a new version: only tables of
# models with several latent groups have them, which no earlier vaedist wrote, and the one-group
# tables stay byte for byte what they were.
SCHEMA_VERSION = 4
SUCCESS_FILE = "_SUCCESS"
METADATA_KEY = b"vaedist.lineage"
VIEW_NAME = "latents"

# name -> (description, units); the order is the column order of the table.
COLUMNS: dict[str, str] = {
    "key": "the shard's __key__, '<split>-<index>'",
    "split": "'train' or 'test'",
    "index": "datapoint index within its split",
    "label": "class 0..num_classes-1 (MNIST's digit; the lineage's class_names name them where the dataset has "
             "names); -1 for unlabelled data",
    "shard": "shard path relative to the shards directory",
    "source": "where the datapoint came from (vaedist.data.read_sources): a file path relative to the image "
              "folder, shard URL#__key__, array file#row, or for the built-ins e.g. "
              "'mnist/t10k-images-idx3-ubyte#42'; absent from tables written before it (readers see NULL)",
    "epoch": "the checkpoint's epoch: only in tables of several checkpoints of one run (vaedist encode --epochs)",
    "mu": "posterior mean of q(z|x), float32[latent_dim]; with several latent groups every group's, z_1 (next to "
          "x) first, sizes in the lineage's latent_groups, each with its parent groups at their posterior means",
    "logvar": "posterior log-variance of q(z|x), float32[latent_dim] (several groups: as mu)",
    "z": "one posterior sample z ~ q(z|x), float32[latent_dim] (several groups: one joint sample, as mu)",
    "recon_nll": "-E_q[log p(x|z)] in nats, Monte Carlo over S samples",
    "kl": "KL(q(z|x) || N(0, I)) in nats, analytic; with several latent groups E_q[log q(z|x) - log p(z)] over "
          "all of them, the sum of kl_groups",
    "kl_groups": "each latent group's term of kl in nats, float64[L], z_1 first: KL(q(z_l|...) || p(z_l|z_l+1)) "
                 "given the sampled parent groups, over S samples (kl = their sum left to right, exactly); only in "
                 "tables of models with several groups (L = len(latent_groups) in the lineage)",
    "kl_dims": "each latent dimension's KL term in nats, float32[latent_dim] (several groups: given the sampled "
               "parent groups, over S samples; a group's dimensions sum to its kl_groups entry); only in tables "
               "encoded with encode.kl_per_dim",
    "loss": "l_i = recon_nll + kl (the negative ELBO) in nats",
    "log_px": "importance-weighted estimate of log p(x) with K samples, nats (null when K = 0)",
    "gap": "log_px + loss: estimated KL(q(z|x) || p(z|x)), nats (null when K = 0)",
    "bpd": "loss in bits per dimension, loss / (H * W * C * ln 2); absent from tables written before it",
    "bpd_iw": "-log_px in bits per dimension (null when K = 0); absent from tables written before it",
}
VECTOR_COLUMNS = ("mu", "logvar", "z", "kl_dims")
# The columns a table may lack (written before source or bpd; one checkpoint).
OPTIONAL_COLUMNS = ("source", "epoch", "bpd", "bpd_iw", "kl_groups", "kl_dims")


def arrow_schema(latent_dim: int, lineage: Lineage | Mapping[str, Any] | None = None, with_epoch: bool = False,
                 with_source: bool = True, with_bpd: bool = True, num_groups: int = 1,
                 with_kl_dims: bool = False) -> pa.Schema:
    """The table's schema; num_groups > 1 (a model of several latent groups) adds kl_groups."""
    vec = pa.list_(pa.float32(), latent_dim)
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("epoch", pa.int64(), nullable=False),
        pa.field("mu", vec, nullable=False),
        pa.field("logvar", vec, nullable=False),
        pa.field("z", vec, nullable=False),
        pa.field("recon_nll", pa.float64(), nullable=False),
        pa.field("kl", pa.float64(), nullable=False),
        pa.field("kl_groups", pa.list_(pa.float64(), max(num_groups, 1)), nullable=False),
        pa.field("kl_dims", vec, nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("log_px", pa.float64()),
        pa.field("gap", pa.float64()),
        pa.field("bpd", pa.float64(), nullable=False),
        pa.field("bpd_iw", pa.float64()),
    ]
    assert [f.name for f in fields] == list(COLUMNS)
    left_out = {name for name, keep in (("epoch", with_epoch), ("source", with_source), ("bpd", with_bpd),
                                        ("bpd_iw", with_bpd), ("kl_groups", num_groups > 1),
                                        ("kl_dims", with_kl_dims)) if not keep}
    fields = [f for f in fields if f.name not in left_out]
    if isinstance(lineage, Lineage):
        lineage = lineage.to_dict()
    metadata = {METADATA_KEY: json.dumps(dict(lineage), sort_keys=True).encode()} if lineage else None
    return pa.schema(fields, metadata=metadata)


def _vectors(values: np.ndarray, latent_dim: int, dtype=np.float32) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.ndim != 2 or values.shape[1] != latent_dim:
        raise ValueError(f"expected a [rows, {latent_dim}] array, got shape {values.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), latent_dim)


def to_table(columns: Mapping[str, Any], latent_dim: int,
             lineage: Lineage | Mapping[str, Any] | None = None, latent_groups: tuple[int, ...] = ()) -> pa.Table:
    """Build a table in the canonical schema from numpy columns (vectors as [rows, latent_dim];
    kl_groups as [rows, L], kept where latent_groups, the model's, names more than one group)."""
    missing = set(COLUMNS) - {"log_px", "gap", *OPTIONAL_COLUMNS} - set(columns)
    if missing:
        raise ValueError(f"latent table is missing columns {sorted(missing)}")
    schema = arrow_schema(latent_dim, lineage, with_epoch="epoch" in columns, with_source="source" in columns,
                          with_bpd="bpd" in columns, num_groups=len(latent_groups), with_kl_dims="kl_dims" in columns)
    rows = len(columns["key"])
    arrays = []
    for field in schema:
        value = columns.get(field.name)
        if field.name in VECTOR_COLUMNS:
            arrays.append(_vectors(value, latent_dim))
        elif field.name == "kl_groups":
            arrays.append(_vectors(value, len(latent_groups), np.float64))
        elif value is None:
            arrays.append(pa.nulls(rows, field.type))
        else:
            arrays.append(pa.array(np.asarray(value), type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def latent_dim_of(schema: pa.Schema) -> int:
    return schema.field("mu").type.list_size


def num_groups_of(schema: pa.Schema) -> int:
    """Latent groups of the model that wrote the table: kl_groups' length, else 1."""
    return schema.field("kl_groups").type.list_size if "kl_groups" in schema.names else 1


def lineage_of(schema: pa.Schema) -> Lineage | None:
    return lineage_from_metadata((schema.metadata or {}).get(METADATA_KEY))
