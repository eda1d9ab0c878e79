"""The fused spatial gate (GELU, LayerNorm, depthwise conv, product) against the reference modules in float64."""
from __future__ import annotations

import importlib
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from guards import nan_surrounded
from kernel_device import KERNEL_DEVICE, drawn_shapes
from numerics import assert_fp32_close_to_exact, assert_within_flash_attention_bound
from rgt_fast.reference.rgt import SpatialGate

sg = importlib.import_module("rgt_fast.kernels.spatial_gate")

EPS = 1e-5
# Unwritten elements, stores outside a buffer and accesses racing between programs show up (conftest).
pytestmark = pytest.mark.usefixtures("kernel_memory_checks")


def make_inputs(batch, height, width, channels, dtype=torch.float32, strided=False):
    """Fresh random hidden activations, parameters away from their init values, and an upstream gradient."""
    shape = (batch, height * width, 2 * channels)
    if strided:  # channel-major storage: the token and channel strides are both not 1
        hidden = torch.randn(batch, 2 * channels, height * width, device=KERNEL_DEVICE).transpose(1, 2)
    else:
        hidden = torch.randn(shape, device=KERNEL_DEVICE)
    params = (1 + 0.3 * torch.randn(channels), 0.3 * torch.randn(channels), 0.3 * torch.randn(channels, 1, 3, 3),
              0.3 * torch.randn(channels))
    dout = torch.randn(batch, channels, height * width, device=KERNEL_DEVICE).transpose(1, 2)
    if not strided:
        dout = dout.contiguous()
    return hidden.to(dtype), [p.to(KERNEL_DEVICE) for p in params], dout.to(dtype)


