"""The fused residual add + LayerNorm against ``x + delta`` and nn.LayerNorm in float64."""
from __future__ import annotations

import importlib
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from guards import nan_surrounded
from kernel_device import KERNEL_DEVICE, drawn_shapes
from numerics import assert_fp32_close_to_exact, assert_within_flash_attention_bound
aln = importlib.import_module("rgt_fast.kernels.add_layer_norm")

EPS = 1e-5
NAMES = ("summed", "normed", "d_x", "d_delta", "d_weight", "d_bias")
# Unwritten elements, stores outside a buffer and accesses racing between programs show up (conftest).
pytestmark = pytest.mark.usefixtures("kernel_memory_checks")


def make_inputs(batch, tokens, channels, strided=False):
    """Fresh random inputs, parameters away from their init values, and gradients for both outputs."""
    if strided:  # channel-major storage, and delta a slice of a wider tensor
        x = torch.randn(batch, channels, tokens, device=KERNEL_DEVICE).transpose(1, 2)
        delta = torch.randn(batch, tokens, channels + 7, device=KERNEL_DEVICE)[..., 3:3 + channels]
    else:
        x = torch.randn(batch, tokens, channels, device=KERNEL_DEVICE)
        delta = torch.randn(batch, tokens, channels, device=KERNEL_DEVICE)
    weight = (1 + 0.3 * torch.randn(channels)).to(KERNEL_DEVICE)
    bias = (0.3 * torch.randn(channels)).to(KERNEL_DEVICE)
    grads = [torch.randn(batch, tokens, channels, device=KERNEL_DEVICE) for _ in range(2)]
    return [x, delta, weight, bias], grads


def run_reference(inputs, grads, dtypes):
    """Outputs and gradients of the reference block's add and LayerNorm with x, delta, weight, bias in ``dtypes``."""
    x, delta, weight, bias = (t.detach().to(d).requires_grad_() for t, d in zip(inputs, dtypes))
    summed = x + delta
    normed = torch_layer_norm(summed, weight, bias)
    torch.autograd.backward([summed, normed], [grads[0].to(summed.dtype), grads[1].to(normed.dtype)])
    return [summed.detach(), normed.detach(), x.grad, delta.grad, weight.grad, bias.grad]


def guarded(*tensors):
    """Activations surrounded by NaN, and the (last) 1-D parameters with NaN between their elements too."""
    return [nan_surrounded(t, step=2 if t.dim() == 1 else 1) for t in tensors]


def run_fused(inputs, grads, dtypes, op=aln.add_layer_norm):
    """The op on views surrounded by NaN (guards.nan_surrounded), so an unmasked read outside them shows up; the
    parameters with NaN between their elements too."""
    leaves = [t.detach().to(d).requires_grad_() for t, d in zip(inputs, dtypes)]
    summed, normed = op(*guarded(*leaves), EPS)
    torch.autograd.backward([summed, normed], [nan_surrounded(grads[0].to(summed.dtype)),
                                               nan_surrounded(grads[1].to(normed.dtype))])
    return [summed.detach(), normed.detach()] + [t.grad for t in leaves]


FP32 = (torch.float32,) * 4
FP64 = (torch.float64,) * 4


@pytest.mark.parametrize("batch,tokens,channels", [(2, 37, 180), (3, 11, 60), (1, 9, 23), (2, 130, 64)])
@pytest.mark.parametrize("strided", [False, True])
def test_fp32_matches_float64_reference(batch, tokens, channels, strided):
    inputs, grads = make_inputs(batch, tokens, channels, strided)
    got = run_fused(inputs, grads, FP32)
    want = run_reference(inputs, grads, FP64)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert_fp32_close_to_exact(g, w, name)


@drawn_shapes(25)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 200), channels=st.integers(2, 300), strided=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_fp32_matches_float64_reference_at_any_shape(batch, tokens, channels, strided, seed):
    """Shapes drawn by Hypothesis (the same ones every run): one token, widths on and off powers of two. One
    channel is left out: its LayerNorm has zero variance, and the float64 oracle's rounding there (about 1e-14)
    has no fp32 counterpart to be compared with."""
    torch.manual_seed(seed)
    inputs, grads = make_inputs(batch, tokens, channels, strided)
    got = run_fused(inputs, grads, FP32)
    want = run_reference(inputs, grads, FP64)
    for name, g, w in zip(NAMES, got, want):
        assert_fp32_close_to_exact(g, w, name)


