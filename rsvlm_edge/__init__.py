"""rsvlm-edge: a torch-free compiled runtime for remote-sensing MoE vision-language models."""

__version__ = "0.1.0"
