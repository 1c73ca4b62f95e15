"""The installed ``rsvlm_edge`` namespace as a folder tree that mypy can read.

setup.cfg installs the top-level folders under the package (``package_dir``: ``rsvlm_edge.export`` -> ``export/``
...). The editable install maps them with an import hook, which mypy does not run, so ``mypy -p rsvlm_edge`` would
see ``rsvlm_edge/`` alone. A tree of symlinks, ``rsvlm_edge/`` entries plus each mapped folder under its installed
name, gives mypy the real module names. The mapping is read from setup.cfg, so a newly mapped folder is covered too.
"""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mapped_folders() -> dict[str, Path]:
    """Installed subpackage name (``export``) -> its folder in the repo, from setup.cfg's ``package_dir``."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    out = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, folder = (part.strip() for part in line.partition("="))
        prefix = "rsvlm_edge."
        if name.startswith(prefix) and "." not in name[len(prefix):]:
            out[name[len(prefix):]] = REPO / folder
    return out


def installed_packages() -> list[str]:
    """setup.cfg's ``packages``: every package the wheel installs."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg["options"]["packages"].split()


def mirror_package(dest: Path) -> Path:
    """Build ``dest/rsvlm_edge`` (symlinks) and return ``dest``, the folder to put on ``MYPYPATH``."""
    pkg = dest / "rsvlm_edge"
    pkg.mkdir(parents=True)
    for entry in (REPO / "rsvlm_edge").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in mapped_folders().items():
        (pkg / name).symlink_to(folder)
    return dest