def test_many_row_tiles_per_backward_program_match(monkeypatch):
    """Force chunks of several tiles: the per-program partial sums must cover every row exactly once."""
    monkeypatch.setattr(aln, "_BACKWARD_TARGET_PROGRAMS", 3)
    inputs, grads = make_inputs(2, 150, 60)
    got = run_fused(inputs, grads, FP32)
    want = run_reference(inputs, grads, FP64)
    for name, g, w in zip(NAMES, got, want):
        assert_fp32_close_to_exact(g, w, name)


@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.bfloat16, torch.float32, torch.float32),  # autocast: fp32 stream, bf16 attention output
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16, torch.float16),
], ids=["fp32+bf16", "bf16", "fp16"])
def test_low_precision_within_flash_attention_bound(dtypes):
    """Error against float64 at most twice that of the reference in the same dtypes, plus a small absolute
    term (FlashAttention's rule); the gradient of each input comes back in that input's dtype."""
    inputs, grads = make_inputs(2, 45, 180)
    inputs = [t.to(d) for t, d in zip(inputs, dtypes)]  # both runs see the same rounded inputs
    got = run_fused(inputs, grads, dtypes)
    baseline = run_reference(inputs, grads, dtypes)
    want = run_reference(inputs, grads, FP64)
    for name, g, b, w in zip(NAMES, got, baseline, want):
        assert g.dtype == b.dtype, (name, g.dtype, b.dtype)
        assert_within_flash_attention_bound(g, b, w, 1e-3 * w.abs().max().item(), name)


def test_normed_output_takes_the_autocast_dtype():
    """Under autocast the normalised rows come out in the dtype the next Linear would cast them to."""
    inputs, _ = make_inputs(1, 20, 60)
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        summed, normed = aln.add_layer_norm(*inputs, EPS)
    assert summed.dtype == torch.float32 and normed.dtype == torch.bfloat16
    x64, delta64, weight64, bias64 = (t.double() for t in inputs)
    want = torch_layer_norm(x64 + delta64, weight64, bias64)
    # One rounding to bf16 of the exact value: within half a bf16 ulp (2**-8 relative), plus fp32 noise.
    torch.testing.assert_close(normed.double(), want, rtol=2**-8 + 1e-5, atol=1e-6)


# (x, delta, weight and bias dtypes): mixes the kernels take, on which the PyTorch path crashed in F.layer_norm.
MIXED_DTYPES = {
    "fp32-rows-bf16-parameters": (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16),
    "fp32-rows-fp64-parameters": (torch.float32, torch.float32, torch.float64, torch.float64),
    "fp64-rows-fp32-parameters": (torch.float64, torch.float64, torch.float32, torch.float32),
    "fp64-x-fp32-delta": (torch.float64, torch.float32, torch.float32, torch.float32),
}


