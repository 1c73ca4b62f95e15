"""PyTorch reference model. Imported only by export, training and the torch backend (never by the runtime)."""

from rsvlm_edge.modeling.model import RSVLM, build_model, load_model, parameter_counts, save_model

__all__ = ["RSVLM", "build_model", "load_model", "parameter_counts", "save_model"]
