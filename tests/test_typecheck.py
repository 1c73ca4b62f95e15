"""mypy over the whole installed package: ``rsvlm_edge`` and the folders installed under it (export, engines,
calibration, training, bench), with setup.cfg's ``[mypy]`` settings.

``mypy rsvlm_edge`` from the repo root sees ``rsvlm_edge/`` only: the editable install maps the other folders with an
import hook mypy does not run. :mod:`package_tree` builds the installed layout as symlinks and mypy checks it with
``-p rsvlm_edge``. About 15 s on 2 cores with a cold cache (the cache goes to the test's tmp dir, so every run is
cold and nothing is written into the repo).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from package_tree import REPO, installed_packages, mirror_package


def test_every_installed_package_is_in_the_mirrored_tree(tmp_path):
    """``-p rsvlm_edge`` recurses into subpackages, so a package present in the tree is a package checked."""
    src = mirror_package(tmp_path / "src")
    missing = [p for p in installed_packages() if not (src / p.replace(".", "/") / "__init__.py").is_file()]
    assert not missing, f"not in the tree mypy checks: {missing}"


def test_the_whole_package_typechecks(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    src = mirror_package(tmp_path / "src")
    env = {**os.environ, "MYPYPATH": str(src)}
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "setup.cfg"), "--cache-dir",
                             str(tmp_path / "cache"), "-p", "rsvlm_edge"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
