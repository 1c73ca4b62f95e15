"""Issue 5's memory bar on rsunivlm-1b: with an expert budget of 1, peak RSS is below all-resident by >= 2 experts.

Slow: exports rsunivlm-1b with random weights (a few minutes, ~6.6 GB of disk) unless RSVLM_1B_ENGINE names an
existing engine dir: ``RSVLM_1B_ENGINE=/tmp/rsunivlm-1b pytest -m slow tests/test_expert_memory_1b.py -s``.
Each budget runs in a fresh process that switches through all three experts (prefill + decode on each), so its
peak RSS (ru_maxrss) is that budget's alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = r"""
import json, resource, sys
import numpy as np
from rsvlm_edge.backends.ort_backend import OrtBackend
budget = None if sys.argv[2] == "all" else int(sys.argv[2])
b = OrtBackend.from_dir(sys.argv[1], verify="size", expert_budget_experts=budget, threads=2)
cfg = b.config
for expert in (0, 1, 2, 0):
    cache = b.new_cache(1, 16, expert)
    ids = np.arange(8, dtype=np.int32)[None]
    b.forward(cache, b.embed(ids), ids, np.ones((1, 8), np.float32))
    for t in range(8, 12):
        b.forward(cache, b.embed(np.array([[t]], np.int32)), np.array([[t]], np.int32), np.ones((1, t + 1), np.float32))
stats = b.stats()
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "expert_bytes": b.experts.expert_bytes, "resident": stats["experts_resident"],
                  "evictions": stats["expert_evictions"]}))
"""


@pytest.fixture(scope="module")
def engine_1b(tmp_path_factory) -> Path:
    given = os.environ.get("RSVLM_1B_ENGINE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("1b") / "rsunivlm-1b"
    subprocess.run([sys.executable, "-m", "rsvlm_edge.cli", "export", "--config", "rsunivlm-1b", "--random-init",
                    str(out), "--no-check"], check=True, timeout=1800)
    return out


def probe(engine: Path, budget: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, str(engine), budget], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_budget_of_one_expert_saves_two_experts_of_rss(engine_1b):
    one, every = probe(engine_1b, "1"), probe(engine_1b, "all")
    gb = 1024**3
    print(f"peak RSS: budget 1 expert {one['peak_rss'] / gb:.2f} GiB, all resident {every['peak_rss'] / gb:.2f} GiB, "
          f"saved {(every['peak_rss'] - one['peak_rss']) / gb:.2f} GiB; one expert = {one['expert_bytes'] / gb:.2f} GiB")
    assert one["resident"] == [0] and one["evictions"] == 3
    assert sorted(every["resident"]) == [0, 1, 2] and every["evictions"] == 0
    assert every["peak_rss"] - one["peak_rss"] >= 2 * one["expert_bytes"]
