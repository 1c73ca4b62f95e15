"""rsvlm-edge: a torch-free compiled runtime for remote-sensing MoE vision-language models.

``from rsvlm_edge import Pipeline, Result``: see :mod:`rsvlm_edge.pipeline`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Pipeline", "Result", "InferenceResult", "__version__"]

if TYPE_CHECKING:
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.results import InferenceResult, Result

#: Top-level names loaded on first use: ``import rsvlm_edge.config`` (training, export) should not pull in the
#: runtime's backends and generation loop.
_LAZY = {"Pipeline": "rsvlm_edge.pipeline", "Result": "rsvlm_edge.results", "InferenceResult": "rsvlm_edge.results"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rsvlm_edge' has no attribute {name!r}")
