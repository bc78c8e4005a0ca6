"""A full disk and a read-only root, for real: the commands run in a private mount namespace
(`unshare -rm`, no privileges needed) on a small tmpfs, which fills up, and then on a read-only
remount of it. Each failure is one line naming the cause; nothing partial stays behind; after
space is freed a rerun completes the zoo with the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_generate import fingerprint

SCRIPT = r"""
set -u
mount -t tmpfs -o size=300k tmpfs "$MNT"
zoo() { "$PYTHON" -m zoo "$@" 2>&1; echo "rc=$?"; }
echo "== full"; zoo generate smoke --root "$MNT/root" --no-progress
echo "== temporary"; find "$MNT" -name '*.tmp*' -o -name '*.pending' | wc -l
echo "== verify-full"; zoo verify --root "$MNT/root" --report-only
mount -o remount,size=20m "$MNT"
echo "== rerun"; zoo generate smoke --root "$MNT/root" --executor debug --no-progress
"$PYTHON" -c "import json; from tests.test_generate import fingerprint; print('FINGERPRINT', json.dumps(sorted(map(list, fingerprint('$MNT/root').items()))))"
mount -o remount,ro "$MNT"
echo "== ro-metrics"; zoo metrics smoke --root "$MNT/root" --executor debug --no-progress --only performance
echo "== ro-bench"; zoo bench pruning --zoo smoke --root "$MNT/root" --no-progress
echo "== ro-verify"; zoo verify --root "$MNT/root"
echo "== ro-verify-report"; zoo verify --root "$MNT/root" --report-only
echo "== ro-sql"; zoo sql "select count(*) as n from models" --format csv --root "$MNT/root"
"""


def sections(out: str) -> dict[str, str]:
    parts = {}
    for block in out.split("== ")[1:]:
        name, _, body = block.partition("\n")
        parts[name.strip()] = body.strip()
    return parts


@pytest.mark.slow
def test_a_full_disk_then_a_read_only_root(smoke_root, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, MNT=str(mnt), PYTHON=sys.executable, PYTHONPATH=str(REPO),
               ZOO_JOBS_DIR=str(tmp_path / "jobs"))
    run = subprocess.run(["unshare", "-rm", "bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = sections(run.stdout)
    full = [line for line in out["full"].splitlines() if line.startswith("zoo: error")]
    assert out["full"].endswith("rc=2") and len(full) == 1, out["full"]
    assert "No space left on device" in full[0] and "the disk is full" in full[0]
    assert out["temporary"] == "0"  # nothing partial behind
    assert out["verify-full"].endswith("intact\nrc=0"), out["verify-full"]  # what was stored is whole
    assert "\nrc=0" in out["rerun"] and "trained" in out["rerun"]
    [line] = [x for x in run.stdout.splitlines() if x.startswith("FINGERPRINT ")]
    assert {(m, e): s for (m, e), s in json.loads(line[len("FINGERPRINT "):])} == fingerprint(smoke_root)
    for command in ("ro-metrics", "ro-bench", "ro-verify"):
        lines = out[command].splitlines()
        assert lines[-1] == "rc=2" and lines[-2].startswith("zoo: error: cannot write"), out[command]
        assert "read-only" in lines[-2] and "Traceback" not in out[command]
    assert out["ro-verify-report"].endswith("intact\nrc=0")
    assert out["ro-sql"] == "n\n8\nrc=0"  # reading a read-only zoo works
