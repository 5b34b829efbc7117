"""How a latent table is staged, published, found and recovered: the one owner of a table's
directory and its hidden siblings. `vaedist encode` writes through it; queries, reports and the
analyses find tables through it. No Ray.

Layout. A table is a directory `out` of Parquet files beside `_lineage.json` and, written last, the
empty marker `_SUCCESS`: a directory is a complete table when `_SUCCESS` is in it. Beside `out`,
hidden siblings:

    .NAME.staging-KEY   an encode job's output while it runs; KEY hashes the job's identity, so that
                        a rerun of the same job finds the files it already finished (vaedist.encode)
    .NAME.old-ID        local disks only: the previous table, moved aside for the instant of the swap

A staging directory gets `_SUCCESS` only after its verification passed (one row per datapoint per
checkpoint) and its lineage was written: a complete staging directory is a verified table.

The promise: between any two storage calls, `out` or one of its siblings is a complete table, and
from the moment a staging directory is complete it is that new table. A process killed at any
point (the tests kill a publish after each of its storage calls in turn, on a local disk and on S3)
leaves a complete table that readers find, and the next `vaedist encode` (or `recover`) puts it at
`out`; a complete staging directory is published, never deleted unpublished.

Publish on a local disk (a rename within one filesystem is atomic):
  1. rename out -> .NAME.old-ID (when out exists)       out missing; old and staging complete
  2. rename staging -> out                              out is the new table
  3. delete old, its _SUCCESS first                     a half-deleted old is never complete
Publish on an object store (no rename; each object is written whole or not at all):
  1. delete out/_SUCCESS, then out's other files        the complete staging is the table now
  2. copy staging's files into out, server-side         (pyarrow.fs copy_file: S3 CopyObject, the
     bytes never pass through this process), _lineage.json first, _SUCCESS last
  3. delete staging, its _SUCCESS first
On an object store the old table is gone at step 1: during the copy, the table to find is the new one.

Finding (readers): `out` when complete; else the newest complete staging sibling (an interrupted
publish's new table); else a complete old one. Readers write nothing: a publish may be mid-copy.

Recovery (writers, before they stage anything): each complete staging sibling not yet at `out` is
published, oldest first; an incomplete `out` is replaced by a complete old sibling when no staging
one exists; old siblings are deleted only once `out` is complete; unfinished staging directories
are kept for a rerun to resume. One writer per table at a time: two encode jobs publishing to one
path at once are not supported.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vaedist import schema, storage

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("vaedist.tables")
STAGING, OLD = "staging", "old"


class TableError(ValueError):
    """A path that cannot hold or be replaced by a latent table; the message names it."""


@dataclass(frozen=True)
class Sibling:
    kind: str  # STAGING or OLD
    path: str
    complete: bool
    mtime_ns: int  # its _SUCCESS marker's, 0 when incomplete


def _split(out: str) -> tuple[str, str]:
    out = str(out).rstrip("/")
    parent, name = out.rsplit("/", 1) if "/" in out else (".", out)
    return parent, name


def sibling_path(out: str, kind: str, tag: str) -> str:
    """The hidden sibling `.NAME.KIND-TAG` of the table at `out`."""
    parent, name = _split(out)
    return storage.join(parent, f".{name}.{kind}-{tag}")


def staging_path(out: str, job_key: str) -> str:
    return sibling_path(out, STAGING, job_key)


def is_complete(path: str) -> bool:
    return storage.exists(storage.join(path, schema.SUCCESS_FILE))


def siblings(out: str) -> list[Sibling]:
    """The table's staging and old siblings, oldest complete first, incomplete ones last."""
    parent, name = _split(out)
    found = []
    for entry in storage.listdir(parent):
        for kind in (STAGING, OLD):
            if entry.startswith(f".{name}.{kind}-"):
                path = storage.join(parent, entry)
                marker = storage.join(path, schema.SUCCESS_FILE)
                complete = storage.exists(marker)
                found.append(Sibling(kind, path, complete, storage.mtime_ns(marker) if complete else 0))
    return sorted(found, key=lambda s: (not s.complete, s.mtime_ns, s.path))


def find(out: str) -> str | None:
    """The directory holding the complete table published (or being published) at `out`: out
    itself, else the newest complete staging sibling, else the newest complete old one; None when
    there is none. Writes nothing."""
    if is_complete(out):
        return out
    complete = [s for s in siblings(out) if s.complete]
    for kind in (STAGING, OLD):
        newest = [s for s in complete if s.kind == kind][-1:]
        if newest:
            log.warning("%s: its publish was interrupted; reading the complete table in %s (the next "
                        "`vaedist encode` to that path finishes the publish)", out, newest[0].path)
            return newest[0].path
    return None