def reference_gate(hidden, height, width, norm_weight, norm_bias, conv_weight, conv_bias):
    """The oracle: the reference MLP's GELU and SpatialGate module with these parameters."""
    module = SpatialGate(hidden.shape[2] // 2).to(device=hidden.device, dtype=hidden.dtype)
    with torch.no_grad():
        for target, value in zip((module.norm.weight, module.norm.bias, module.conv.weight, module.conv.bias),
                                 (norm_weight, norm_bias, conv_weight, conv_bias)):
            target.copy_(value)
    out = module(torch.nn.functional.gelu(hidden), height, width)
    return out, module


def guarded(hidden, height, width, *params):
    """The arguments as views surrounded by NaN (guards.nan_surrounded), so an unmasked read outside them shows
    up; the parameters with NaN between their elements too."""
    return (nan_surrounded(hidden), height, width, *(nan_surrounded(p, step=2) for p in params))


def output_and_grads(hidden, params, dout, height, width, dtype, fn, param_dtype=None):
    """Output and the gradients of hidden and of the four parameters, with hidden in ``dtype`` and the parameters
    in ``param_dtype`` (by default ``dtype``)."""
    leaf_hidden = hidden.detach().to(dtype).requires_grad_()
    leaf_params = [p.detach().to(param_dtype or dtype).requires_grad_() for p in params]
    out = fn(*guarded(leaf_hidden, height, width, *leaf_params))
    out.backward(nan_surrounded(dout.to(dtype)))
    return [out.detach()] + [t.grad for t in [leaf_hidden, *leaf_params]]


def oracle(hidden, params, dout, height, width, dtype=torch.float64):
    """The reference modules' output and gradients, run in ``dtype`` (float64: the oracle)."""
    leaf_hidden = hidden.detach().to(dtype).requires_grad_()
    out, module = reference_gate(leaf_hidden, height, width, *(p.to(dtype) for p in params))
    out.backward(dout.to(dtype))
    return [out.detach(), leaf_hidden.grad, module.norm.weight.grad, module.norm.bias.grad, module.conv.weight.grad,
            module.conv.bias.grad]


def fused(hidden, height, width, *params):
    return sg.spatial_gate(hidden, height, width, *params, EPS)


def fallback(hidden, height, width, *params):
    return sg.spatial_gate_torch(hidden, height, width, *params, EPS)


NAMES = ("out", "d_hidden", "d_norm_weight", "d_norm_bias", "d_conv_weight", "d_conv_bias")
# (batch, height, width, channels): odd maps, a single row and column, channel counts that are not tiles
# (60 pads to 64, 70 spans two channel blocks of the conv kernels).
SHAPES = [(2, 5, 7, 12), (1, 9, 13, 60), (3, 4, 17, 23), (1, 1, 9, 8), (2, 11, 1, 70)]


@pytest.mark.parametrize("batch,height,width,channels", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_fp32_matches_float64_reference_modules(batch, height, width, channels, strided):
    hidden, params, dout = make_inputs(batch, height, width, channels, strided=strided)
    got = output_and_grads(hidden, params, dout, height, width, torch.float32, fused)
    want = oracle(hidden, params, dout, height, width)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert_fp32_close_to_exact(g, w, name)


@drawn_shapes(15)
@given(batch=st.integers(1, 3), height=st.integers(1, 20), width=st.integers(1, 20), channels=st.integers(2, 100),
       strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fp32_matches_float64_reference_modules_at_any_shape(batch, height, width, channels, strided, seed):
    """Shapes drawn by Hypothesis (the same ones every run): maps of one row or column, channel counts on and off
    the kernels' blocks. One channel is left out: its LayerNorm has zero variance, and the float64 oracle's
    rounding there (about 1e-14) has no fp32 counterpart to be compared with."""
    torch.manual_seed(seed)
    hidden, params, dout = make_inputs(batch, height, width, channels, strided=strided)
    got = output_and_grads(hidden, params, dout, height, width, torch.float32, fused)
    want = oracle(hidden, params, dout, height, width)
    for name, g, w in zip(NAMES, got, want):
        assert_fp32_close_to_exact(g, w, name)


def test_many_token_tiles_per_backward_program_match(monkeypatch):
    """Force chunks of several tiles: the per-program partial sums must still cover every token exactly once."""
    monkeypatch.setattr(sg, "_BACKWARD_TARGET_PROGRAMS", 3)
    hidden, params, dout = make_inputs(2, 13, 11, 20)
    got = output_and_grads(hidden, params, dout, 13, 11, torch.float32, fused)
    want = oracle(hidden, params, dout, 13, 11)
    for name, g, w in zip(NAMES, got, want):
        assert_fp32_close_to_exact(g, w, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,height,width,channels", [(2, 12, 13, 60), (1, 17, 11, 36)])
def test_low_precision_within_flash_attention_bound(batch, height, width, channels, dtype):
    """Error against float64 at most twice that of the reference modules run in the same precision, plus a
    small absolute term (FlashAttention's rule)."""
    hidden, params, dout = make_inputs(batch, height, width, channels)
    want = oracle(hidden, params, dout, height, width)
    # As the model runs the kernels under autocast: 16-bit activations, fp32 parameters.
    got = output_and_grads(hidden, params, dout, height, width, dtype, fused, torch.float32)
    baseline = oracle(hidden, params, dout, height, width, dtype)
    for name, g, b, w in zip(NAMES, got, baseline, want):
        assert_within_flash_attention_bound(g, b, w, 1e-3 * w.abs().max().item(), name)


def test_parameter_gradients_bitwise_identical_between_runs(monkeypatch):
    monkeypatch.setattr(sg, "_BACKWARD_TARGET_PROGRAMS", 4)
    hidden, params, dout = make_inputs(2, 9, 10, 24)
    first = output_and_grads(hidden, params, dout, 9, 10, torch.float32, fused)
    second = output_and_grads(hidden, params, dout, 9, 10, torch.float32, fused)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_torch_fallback_matches_reference_modules():
    hidden, params, dout = make_inputs(2, 5, 6, 10)
    got = output_and_grads(hidden, params, dout, 5, 6, torch.float64, fallback)
    want = oracle(hidden, params, dout, 5, 6)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)


# (hidden dtype, parameter dtype): autocast's 16-bit activations with fp32 parameters, and the other mixes the
# kernels accept.
MIXED_DTYPES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                (torch.float32, torch.float16), (torch.float32, torch.float64), (torch.float64, torch.float32)]


@pytest.mark.parametrize("hidden_dtype,param_dtype", MIXED_DTYPES, ids=lambda dtype: str(dtype)[6:])
def test_torch_fallback_takes_mixed_dtypes_as_the_kernels_do(hidden_dtype, param_dtype):
    """Computed in fp32 (fp64 for fp64 hidden) on the rounded inputs: within a few units of the coarser dtype's
    precision of the float64 oracle; the output and hidden's gradient in hidden's dtype, each parameter's
    gradient in its own."""
    hidden, params, dout = make_inputs(2, 5, 7, 12)
    hidden, dout = hidden.to(hidden_dtype), dout.to(hidden_dtype)
    params = [p.to(param_dtype) for p in params]
    got = output_and_grads(hidden, params, dout, 5, 7, hidden_dtype, fallback, param_dtype)
    want = oracle(hidden, params, dout, 5, 7)
    precision = max(torch.finfo(hidden_dtype).eps, torch.finfo(param_dtype).eps)
    for name, g, w, dtype in zip(NAMES, got, want, [hidden_dtype] * 2 + [param_dtype] * 4):
        assert g.dtype == dtype, (name, g.dtype)
        torch.testing.assert_close(g.double(), w, atol=8 * precision * w.abs().max().item(), rtol=0, msg=name)


def test_float64_dispatches_to_torch_fallback():
    hidden, params, _ = make_inputs(1, 4, 5, 6, dtype=torch.float64)
    params = [p.double() for p in params]
    assert torch.equal(sg.spatial_gate(hidden, 4, 5, *params), sg.spatial_gate_torch(hidden, 4, 5, *params, EPS))


def test_empty_batch_gives_empty_output_and_zero_parameter_grads():
    hidden, params, dout = make_inputs(0, 4, 5, 6)
    got = output_and_grads(hidden, params, dout, 4, 5, torch.float32, fused)
    assert got[0].shape == (0, 20, 6) and got[1].shape == (0, 20, 12)
    for g in got[2:]:
        assert torch.equal(g, torch.zeros_like(g))


def _good_inputs():
    hidden, params, _ = make_inputs(1, 4, 5, 6)
    return [hidden, 4, 5, *params]


def _replace(position, value):
    def mutate(args):
        args = list(args)
        args[position] = value(args[position]) if callable(value) else value
        return args
    return mutate


@pytest.mark.parametrize("mutate,error,message", [
    (_replace(0, lambda h: h[..., :-1]), ValueError, "even, positive channel count"),
    (_replace(0, lambda h: h[..., :0]), ValueError, "even, positive channel count"),
    (_replace(0, lambda h: h[0]), ValueError, r"\(B, H\*W, 2C\)"),
    (_replace(1, 5), ValueError, "tokens per image"),
    (_replace(2, 0), ValueError, "width must be a positive int"),
    (_replace(1, 4.0), ValueError, "height must be a positive int"),
    (_replace(0, lambda h: h.int()), TypeError, "unsupported dtype"),
    (_replace(5, lambda w: w[:, :, :2]), ValueError, r"conv_weight must have shape \(6, 1, 3, 3\)"),
    (_replace(3, lambda w: w[:5]), ValueError, r"norm_weight must have shape \(6,\)"),
    (_replace(6, lambda b: b.to("meta")), ValueError, "conv_bias is on meta"),
    (_replace(0, lambda h: h.tolist()), TypeError, "must be a torch.Tensor"),
])
def test_bad_inputs_are_rejected_with_guidance(mutate, error, message):
    with pytest.raises(error, match=message):
        sg.spatial_gate(*mutate(_good_inputs()))


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.float64], ids=["kernels", "pytorch-path"])
@pytest.mark.parametrize("position,name,dtype", [(3, "norm_weight", torch.int64), (4, "norm_bias", torch.bool),
                                                 (5, "conv_weight", torch.int32), (6, "conv_bias", torch.int64)])
