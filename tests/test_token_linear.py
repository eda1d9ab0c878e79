"""TokenLinear: the fused model's nn.Linear, which runs large float32 CPU products as oneDNN 1x1 convolutions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rgt_fast.model import ONEDNN_LINEAR_MIN_MACS, ONEDNN_ON_X86, TokenLinear, linear_runs_on_onednn

from numerics import assert_fp32_close_to_exact

needs_onednn_on_x86 = pytest.mark.skipif(
    not ONEDNN_ON_X86, reason="TokenLinear takes the oneDNN path only on x86 builds of PyTorch with oneDNN")


def strided_rows(batch: int, tokens: int, features: int) -> torch.Tensor:
    """(batch, tokens, features) whose rows are 5 features apart inside a wider tensor: a view reshape must copy."""
    return torch.randn(batch, tokens, features + 7)[..., 5:features + 5]


def feature_major(batch: int, tokens: int, features: int) -> torch.Tensor:
    """(batch, tokens, features) stored features-first: the transposed layout a permute leaves behind."""
    return torch.randn(features, batch, tokens).permute(1, 2, 0)


INPUTS = {
    "contiguous tokens": (lambda: torch.randn(2, 37 * 29, 180), 540, True),
    "2-D rows, no bias": (lambda: torch.randn(4099, 181), 97, False),
    "strided rows": (lambda: strided_rows(2, 1001, 180), 180, True),
    "feature-major": (lambda: feature_major(3, 523, 90), 181, True),
}


@needs_onednn_on_x86
@pytest.mark.parametrize("case", list(INPUTS))
def test_onednn_path_matches_float64_linear_with_gradients(case):
    make_input, out_features, bias = INPUTS[case]
    x = make_input().requires_grad_()
    layer = TokenLinear(x.shape[-1], out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    assert linear_runs_on_onednn(x, layer.weight)
    out = assert_matches_float64_linear(layer, x)
    assert out.shape == (*x.shape[:-1], out_features) and out.is_contiguous()


def assert_matches_float64_linear(layer: TokenLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` and the gradients of x and of the layer's parameters against F.linear in float64."""
    out = layer(x)
    x64 = x.detach().double().requires_grad_()
    weight64 = layer.weight.detach().double().requires_grad_()
    bias64 = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    exact = F.linear(x64, weight64, bias64)
    assert_fp32_close_to_exact(out, exact, "output")

    grad = torch.randn_like(out)
    out.backward(grad)
    exact.backward(grad.double())
    assert_fp32_close_to_exact(x.grad, x64.grad, "input gradient")
    assert_fp32_close_to_exact(layer.weight.grad, weight64.grad, "weight gradient")
    if bias64 is not None:
        assert_fp32_close_to_exact(layer.bias.grad, bias64.grad, "bias gradient")
    return out


def every_other(t: torch.Tensor) -> torch.Tensor:
    """``t`` as every other element of the last dim of a tensor twice as wide."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"))
    wide[..., ::2] = t
    return wide[..., ::2]


# Parameters as views of other storage: what weight tying, pruning or a hand-built layer can hand TokenLinear.
PARAMETER_LAYOUTS = {
    "bias-expanded": ("bias", lambda bias: bias[:1].expand(bias.shape)),
    "bias-every-other": ("bias", every_other),
    "weight-expanded-rows": ("weight", lambda weight: weight[:1].expand(weight.shape)),
    "weight-expanded-columns": ("weight", lambda weight: weight[:, :1].expand(weight.shape)),
    "weight-every-other": ("weight", every_other),
    "weight-transposed-storage": ("weight", lambda weight: weight.t().contiguous().t()),
}


@needs_onednn_on_x86
@pytest.mark.parametrize("layout", list(PARAMETER_LAYOUTS))
def test_onednn_path_matches_f_linear_for_any_parameter_layout(layout):
    """oneDNN's convolution reads its bias as if contiguous: an expanded or sliced bias gave garbage (1e35)."""
    name, restride = PARAMETER_LAYOUTS[layout]
    layer = TokenLinear(64, 64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    setattr(layer, name, torch.nn.Parameter(restride(getattr(layer, name).detach())))
    x = torch.randn(1, 4096, 64, requires_grad=True)
    assert linear_runs_on_onednn(x, layer.weight)
    assert_matches_float64_linear(layer, x)


def test_onednn_path_only_where_it_was_measured_faster(monkeypatch):
    rows, weight = torch.randn(4096, 180), torch.randn(540, 180)
    assert linear_runs_on_onednn(rows, weight) == ONEDNN_ON_X86
    small = torch.randn(ONEDNN_LINEAR_MIN_MACS // (180 * 540) - 1, 180)
    assert not linear_runs_on_onednn(small, weight), "oneDNN's setup dominates small products"
    assert not linear_runs_on_onednn(rows.double(), weight.double()), "float64 stays on F.linear"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not linear_runs_on_onednn(rows, weight), "autocast's bf16 matmuls already run on oneDNN"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not linear_runs_on_onednn(rows, weight), "a user who disables oneDNN gets F.linear"


def test_fallback_is_f_linear():
    layer = TokenLinear(180, 90)
    x = torch.randn(3, 5, 180, dtype=torch.float64)
    layer.double()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


@needs_onednn_on_x86
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_onednn_path_compiles_without_graph_breaks(backend):
    layer = TokenLinear(180, 540)
    x = torch.randn(1, 37 * 29, 180, requires_grad=True)
    assert linear_runs_on_onednn(x, layer.weight)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-4)
    out.backward(grad := torch.randn_like(out))
    compiled_grad = x.grad
    x.grad = None
    F.linear(x, layer.weight, layer.bias).backward(grad)
    torch.testing.assert_close(compiled_grad, x.grad, rtol=1e-5, atol=1e-4)
