"""The MoE transformer as single-device PyTorch code.

Parallelism is applied from outside (see `parallel/`): this package knows nothing about process
groups beyond two hooks, the MoE layer's token dispatcher and the router's statistics reducer.
"""
from moe.config import ModelConfig, load_model_config

__all__ = ["ModelConfig", "load_model_config"]
