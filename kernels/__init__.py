"""Triton kernels of rgt-fast, installed as ``rgt_fast.kernels``.

Each op lives in a module of its own name (``rgt_fast.kernels.rgsa_attention`` holds the kernels, launchers,
autograd and custom op of ``rgsa_attention``). The package exports the ops and their plain-PyTorch fallbacks, so
``rgt_fast.kernels.rgsa_attention`` is the op; reach a module's internals with
``importlib.import_module("rgt_fast.kernels.rgsa_attention")``.
"""
from .add_layer_norm import add_layer_norm, add_layer_norm_torch, layer_norm, layer_norm_torch
from .lsa_attention import lsa_attention, lsa_attention_torch
from .rgsa_attention import rgsa_attention, rgsa_attention_torch
from .spatial_gate import spatial_gate, spatial_gate_torch

__all__ = ["add_layer_norm", "add_layer_norm_torch", "layer_norm", "layer_norm_torch", "lsa_attention",
           "lsa_attention_torch", "rgsa_attention", "rgsa_attention_torch", "spatial_gate", "spatial_gate_torch"]