def check_replaceable(out: str) -> None:
    """`out` may be absent, empty, or a vaedist table (complete or half-copied); nothing else is
    overwritten."""
    if not storage.exists(out):
        return
    if not storage.is_dir(out):
        raise TableError(f"output path {out} is a file, not a latent table directory; choose another --out")
    entries = storage.listdir(out)
    if entries and schema.LINEAGE_FILE not in entries and schema.SUCCESS_FILE not in entries:
        raise TableError(f"output path {out} holds something else ({', '.join(entries[:5])}); "
                         "refusing to replace it; choose another --out or remove it")


def discard(path: str) -> None:
    """Delete a directory, its _SUCCESS marker first: a half-deleted table is never complete."""
    storage.delete_file(storage.join(path, schema.SUCCESS_FILE))
    storage.rmtree(path)


def _same_table(a: str, b: str) -> bool:
    """The lineage names the job that wrote the table (its id): equal lineages, the same table."""
    try:
        return storage.read_bytes(storage.join(a, schema.LINEAGE_FILE)) == \
            storage.read_bytes(storage.join(b, schema.LINEAGE_FILE))
    except FileNotFoundError:
        return False


def publish(staging: str, out: str) -> None:
    """Make the complete (verified) staging directory the table at `out`, in the order the module
    docstring gives; a crash anywhere leaves a complete table to find."""
    if not is_complete(staging):
        raise TableError(f"{staging} has no {schema.SUCCESS_FILE} marker: it is not a verified table; "
                         "nothing was published")
    check_replaceable(out)
    if storage.is_uri(out):
        if storage.exists(out):
            discard(out)
        names = [n for n in storage.listdir(staging) if n not in (schema.LINEAGE_FILE, schema.SUCCESS_FILE)]
        for name in [schema.LINEAGE_FILE, *names, schema.SUCCESS_FILE]:
            storage.copy_file(storage.join(staging, name), storage.join(out, name))
        discard(staging)
        return
    old = None
    if storage.exists(out):
        old = sibling_path(out, OLD, uuid.uuid4().hex[:8])
        storage.move(out, old)
    storage.move(staging, out)
    if old:
        discard(old)


def recover(out: str) -> list[str]:
    """Finish what an interrupted publish left (module docstring); returns a line per thing done, for
    the caller to show."""
    done = []
    found = siblings(out)
    for s in found:
        if s.kind != STAGING or not s.complete:
            continue
        if is_complete(out) and _same_table(s.path, out):
            discard(s.path)  # the copy into out had finished; only the staging's removal had not
            done.append(f"removed {s.path}: published already")
        else:
            publish(s.path, out)
            done.append(f"published {s.path}, a verified table whose publish was interrupted, to {out}")
    for s in found:
        if s.kind == STAGING and not s.complete and is_complete(out) and _same_table(s.path, out):
            storage.rmtree(s.path)  # a published staging half removed (its marker went first)
            done.append(f"removed {s.path}: published already")
    olds = [s for s in found if s.kind == OLD]
    if not is_complete(out):
        complete = [s for s in olds if s.complete]
        if complete:
            publish(complete[-1].path, out)
            done.append(f"restored {out} from {complete[-1].path}")
            olds.remove(complete[-1])
    if is_complete(out):
        for s in olds:
            discard(s.path)
            done.append(f"removed {s.path}: {out} is complete")
    return done


def drop_unfinished(out: str, keep: str | None = None) -> None:
    """Delete the unfinished staging directories beside `out` (after a publish: jobs given up on),
    all but `keep`."""
    for s in siblings(out):
        if s.kind == STAGING and not s.complete and s.path != keep:
            storage.rmtree(s.path)


def write_file(path: str, table: "pa.Table") -> None:
    """Write one Parquet file so that it appears whole or not at all: on a local disk a hidden
    temporary renamed into place; on an object store the upload, whose object appears only when it
    completes. Bytes depend on the rows alone, so a file rewritten by a rerun is identical."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    temporary = None
    try:
        if storage.is_uri(path):
            with fs.open_output_stream(p) as f:
                pq.write_table(table, f)
            return
        parent, name = p.rsplit("/", 1)
        fs.create_dir(parent, recursive=True)
        temporary = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, temporary, filesystem=fs)
        fs.move(temporary, p)
    except (OSError, pa.ArrowException) as e:  # e.g. a full disk: say which file, leave no partial one
        if temporary is not None:
            try:
                fs.delete_file(temporary)
            except OSError:
                pass
        raise OSError(f"writing {path} failed: {e}") from None
