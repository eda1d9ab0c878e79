"""What users import: the ops and fallbacks that ``rgt_fast.kernels`` exports, as the README's table names them."""
import importlib

import torch

import rgt_fast.kernels


# The module of each exported name.
MODULES = {"add_layer_norm": "add_layer_norm", "layer_norm": "add_layer_norm", "lsa_attention": "lsa_attention",
           "rgsa_attention": "rgsa_attention", "spatial_gate": "spatial_gate"}


def test_the_package_exports_each_op_and_fallback_of_its_modules():
    exported = set(rgt_fast.kernels.__all__)
    assert exported == set(MODULES) | {f"{name}_torch" for name in MODULES}
    for name in exported:
        module = importlib.import_module(f"rgt_fast.kernels.{MODULES[name.removesuffix('_torch')]}")
        assert callable(getattr(module, name)) and getattr(rgt_fast.kernels, name) is getattr(module, name), name


def test_rgsa_attention_is_callable_from_the_package_as_documented():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 21, 2, 5), torch.randn(2, 7, 2, 5), torch.randn(2, 7, 2, 10)
    out = rgt_fast.kernels.rgsa_attention(q, k, v, 0.4)
    torch.testing.assert_close(out, rgt_fast.kernels.rgsa_attention_torch(q, k, v, 0.4))