def assert_close_to_rounded_inputs_oracle(got, want, dtypes):
    """Each result in its dtype (``dtypes`` maps result names to them, in order) and, against the float64 oracle
    run on the same (rounded) inputs, as close as one computed in fp32 or better and rounded once to that dtype,
    whatever the other inputs' dtypes."""
    for (name, dtype), g, w in zip(dtypes.items(), got, want):
        assert g.dtype == dtype, (name, g.dtype)
        precision = max(torch.finfo(g.dtype).eps, torch.finfo(torch.float32).eps)
        torch.testing.assert_close(g.double(), w, atol=8 * precision * w.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("dtypes", MIXED_DTYPES.values(), ids=MIXED_DTYPES.keys())
def test_torch_fallback_takes_mixed_dtypes(dtypes):
    inputs, grads = make_inputs(2, 13, 23)
    inputs = [t.to(d) for t, d in zip(inputs, dtypes)]
    got = run_fused(inputs, grads, dtypes, aln.add_layer_norm_torch)
    want = run_reference(inputs, grads, FP64)
    summed_dtype = torch.promote_types(*dtypes[:2])
    assert_close_to_rounded_inputs_oracle(got, want, dict(zip(NAMES, (summed_dtype, summed_dtype, *dtypes))))


@pytest.mark.parametrize("used", ["summed", "normed"])
def test_one_output_unused(used):
    inputs, grads = make_inputs(2, 19, 30)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    summed, normed = aln.add_layer_norm(*leaves, EPS)
    (summed if used == "summed" else normed).backward(grads[0])
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref_summed, ref_normed = aln.add_layer_norm_torch(*ref_leaves, EPS)
    (ref_summed if used == "summed" else ref_normed).backward(grads[0].double())
    for g, w in zip(leaves, ref_leaves):
        if w.grad is None:
            assert g.grad is None or torch.equal(g.grad, torch.zeros_like(g.grad))
        else:
            assert_fp32_close_to_exact(g.grad, w.grad, "gradient")


def test_parameter_gradients_bitwise_identical_between_runs(monkeypatch):
    monkeypatch.setattr(aln, "_BACKWARD_TARGET_PROGRAMS", 4)
    inputs, grads = make_inputs(2, 100, 60)
    first, second = run_fused(inputs, grads, FP32), run_fused(inputs, grads, FP32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_backward_keeps_the_inputs_not_the_fp32_sum():
    """As under autocast (fp32 residual stream, bf16 attention output): the op saves x and delta themselves for
    the backward and recomputes the sum there; no fp32 (B, N, C) tensor of its own is kept alive."""
    inputs, grads = make_inputs(2, 37, 60)
    x = inputs[0].clone().requires_grad_()
    delta = inputs[1].bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        summed, normed = aln.add_layer_norm(x, delta, *inputs[2:], EPS)
    rows = {t.untyped_storage().data_ptr() for t in saved if t.shape == x.shape}
    assert rows == {x.untyped_storage().data_ptr(), delta.untyped_storage().data_ptr()}
    torch.autograd.backward([summed, normed], grads)
    want = run_reference([x.detach(), delta.detach().double(), *inputs[2:]], grads, FP64)
    for name, got, w in zip(NAMES[2:4], (x.grad, delta.grad), want[2:4]):
        assert got.dtype == (torch.float32 if name == "d_x" else torch.bfloat16), name
        torch.testing.assert_close(got.double(), w, rtol=2**-7, atol=1e-5 * w.abs().max().item(), msg=name)


def test_float64_dispatches_to_torch_fallback():
    inputs, _ = make_inputs(1, 7, 12)
    inputs = [t.double() for t in inputs]
    for got, want in zip(aln.add_layer_norm(*inputs, EPS), aln.add_layer_norm_torch(*inputs, EPS)):
        assert torch.equal(got, want)


def test_empty_batch_gives_empty_outputs_and_zero_parameter_grads():
    inputs, grads = make_inputs(0, 5, 12)
    got = run_fused(inputs, grads, FP32)
    assert got[0].shape == (0, 5, 12) and got[2].shape == (0, 5, 12)
    assert torch.equal(got[4], torch.zeros(12, device=KERNEL_DEVICE))
    assert torch.equal(got[5], torch.zeros(12, device=KERNEL_DEVICE))


def test_torch_compile_fullgraph_matches_eager():
    inputs, grads = make_inputs(1, 21, 30)

    def block(x, delta, weight, bias):
        summed, normed = aln.add_layer_norm(x, delta, weight, bias, EPS)
        return summed * 2.0, normed + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, block):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        torch.autograd.backward(list(outs), grads)
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    for name, g, w in zip(NAMES, *results):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=name)


def _replace(position, value):
    def mutate(args):
        args = list(args)
        args[position] = value(args[position])
        return args
    return mutate