def test_non_floating_parameters_are_rejected_on_both_paths(position, name, dtype, hidden_dtype):
    """The kernels used to read integer parameters as numbers and the PyTorch path crashed inside F.layer_norm
    or F.conv2d."""
    args = _good_inputs()
    args[0] = args[0].to(hidden_dtype)
    args[position] = args[position].to(dtype)
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor"):
        sg.spatial_gate(*args)


@pytest.mark.parametrize("eps", [0.0, float("nan"), "1e-5"])
def test_bad_eps_is_rejected(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        sg.spatial_gate(*_good_inputs(), eps)


# The gate with the MLP's fc2 fused after it (``proj_weight``, ``proj_bias``), as the fused model runs it.
PROJECTED_NAMES = NAMES + ("d_proj_weight", "d_proj_bias")


def make_projection(channels, out_features, dtype=torch.float32):
    """fc2's weight and bias away from their init values, and an upstream gradient for its output."""
    return [(0.3 * torch.randn(out_features, channels)).to(KERNEL_DEVICE, dtype),
            (0.3 * torch.randn(out_features)).to(KERNEL_DEVICE, dtype)]


def projected(hidden, height, width, *params):
    return sg.spatial_gate(hidden, height, width, *params[:4], EPS, proj_weight=params[4], proj_bias=params[5])


def projected_fallback(hidden, height, width, *params):
    return sg.spatial_gate_torch(hidden, height, width, *params[:4], EPS, proj_weight=params[4], proj_bias=params[5])


def projected_oracle(hidden, params, dout, height, width, dtype=torch.float64):
    """The reference gate module followed by an nn.Linear, run in ``dtype``."""
    leaf_hidden = hidden.detach().to(dtype).requires_grad_()
    gate, module = reference_gate(leaf_hidden, height, width, *(p.to(dtype) for p in params[:4]))
    fc2 = torch.nn.Linear(params[4].shape[1], params[4].shape[0]).to(device=hidden.device, dtype=dtype)
    with torch.no_grad():
        fc2.weight.copy_(params[4])
        fc2.bias.copy_(params[5])
    out = fc2(gate)
    out.backward(dout.to(dtype))
    return [out.detach(), leaf_hidden.grad, module.norm.weight.grad, module.norm.bias.grad, module.conv.weight.grad,
            module.conv.bias.grad, fc2.weight.grad, fc2.bias.grad]


def projected_inputs(batch, height, width, channels, strided=False):
    hidden, params, _ = make_inputs(batch, height, width, channels, strided=strided)
    out_features = channels + 5
    dout = torch.randn(batch, height * width, out_features, device=KERNEL_DEVICE)
    return hidden, params + make_projection(channels, out_features), dout


@pytest.mark.parametrize("batch,height,width,channels", SHAPES[:3])
@pytest.mark.parametrize("strided", [False, True])
def test_projection_fp32_matches_float64_reference_modules(batch, height, width, channels, strided):
    hidden, params, dout = projected_inputs(batch, height, width, channels, strided)
    got = output_and_grads(hidden, params, dout, height, width, torch.float32, projected)
    want = projected_oracle(hidden, params, dout, height, width)
    for name, g, w in zip(PROJECTED_NAMES, got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert_fp32_close_to_exact(g, w, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_projection_low_precision_within_flash_attention_bound(dtype):
    """As the model runs it under autocast (16-bit activations, fp32 parameters): within FlashAttention's bound
    of the reference modules run in the same precision; each parameter's gradient in its own dtype."""
    hidden, params, dout = projected_inputs(2, 12, 13, 60)
    want = projected_oracle(hidden, params, dout, 12, 13)
    got = output_and_grads(hidden, params, dout, 12, 13, dtype, projected, torch.float32)
    baseline = projected_oracle(hidden, params, dout, 12, 13, dtype)
    for name, g, b, w in zip(PROJECTED_NAMES, got, baseline, want, strict=True):
        assert g.dtype == (dtype if name in ("out", "d_hidden") else torch.float32), name
        assert_within_flash_attention_bound(g, b, w, 1e-3 * w.abs().max().item(), name)


def test_projection_without_bias_matches_fc2_without_bias():
    hidden, params, dout = projected_inputs(2, 5, 7, 12)
    leaf = hidden.clone().requires_grad_()
    weight = params[4].clone().requires_grad_()
    out = sg.spatial_gate(leaf, 5, 7, *params[:4], EPS, proj_weight=weight)
    out.backward(dout)
    want = projected_oracle(hidden, [*params[:5], torch.zeros_like(params[5])], dout, 5, 7)
    for name, g, w in (("out", out.detach(), want[0]), ("d_hidden", leaf.grad, want[1]),
                       ("d_proj_weight", weight.grad, want[6])):
        assert_fp32_close_to_exact(g, w, name)


def test_projection_fallback_matches_reference_modules():
    hidden, params, dout = projected_inputs(2, 5, 6, 10)
    got = output_and_grads(hidden, params, dout, 5, 6, torch.float64, projected_fallback)
    want = projected_oracle(hidden, params, dout, 5, 6)
    for name, g, w in zip(PROJECTED_NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)


def test_projection_keeps_no_gate_sized_activation_for_the_backward():
    """The point of fusing fc2: of the activations, only ``hidden`` itself is saved; the gate's output (what an
    nn.Linear after the gate would keep) is recomputed by the backward kernels."""
    hidden, params, dout = projected_inputs(2, 6, 7, 12)
    hidden.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = projected(hidden, 6, 7, *params)
    activations = [t for t in saved if t.dim() == 3]
    assert [t.untyped_storage().data_ptr() for t in activations] == [hidden.untyped_storage().data_ptr()]
    out.backward(dout)  # and the backward still runs from what was saved
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("with_projection", [False, True], ids=["gate", "gate+projection"])
def test_torch_compile_fullgraph_matches_eager(with_projection):
    hidden, params, dout = (projected_inputs if with_projection else make_inputs)(1, 6, 7, 10)
    op, names = (projected, PROJECTED_NAMES) if with_projection else (fused, NAMES)

    def block(h, height, width, *p):
        return op(h, height, width, *p) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = output_and_grads(hidden, params, dout, 6, 7, torch.float32, compiled)
    want = output_and_grads(hidden, params, dout, 6, 7, torch.float32, block)
    for name, g, w in zip(names, got, want, strict=True):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("projection,error,message", [
    (dict(proj_bias=torch.zeros(6)), ValueError, "proj_bias was given without proj_weight"),
    (dict(proj_weight=torch.zeros(9, 5)), ValueError, r"proj_weight must be \(out_features, 6\)"),
    (dict(proj_weight=torch.zeros(6)), ValueError, r"proj_weight must be \(out_features, 6\)"),
    (dict(proj_weight=torch.zeros(9, 6), proj_bias=torch.zeros(8)), ValueError, r"proj_bias must have shape \(9,\)"),
    (dict(proj_weight=torch.zeros(9, 6, dtype=torch.int64)), TypeError, "proj_weight must be a floating-point"),
    (dict(proj_weight=torch.zeros(9, 6, device="meta")), ValueError, "proj_weight is on meta"),
])
def test_bad_projections_are_rejected_with_guidance(projection, error, message):
    args = _good_inputs()
    projection = {name: t.to(args[0].device) if t.device.type != "meta" else t for name, t in projection.items()}
    with pytest.raises(error, match=message):
        sg.spatial_gate(*args, proj_weight=projection.get("proj_weight"), proj_bias=projection.get("proj_bias"))


def _no_graph_outputs(hidden, params, height, width, with_projection, reuse_hidden):
    kwargs = dict(proj_weight=params[4], proj_bias=params[5]) if with_projection else {}
    with torch.no_grad():
        return sg.spatial_gate(hidden, height, width, *params[:4], EPS, reuse_hidden=reuse_hidden, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,height,width,channels", [(2, 5, 7, 12), (1, 9, 13, 70)])
@pytest.mark.parametrize("with_projection", [False, True], ids=["gate", "gate+projection"])
def test_reused_hidden_gives_the_same_result_without_buffers_of_its_own(batch, height, width, channels, dtype,
                                                                        with_projection):
    """Inference's in-place gate: the normalised map and the gate are written into hidden itself (no kernel
    buffer). The gate is bitwise the one computed in buffers of their own, and is the first half of hidden's
    memory; the projection reads it there with another row stride, which may change the matmul's order of sums."""
    hidden, params, _ = projected_inputs(batch, height, width, channels)
    hidden = hidden.to(dtype)
    want = _no_graph_outputs(hidden.clone(), params, height, width, with_projection, reuse_hidden=False)
    buffers_before = len(sg._common.kernel_buffer.allocations)
    got = _no_graph_outputs(hidden, params, height, width, with_projection, reuse_hidden=True)
    assert len(sg._common.kernel_buffer.allocations) == buffers_before
    if with_projection:
        torch.testing.assert_close(got, want, rtol=0, atol=torch.finfo(dtype).eps * want.abs().max().item())
    else:
        assert torch.equal(got, want)
        assert got.data_ptr() == hidden.data_ptr() and got.stride()[1:] == (2 * channels, 1)


@pytest.mark.parametrize("case", ["recorded by autograd", "not contiguous"])
def test_reuse_hidden_leaves_hidden_alone_where_it_cannot_apply(case):
    """Where the backward needs hidden, or hidden is a strided view, the flag changes nothing: hidden keeps its
    values and the gradients are the oracle's."""
    strided = case == "not contiguous"
    hidden, params, dout = projected_inputs(2, 6, 5, 12, strided=strided)
    leaf = hidden.clone().requires_grad_(not strided)
    before = leaf.detach().clone()
    out = sg.spatial_gate(leaf, 6, 5, *params[:4], EPS, proj_weight=params[4], proj_bias=params[5],
                          reuse_hidden=True)
    assert torch.equal(leaf.detach(), before)
    want = projected_oracle(hidden, params, dout, 6, 5)
    assert_fp32_close_to_exact(out.detach(), want[0], "out")
    if not strided:
        out.backward(dout)
        assert_fp32_close_to_exact(leaf.grad, want[1], "d_hidden")
