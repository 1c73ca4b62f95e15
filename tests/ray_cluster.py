"""The Ray cluster the distributed tests share: two CPUs on 127.0.0.1, no dashboard, as `ray start --head` would
give on one machine. Started once per test session (Ray's own exit hook stops it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cluster():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