@pytest.mark.parametrize("mutate,error,message", [
    (_replace(0, lambda x: x[0]), ValueError, r"must both be \(B, N, C\)"),
    (_replace(1, lambda d: d[:, :-1]), ValueError, r"must both be \(B, N, C\)"),
    (_replace(1, lambda d: d.int()), TypeError, "delta has unsupported dtype"),
    (_replace(2, lambda w: w[:-1]), ValueError, r"weight must have shape \(12,\)"),
    (_replace(3, lambda b: b.to("meta")), ValueError, "bias is on meta"),
    (_replace(0, lambda x: x.tolist()), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_are_rejected_with_guidance(mutate, error, message):
    inputs, _ = make_inputs(1, 6, 12)
    with pytest.raises(error, match=message):
        aln.add_layer_norm(*mutate(inputs))


@pytest.mark.parametrize("eps", [0.0, float("inf"), "1e-5"])
def test_bad_eps_is_rejected(eps):
    inputs, _ = make_inputs(1, 6, 12)
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        aln.add_layer_norm(*inputs, eps)


# float64 rows take the PyTorch path: both paths check their arguments alike.
BOTH_PATHS = pytest.mark.parametrize("rows_dtype", [torch.float32, torch.float64], ids=["kernels", "pytorch-path"])


@BOTH_PATHS
@pytest.mark.parametrize("position,name,dtype", [(2, "weight", torch.int64), (3, "bias", torch.bool)])
def test_non_floating_parameters_are_rejected(position, name, dtype, rows_dtype):
    """The kernels used to read integer parameters as numbers and the PyTorch path crashed in F.layer_norm."""
    inputs, _ = make_inputs(1, 6, 12)
    inputs = [t.to(rows_dtype) for t in inputs[:2]] + inputs[2:]
    inputs[position] = inputs[position].to(dtype)
    with pytest.raises(TypeError, match=f"^add_layer_norm: {name} must be a floating-point tensor"):
        aln.add_layer_norm(*inputs)
    with pytest.raises(TypeError, match=f"^layer_norm: {name} must be a floating-point tensor"):
        aln.layer_norm(inputs[0], *inputs[2:])


# The plain LayerNorm (the blocks' norm1) on the same kernels: no add, no gradient of a sum.

def run_layer_norm(fn, x, weight, bias, grad, dtypes):
    leaves = [t.detach().to(d).requires_grad_() for t, d in zip((x, weight, bias), dtypes)]
    out = fn(*guarded(*leaves))
    out.backward(nan_surrounded(grad.to(out.dtype)))
    return [out.detach()] + [t.grad for t in leaves]


def torch_layer_norm(x, weight, bias):
    """PyTorch's LayerNorm in the rows' precision. CUDA's refuses parameters of another dtype outside autocast, so
    they are cast to the rows' dtype inside the graph (their gradients still come back in their own dtype)."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), EPS)


def fused_layer_norm(x, weight, bias):
    return aln.layer_norm(x, weight, bias, EPS)


def fallback_layer_norm(x, weight, bias):
    return aln.layer_norm_torch(x, weight, bias, EPS)


LAYER_NORM_NAMES = ("normed", "d_x", "d_weight", "d_bias")


@pytest.mark.parametrize("batch,tokens,channels", [(2, 37, 180), (1, 9, 23)])
@pytest.mark.parametrize("strided", [False, True])
def test_layer_norm_fp32_matches_float64(batch, tokens, channels, strided, monkeypatch):
    monkeypatch.setattr(aln, "_BACKWARD_TARGET_PROGRAMS", 2)  # several row tiles per program as well
    (x, _, weight, bias), (grad, _) = make_inputs(batch, tokens, channels, strided)
    got = run_layer_norm(fused_layer_norm, x, weight, bias, grad, (torch.float32,) * 3)
    want = run_layer_norm(torch_layer_norm, x, weight, bias, grad, (torch.float64,) * 3)
    for name, g, w in zip(LAYER_NORM_NAMES, got, want):
        assert g.dtype == torch.float32, name
        assert_fp32_close_to_exact(g, w, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_low_precision_within_flash_attention_bound(dtype):
    (x, _, weight, bias), (grad, _) = make_inputs(2, 45, 180)
    x = x.to(dtype)
    dtypes = (dtype, torch.float32, torch.float32)
    got = run_layer_norm(fused_layer_norm, x, weight, bias, grad, dtypes)
    baseline = run_layer_norm(torch_layer_norm, x, weight, bias, grad, dtypes)
    want = run_layer_norm(torch_layer_norm, x, weight, bias, grad, (torch.float64,) * 3)
    for name, g, b, w in zip(LAYER_NORM_NAMES, got, baseline, want):
        assert g.dtype == b.dtype, (name, g.dtype, b.dtype)
        assert_within_flash_attention_bound(g, b, w, 1e-3 * w.abs().max().item(), name)


def test_layer_norm_output_takes_the_autocast_dtype():
    (x, _, weight, bias), _ = make_inputs(1, 20, 60)
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        normed = aln.layer_norm(x, weight, bias, EPS)
    assert normed.dtype == torch.bfloat16
    want = torch_layer_norm(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(normed.double(), want, rtol=2**-8 + 1e-5, atol=1e-6)


LAYER_NORM_MIXED_DTYPES = {
    "fp32-x-bf16-parameters": (torch.float32, torch.bfloat16, torch.bfloat16),
    "fp64-x-fp32-parameters": (torch.float64, torch.float32, torch.float32),
}


@pytest.mark.parametrize("dtypes", LAYER_NORM_MIXED_DTYPES.values(), ids=LAYER_NORM_MIXED_DTYPES.keys())
def test_layer_norm_torch_fallback_takes_mixed_dtypes(dtypes):
    (x, _, weight, bias), (grad, _) = make_inputs(2, 13, 23)
    x, weight, bias = (t.to(d) for t, d in zip((x, weight, bias), dtypes))
    got = run_layer_norm(fallback_layer_norm, x, weight, bias, grad, dtypes)
    want = run_layer_norm(torch_layer_norm, x, weight, bias, grad, (torch.float64,) * 3)
    assert_close_to_rounded_inputs_oracle(got, want, dict(zip(LAYER_NORM_NAMES, (dtypes[0], *dtypes))))


def test_torch_fallbacks_also_give_the_autocast_dtype():
    """As the kernels do (and their docstrings say): under autocast the normalised rows come out in the dtype the
    next Linear would cast them to; float64, which autocast leaves alone, stays float64."""
    inputs, _ = make_inputs(1, 20, 60)
    x, _, weight, bias = inputs
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        summed, normed = aln.add_layer_norm_torch(*inputs, EPS)
        normed_alone = aln.layer_norm_torch(x, weight, bias, EPS)
        _, normed_float64 = aln.add_layer_norm(*(t.double() for t in inputs), EPS)
    assert summed.dtype == torch.float32 and normed.dtype == normed_alone.dtype == torch.bfloat16
    assert normed_float64.dtype == torch.float64
    x64, delta64, weight64, bias64 = (t.double() for t in inputs)
    want = torch_layer_norm(x64 + delta64, weight64, bias64)
    torch.testing.assert_close(normed.double(), want, rtol=2**-8 + 1e-5, atol=1e-6)
    want_alone = torch_layer_norm(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(normed_alone.double(), want_alone, rtol=2**-8 + 1e-5, atol=1e-6)


@pytest.mark.parametrize("args,error,message", [
    (lambda x, w, b: (x[0], w, b), ValueError, r"layer_norm: x must be \(B, N, C\)"),
    (lambda x, w, b: (x.int(), w, b), TypeError, "layer_norm: x has unsupported dtype"),
    (lambda x, w, b: (x, w[:-1], b), ValueError, r"layer_norm: weight must have shape \(12,\)"),
    (lambda x, w, b: (x, w, b.to("meta")), ValueError, "layer_norm: bias is on meta"),
    (lambda x, w, b: (x, w, b, 0.0), ValueError, "layer_norm: eps must be a positive finite number"),
])
def test_layer_norm_bad_inputs_name_layer_norm_and_its_arguments(args, error, message):
    (x, _, weight, bias), _ = make_inputs(1, 6, 12)
    with pytest.raises(error, match=f"^{message}"):
        aln.layer_norm(*args(x, weight, bias))


def test_layer_norm_gradients_bitwise_identical_between_runs(monkeypatch):
    monkeypatch.setattr(aln, "_BACKWARD_TARGET_PROGRAMS", 4)
    (x, _, weight, bias), (grad, _) = make_inputs(2, 100, 60)
    first = run_layer_norm(fused_layer_norm, x, weight, bias, grad, (torch.float32,) * 3)
    second = run_layer_norm(fused_layer_norm, x, weight, bias, grad, (torch.float32,) * 3)
    for name, a, b in zip(LAYER_NORM_NAMES, first, second):
        assert torch.equal(a, b), name


def test_layer_norm_torch_compile_fullgraph_matches_eager():
    (x, _, weight, bias), (grad, _) = make_inputs(1, 21, 30)

    def block(x, weight, bias):
        return fused_layer_norm(x, weight, bias) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = run_layer_norm(compiled, x, weight, bias, grad, (torch.float32,) * 3)
    want = run_layer_norm(block, x, weight, bias, grad, (torch.float32,) * 3)
    for name, g, w in zip(LAYER_NORM_NAMES, got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=name)


def test_layer_norm_float64_dispatches_to_torch():
    (x, _, weight, bias), _ = make_inputs(1, 7, 12)
    x, weight, bias = x.double(), weight.double(), bias.double()
    assert torch.equal(aln.layer_norm(x, weight, bias, EPS), torch_layer_norm(x, weight, bias))


# Both ops with the linear layer that reads the normalised rows fused in (``proj_weight``, ``proj_bias``), as the
# fused model runs them: add_layer_norm with the MLP's fc1, layer_norm with L-SA's qkv.
PROJECTED_NAMES = ("summed", "out", "d_x", "d_delta", "d_weight", "d_bias", "d_proj_weight", "d_proj_bias")
OUT_FEATURES = 2 * 23 + 1  # odd, and wider than the rows as fc1 and qkv are


def make_projected_inputs(batch, tokens, channels, strided=False):
    inputs, grads = make_inputs(batch, tokens, channels, strided)
    projection = [0.3 * torch.randn(OUT_FEATURES, channels, device=KERNEL_DEVICE),
                  0.3 * torch.randn(OUT_FEATURES, device=KERNEL_DEVICE)]
    return inputs + projection, [grads[0], torch.randn(batch, tokens, OUT_FEATURES, device=KERNEL_DEVICE)]


def projected_reference(inputs, grads, dtypes, with_add=True):
    """The reference block's add, LayerNorm and nn.Linear, all in ``dtypes`` (one per input)."""
    x, delta, weight, bias, proj_weight, proj_bias = (t.detach().to(d).requires_grad_()
                                                       for t, d in zip(inputs, dtypes))
    summed = x + delta if with_add else x
    out = torch.nn.functional.linear(torch_layer_norm(summed, weight, bias), proj_weight, proj_bias)
    if with_add:
        torch.autograd.backward([summed, out], [grads[0].to(summed.dtype), grads[1].to(out.dtype)])
    else:
        out.backward(grads[1].to(out.dtype))
    return [summed.detach(), out.detach(), x.grad, delta.grad, weight.grad, bias.grad, proj_weight.grad,
            proj_bias.grad]


def projected_fused(inputs, grads, dtypes, with_add=True, add_op=aln.add_layer_norm, norm_op=aln.layer_norm):
    """The op with the projection on NaN-surrounded views (see run_fused)."""
    leaves = [t.detach().to(d).requires_grad_() for t, d in zip(inputs, dtypes)]
    x, delta, weight, bias, proj_weight, proj_bias = guarded(*leaves)
    if with_add:
        summed, out = add_op(x, delta, weight, bias, EPS, proj_weight=proj_weight, proj_bias=proj_bias)
        torch.autograd.backward([summed, out], [nan_surrounded(grads[0].to(summed.dtype)),
                                                nan_surrounded(grads[1].to(out.dtype))])
    else:
        summed = leaves[0]
        out = norm_op(x, weight, bias, EPS, proj_weight=proj_weight, proj_bias=proj_bias)
        out.backward(nan_surrounded(grads[1].to(out.dtype)))
    return [summed.detach(), out.detach()] + [t.grad for t in leaves]


WITH_ADD = pytest.mark.parametrize("with_add", [True, False], ids=["add_layer_norm", "layer_norm"])


@WITH_ADD
@pytest.mark.parametrize("batch,tokens,channels", [(2, 37, 180), (1, 9, 23)])
@pytest.mark.parametrize("strided", [False, True])
def test_projection_fp32_matches_float64_reference(batch, tokens, channels, strided, with_add):
    inputs, grads = make_projected_inputs(batch, tokens, channels, strided)
    got = projected_fused(inputs, grads, (torch.float32,) * 6, with_add)
    want = projected_reference(inputs, grads, (torch.float64,) * 6, with_add)
    for name, g, w in zip(PROJECTED_NAMES, got, want, strict=True):
        if w is None:  # layer_norm has no delta
            assert g is None, name
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert_fp32_close_to_exact(g, w, name)


@WITH_ADD
def test_projection_under_autocast_within_flash_attention_bound(with_add):
    """As the model runs them under bf16 autocast: the fp32 residual stream, a bf16 attention output, fp32
    parameters; the projection in bf16 with bf16 output. Within FlashAttention's bound of the reference modules
    under the same autocast; every gradient in its input's dtype."""
    inputs, grads = make_projected_inputs(2, 45, 180)
    inputs[1] = inputs[1].bfloat16()
    dtypes = [t.dtype for t in inputs]
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        got = projected_fused(inputs, grads, dtypes, with_add)
        baseline = projected_reference(inputs, grads, dtypes, with_add)
    want = projected_reference(inputs, grads, (torch.float64,) * 6, with_add)
    for name, g, b, w in zip(PROJECTED_NAMES, got, baseline, want, strict=True):
        if w is None:
            continue
        assert g.dtype == b.dtype, (name, g.dtype, b.dtype)
        assert_within_flash_attention_bound(g, b, w, 1e-3 * w.abs().max().item(), name)


@WITH_ADD
def test_projection_fallback_matches_float64_reference(with_add):
    inputs, grads = make_projected_inputs(2, 13, 23)
    got = projected_fused(inputs, grads, (torch.float64,) * 6, with_add, aln.add_layer_norm_torch,
                          aln.layer_norm_torch)
    want = projected_reference(inputs, grads, (torch.float64,) * 6, with_add)
    for name, g, w in zip(PROJECTED_NAMES, got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=name)


@WITH_ADD
def test_projection_keeps_no_normalised_rows_for_the_backward(with_add):
    """The point of fusing the linear layer: the op keeps its inputs and per-row statistics, not the normalised
    rows, which the nn.Linear after an unfused LayerNorm would keep."""
    inputs, grads = make_projected_inputs(2, 21, 30)
    leaves = [t.clone().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if with_add:
            aln.add_layer_norm(*leaves[:4], EPS, proj_weight=leaves[4], proj_bias=leaves[5])
        else:
            aln.layer_norm(leaves[0], *leaves[2:4], EPS, proj_weight=leaves[4], proj_bias=leaves[5])
    rows = {t.untyped_storage().data_ptr() for t in saved if t.dim() == 3}
    assert rows == {t.untyped_storage().data_ptr() for t in leaves[:2 if with_add else 1]}


def test_projection_without_bias_and_with_the_sum_unused():
    inputs, grads = make_projected_inputs(2, 19, 30)
    leaves = [t.clone().requires_grad_() for t in inputs[:5]]
    _, out = aln.add_layer_norm(*leaves[:4], EPS, proj_weight=leaves[4])
    out.backward(grads[1])
    references = [t.detach().double().requires_grad_() for t in inputs[:5]]
    x, delta, weight, bias, proj_weight = references
    torch.nn.functional.linear(torch_layer_norm(x + delta, weight, bias), proj_weight).backward(grads[1].double())
    for name, g, w in zip(("d_x", "d_delta", "d_weight", "d_bias", "d_proj_weight"), leaves, references):
        assert_fp32_close_to_exact(g.grad, w.grad, name)


@WITH_ADD
def test_projection_torch_compile_fullgraph_matches_eager(with_add):
    inputs, grads = make_projected_inputs(1, 21, 30)

    def add_op(*args, **kwargs):
        summed, out = aln.add_layer_norm(*args, **kwargs)
        return summed, out * 2.0

    def norm_op(*args, **kwargs):
        return aln.layer_norm(*args, **kwargs) * 2.0

    torch._dynamo.reset()
    compiled = [torch.compile(op, backend="aot_eager", fullgraph=True) for op in (add_op, norm_op)]
    got = projected_fused(inputs, grads, (torch.float32,) * 6, with_add, *compiled)
    want = projected_fused(inputs, grads, (torch.float32,) * 6, with_add, add_op, norm_op)
    for name, g, w in zip(PROJECTED_NAMES, got, want, strict=True):
        assert (g is None and w is None) or torch.equal(g, w), name


@pytest.mark.parametrize("projection,error,message", [
    (dict(proj_bias=torch.ones(5)), ValueError, "proj_bias was given without proj_weight"),
    (dict(proj_weight=torch.ones(9, 11)), ValueError, r"proj_weight must be \(out_features, 12\)"),
    (dict(proj_weight=torch.ones(9, 12), proj_bias=torch.ones(8)), ValueError, r"proj_bias must have shape \(9,\)"),
    (dict(proj_weight=torch.ones(9, 12, dtype=torch.int32)), TypeError, "proj_weight must be a floating-point"),
    (dict(proj_weight=torch.ones(9, 12, device="meta")), ValueError, "proj_weight is on meta"),
])
def test_bad_projections_are_rejected_with_guidance(projection, error, message):
    inputs, _ = make_inputs(1, 6, 12)
    projection = {k: v if v.device.type == "meta" else v.to(KERNEL_DEVICE) for k, v in projection.items()}
    with pytest.raises(error, match=f"^add_layer_norm: {message}"):
        aln.add_layer_norm(*inputs, **projection)
    with pytest.raises(error, match=f"^layer_norm: {message}"):
        aln.layer_norm(inputs[0], *inputs[2:], **projection)


@pytest.mark.parametrize("with_projection", [False, True], ids=["normed", "normed+projection"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_reused_delta_gives_the_same_result_without_a_buffer_for_the_normalised_rows(with_projection, autocast):
    """Inference's in-place normalisation: the rows are written over delta (same dtype: the attention's output
    under autocast) instead of into a kernel buffer, and both results are bitwise the buffered ones."""
    (x, delta, weight, bias), _ = make_inputs(2, 37, 60)
    if autocast:  # as in the model: the residual stream in fp32, the attention output in the autocast dtype
        delta = delta.to(torch.bfloat16)
    projection = dict(proj_weight=torch.randn(70, 60, device=KERNEL_DEVICE),
                      proj_bias=torch.randn(70, device=KERNEL_DEVICE)) if with_projection else {}
    with torch.no_grad(), torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16, enabled=autocast):
        want = aln.add_layer_norm(x, delta.clone(), weight, bias, EPS, **projection)
        buffers_before = len(aln._common.kernel_buffer.allocations)
        got = aln.add_layer_norm(x, delta, weight, bias, EPS, reuse_delta=True, **projection)
    # The sum's buffer and the row statistics only.
    assert [numel for _, _, numel in aln._common.kernel_buffer.allocations[buffers_before:]] == [x.numel(), 74, 74]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    if not with_projection:
        assert got[1].data_ptr() == delta.data_ptr()


@pytest.mark.parametrize("case", ["recorded by autograd", "not contiguous", "another dtype"])
def test_reuse_delta_leaves_delta_alone_where_it_cannot_apply(case):
    """Where the backward needs delta, delta is a strided view, or the normalised rows have another dtype, the
    flag changes nothing: delta keeps its values and the results are the float64 reference's."""
    inputs, grads = make_inputs(2, 37, 60, strided=case == "not contiguous")
    x, delta, weight, bias = inputs
    if case == "another dtype":
        delta = delta.to(torch.bfloat16)
    delta.requires_grad_(case == "recorded by autograd")
    before = delta.detach().clone()
    with torch.autocast(KERNEL_DEVICE, dtype=torch.float16, enabled=case == "another dtype"):
        summed, normed = aln.add_layer_norm(x, delta, weight, bias, EPS, reuse_delta=True)
    assert torch.equal(delta.detach(), before)
    want = run_reference([x, delta.detach().float(), weight, bias], grads, FP64)
    assert_fp32_close_to_exact(summed.detach(), want[0], "summed")
    if case != "another dtype":
        assert_fp32_close_to_exact(normed.detach(), want[1], "normed")
