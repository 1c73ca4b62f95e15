"""The Ray cluster of the distributed tests: two CPUs on 127.0.0.1, no dashboard, as `ray start --head` would give
on one machine. One per test module, shut down after it, so the rest of the suite runs without Ray's processes."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
