"""Random streams per model: every stochastic estimate draws from its own seeded generator.

A zoo measured with one fixed seed would give every model of one shape the same probe vectors,
and so one shared error that a population study cannot see from inside. ``stream_seed`` derives
a seed from the family's ``seed`` setting, the model id (or the pair's ids), the epoch and the
purpose (e.g. ``"trace/train"``), by SHA-256: streams differ between models, epochs and purposes,
and a rerun with the same settings draws the same numbers, so stored values are bit-identical.
"""

from __future__ import annotations

import hashlib
import json


def stream_seed(seed: int, purpose: str, *ids: object) -> int:
    """A seed in [0, 2**53) (exactly representable as a float64, so it can be stored as a metric
    value) from the family ``seed``, the ``purpose`` and the ``ids`` (model ids, epoch, ...):
    the first 53 bits of SHA-256 over their JSON encoding."""
    blob = json.dumps([int(seed), str(purpose), *[str(i) for i in ids]], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") >> 11
