"""Weight matrices beside checkpoint packs: the N x P read without decoding Parquet.

A checkpoint pack (`pack-<hash>.parquet`) stores every model's flat weights as a list column,
which SQL can read but which Parquet decodes at a few hundred MB/s: the weights of 10,000 small
models took about a second. Beside each pack, `Store.pack` writes the same numbers as a
safetensors file, `pack-<hash>.safetensors`, one float32 matrix per (epoch, vector length),
rows in model-id order, with the row ids in the file's metadata. `zoo.weights()` memory-maps
the matrices and copies out only the requested rows.

The Parquet pack stays the record (SQL, sha256 per checkpoint); a matrix file is used only
when its pack is in place, and it is rewritten whenever the pack is.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors.numpy import save_file

from .integrity import write_atomically

FORMAT = "zoo-weight-matrix-1"


def write_matrices(path: Path, checkpoints: pa.Table) -> None:
    """Write the (model_id, epoch, weights) rows of a pack as matrices, atomically."""
    ids = np.asarray(checkpoints.column("model_id").to_pylist(), dtype=object)
    epochs = checkpoints.column("epoch").to_numpy()
    lengths = checkpoints.column("weights").combine_chunks().value_lengths().to_numpy()
    weights = checkpoints.column("weights").combine_chunks()
    tensors, metadata = {}, {"format": FORMAT}
    for epoch in np.unique(epochs):
        for length in np.unique(lengths[epochs == epoch]):
            rows = np.flatnonzero((epochs == epoch) & (lengths == length))
            rows = rows[np.argsort(ids[rows], kind="stable")]
            name = f"epoch{int(epoch)}.n{int(length)}"
            flat = weights.take(pa.array(rows)).flatten().to_numpy(zero_copy_only=False)
            tensors[name] = np.ascontiguousarray(flat.reshape(len(rows), int(length)), dtype=np.float32)
            metadata[name] = json.dumps(ids[rows].tolist())
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_rows(path: Path, model_ids: set[str], epoch: int) -> list[tuple[list[str], np.ndarray]]:
    """(ids, rows) blocks of the models of `model_ids` that the file holds, at `epoch`: one
    block per vector length, rows in the file's order (a read-only memory map when every row
    of a matrix is wanted: copy it before the file may change).

    The header is parsed here rather than through `safetensors.safe_open`, because that API
    returns whole tensors or contiguous slices, and a read of a few scattered rows should touch
    only their pages: the matrix is memory-mapped at the offset the header gives (the
    safetensors layout: 8-byte little-endian header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        data_end = os.fstat(f.fileno()).st_size
        (size,) = struct.unpack("<Q", f.read(8))
        if size > data_end - 8:  # (a file from elsewhere may claim anything: check before reading)
            raise ValueError(f"{path.name}: a header of {size} bytes in a file of {data_end}")
        header = json.loads(f.read(size))
    data_end -= 8 + size
    metadata = header.pop("__metadata__", {})
    if metadata.get("format") != FORMAT:
        return []
    blocks = []
    prefix = f"epoch{int(epoch)}."
    for name, info in header.items():
        if not name.startswith(prefix) or info["dtype"] != "F32":
            continue
        ids = json.loads(metadata[name])
        rows = [i for i, m in enumerate(ids) if m in model_ids]
        if not rows:
            continue
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if len(shape) != 2 or len(ids) != shape[0] or not 0 <= begin <= end <= data_end or end - begin != 4 * shape[0] * shape[1]:
            raise ValueError(f"{path.name}: matrix {name} has offsets {begin}..{end} and shape {shape} for {len(ids)} rows")
        matrix = np.memmap(path, dtype="<f4", mode="r", offset=8 + size + begin, shape=shape)
        # all rows: the memory map itself (the caller copies once, into place); some: a gather
        block = matrix if len(rows) == len(ids) else matrix[np.asarray(rows)]
        blocks.append(([ids[i] for i in rows], block))
    return blocks
