"""mypy over the TensorRT code against NVIDIA's API as the ``tensorrt-stubs`` package describes it.

Without a GPU nothing else checks that ``trt.Builder``, ``IBuilderConfig``, ``IExecutionContext`` ... are called
with the right names and arguments. Two things stand between the stubs and mypy, both handled here:

* the stubs ship inline ``.pyi`` files without ``py.typed``, so mypy ignores them in site-packages; a copy goes on
  ``MYPYPATH``. The copy is repaired: tensorrt-stubs 10.13.0.35.1 names some parameters ``in`` (a keyword) and
  puts one required parameter after defaults, which are syntax errors to mypy;
* ``engines/`` installs as ``rsvlm_edge.engines`` (setup.cfg package_dir), which mypy cannot follow; a symlinked
  ``rsvlm_edge`` tree with the mapped folders inside (:mod:`package_tree`) gives it the real module names.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from package_tree import REPO, mirror_package

MODULES = ["rsvlm_edge.engines.trt_build", "rsvlm_edge.engines.trt_calib", "rsvlm_edge.engines.trt_presets",
           "rsvlm_edge.engines.trt_profiles", "rsvlm_edge.engines.trt_settings", "rsvlm_edge.backends.trt_backend",
           "rsvlm_edge.backends.trt_engine", "rsvlm_edge.backends.trt_env", "rsvlm_edge.backends.trt_shapes",
           "rsvlm_edge.backends.cuda_mem"]


def stub_files() -> list[Path]:
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    files = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".pyi")]
    if not files:
        pytest.skip("tensorrt-stubs has no .pyi files")
    return files


def repair(text: str) -> str:
    text = re.sub(r"([(,]\s*)in: ", r"\1in_: ", text)
    return text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")


def copy_stubs(dest: Path) -> Path:
    for f in stub_files():
        top = next(p for p in f.parents if p.parent.name in ("site-packages", "dist-packages"))
        target = dest / f.relative_to(top.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(repair(f.read_text()))
    return dest


def test_trt_code_typechecks_against_the_stubs(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    stubs = copy_stubs(tmp_path / "stubs")
    src = mirror_package(tmp_path / "src")
    env = {**os.environ, "MYPYPATH": f"{stubs}{os.pathsep}{src}"}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "setup.cfg"), "--cache-dir", str(tmp_path / "cache"),
           "--no-error-summary"]
    for module in MODULES:
        cmd += ["-m", module]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stubs_are_really_used(tmp_path):
    """Guard against a silent pass: a wrong TensorRT call must fail the same check."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    stubs = copy_stubs(tmp_path / "stubs")
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\n\nbuilder = trt.Builder()\n")  # Builder needs a logger
    env = {**os.environ, "MYPYPATH": str(stubs)}
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "setup.cfg"), "--cache-dir",
                             str(tmp_path / "cache"), str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0 and "logger" in result.stdout, result.stdout
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
