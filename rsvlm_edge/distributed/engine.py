"""An engine dir as the workers of a cluster see it.

Identity is the hash of what the directory vouches for: an exported engine dir's ``manifest.json`` already holds
the sha256 of every file a backend reads, so its own sha256 names the engine (the resume key of a scene run, and
the test a worker applies to a copy it finds at the driver's path). A checkpoint dir (torch backend) has no
manifest; its files' hashes stand in. A worker whose node has the same engine at the driver's path (one machine,
or a shared filesystem) opens it there; any other worker gets the files once through Ray's object store (one
transfer per node), unpacks them under the temp dir (where the next run on that node finds them) and opens them
with the backend's own sha256 verification.
No Ray import here: the actor passes the bundle in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rsvlm_edge.manifest import MANIFEST_FILE, engine_digest

# Small files beside the engines that a backend or the pipeline reads without the manifest naming them.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json")


def engine_files(model_dir: Path) -> list[str]:
    """The files a pipeline reads from ``model_dir``: the manifest and everything it names (graphs, data files,
    tokenizer), or, for a checkpoint dir without a manifest, every file at its top level."""
    manifest = model_dir / MANIFEST_FILE
    if not manifest.is_file():
        return sorted(p.name for p in model_dir.iterdir() if p.is_file())
    data = json.loads(manifest.read_text())
    names = {MANIFEST_FILE}
    for section in ("tokenizer", "generation_config"):
        if isinstance(data.get(section), dict) and "file" in data[section]:
            names.add(data[section]["file"])
    for component in data.get("components", {}).values():
        names.update(component.get("sha256", {}))
    names.update(n for n in _SIDE_FILES if (model_dir / n).is_file())
    return sorted(names)


def cache_root(root: str | Path | None = None) -> Path:
    """Where a node keeps the engines shipped to it, one folder per digest: ``<temp dir>/rsvlm-edge-engines``."""
    return Path(root or tempfile.gettempdir()) / "rsvlm-edge-engines"


@dataclass(frozen=True)
class EngineDir:
    """The driver's engine dir: its path, its digest and the files a worker needs from it. ``shared`` False:
    workers never open the driver's path, each node gets its own copy (a slow shared filesystem; tests)."""

    path: str
    digest: str
    files: tuple[str, ...]
    shared: bool = True

    @classmethod
    def of(cls, model_dir: str | Path, shared: bool = True) -> "EngineDir":
        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        return cls(str(path.resolve()), engine_digest(path), tuple(engine_files(path)), shared)

    def bundle(self) -> dict[str, bytes]:
        """Every file's bytes by name: what goes into the object store for workers that cannot see ``path``."""
        return {name: (Path(self.path) / name).read_bytes() for name in self.files}

    def local_copy(self) -> Path | None:
        """The driver's path on this node if it holds the same engine (digest compared), else None."""
        path = Path(self.path)
        if not self.shared:
            return None
        try:
            return path if path.is_dir() and engine_digest(path) == self.digest else None
        except OSError:
            return None

    def cached_copy(self, root: str | Path | None = None) -> Path | None:
        """The copy an earlier run unpacked on this node (:meth:`unpack`), if it is there whole."""
        path = cache_root(root) / self.digest
        try:
            return path if path.is_dir() and engine_digest(path) == self.digest else None
        except OSError:
            return None

    def unpack(self, bundle: dict[str, bytes], root: str | Path | None = None) -> Path:
        """Write ``bundle`` to ``<root>/rsvlm-edge-engines/<digest>`` (a copy already there is reused) and return
        it. The files land in a private folder that is renamed into place whole, so actors that share a node never
        see a half-written engine; the backend then verifies every file against the manifest as it loads."""
        base = cache_root(root)
        final = base / self.digest
        if self.cached_copy(root) is not None:
            return final
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.digest[:12]}-", dir=base))
        try:
            for name, data in bundle.items():
                (staging / name).write_bytes(data)
            if engine_digest(staging) != self.digest:
                raise ValueError(f"the engine shipped from {self.path} does not match its manifest hash")
            try:
                os.rename(staging, final)
            except OSError:  # another actor on this node put it there first
                if not (final.is_dir() and engine_digest(final) == self.digest):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final
