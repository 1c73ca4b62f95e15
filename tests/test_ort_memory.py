"""Resident memory of prepacked (INT4/INT8 weight-only) decoders: each weight is resident once, packed.

ONNX Runtime packs every ``MatMulNBits`` weight into the session's own memory, so the trunk and expert files are
not needed once the session exists; the backend lets ONNX Runtime read them itself (it releases what it read) rather
than handing it a mapped trunk and an in-memory expert copy that would stay resident beside the packed copy. The
check counts the pages of those files mapped into the process after a prefill and a decode step (Linux
``/proc/self/smaps``): a fraction of the files (what is not packed: norms, biases, zero points), not all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsvlm_edge.cli import main

PROBE = r"""
import json, sys
import numpy as np
from rsvlm_edge.backends.ort_backend import OrtBackend
b = OrtBackend.from_dir(sys.argv[1], threads=1, verify=False, preload=False)
cache = b.new_cache(1, 24, 0)
ids = np.arange(16, dtype=np.int32)[None]
b.forward(cache, b.embed(ids), ids, np.ones((1, 16), np.float32))
b.forward(cache, b.embed(ids[:, :1]), np.array([[16]], np.int32), np.ones((1, 17), np.float32))
resident, current = {}, None
for line in open("/proc/self/smaps"):
    parts = line.split()
    if parts and "-" in parts[0] and ":" not in parts[0]:
        current = parts[5] if len(parts) > 5 else None
    elif parts and parts[0] == "Rss:" and current and current.endswith(".bin") and "decoder_" in current:
        resident[current] = resident.get(current, 0) + int(parts[1]) * 1024
with b.expert_cache.hold(0) as loaded:
    arrays = len(loaded.arrays)
print(json.dumps({"resident": resident, "arrays": arrays}))
"""


@pytest.fixture(scope="module")
def int4_dir(fp32_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int4-mem") / "int4"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4"])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_prepacked_decoder_keeps_no_copy_of_its_weight_files(int4_dir):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(int4_dir)], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["arrays"] == 0  # no in-memory copy of the expert file beside the session
    files = sum(f.stat().st_size for f in (int4_dir / "decoder_trunk.bin", int4_dir / "decoder_expert0.bin"))
    assert sum(report["resident"].values()) <= 0.5 * files, report
