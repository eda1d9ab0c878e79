"""RG-SA attention kernels against a float64 oracle, in Triton's interpreter on CPU (or on CUDA when the
interpreter is off and a GPU is present)."""
import importlib
import os

# Must precede the first import of triton and rgt_fast: @triton.jit and kernels._common read it at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402
from kernel_device import KERNEL_DEVICE as DEVICE  # noqa: E402
from kernel_device import drawn_shapes  # noqa: E402
from guards import nan_surrounded  # noqa: E402
from numerics import assert_within_flash_attention_bound, max_error  # noqa: E402

rgsa = importlib.import_module("rgt_fast.kernels.rgsa_attention")

# Unwritten elements, stores outside a buffer and accesses racing between programs show up (conftest).
pytestmark = pytest.mark.usefixtures("kernel_memory_checks")


@pytest.fixture
def tf32_matmuls(request):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = previous


def make_inputs(batch, queries, keys, heads, dqk, dv, dtype):
    q = (torch.randn(batch, queries, heads, dqk, device=DEVICE) * 1.5).to(dtype)
    k = (torch.randn(batch, keys, heads, dqk, device=DEVICE) * 1.5).to(dtype)
    v = torch.randn(batch, keys, heads, dv, device=DEVICE).to(dtype)
    dout = torch.randn(batch, queries, heads, dv, device=DEVICE).to(dtype)
    return q, k, v, dout


def in_model_layouts(q, k, v):
    """Strided views as the model produces them, each surrounded by NaN (guards.nan_surrounded): q a view of a
    projection with more channels than q needs, k stored head-major, v read with a stride of 2 along its head
    dim. An unmasked read outside them puts NaN in the result."""
    return nan_surrounded(q), nan_surrounded(k, memory_order=(0, 2, 1, 3)), nan_surrounded(v, step=2)


def plain_attention(q, k, v, scale):
    """The reference module's computation, in whatever dtype its inputs have."""
    scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale
    return (scores.softmax(dim=-1) @ v.transpose(1, 2)).transpose(1, 2)


def rounding_scales(q, k, v, dout, scale):
    """Per element of (out, dq, dk, dv), the sum of the magnitudes of the terms it adds up, in float64: the scale
    of fp32 rounding error, also where the terms cancel (with one key, dq and dk are exactly 0, yet the kernels,
    which take delta = rowsum(dO * O) as FlashAttention does, cancel terms of the size of dO . v)."""
    q, k, v, dout = (t.double().transpose(1, 2) for t in (q, k, v, dout))
    probs = ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1)
    out = probs @ v
    score_grads = probs * (dout.abs() @ v.abs().transpose(-1, -2) + (dout.abs() * out.abs()).sum(-1, keepdim=True))
    scales = (probs @ v.abs(), scale * score_grads @ k.abs(), scale * score_grads.transpose(-1, -2) @ q.abs(),
              probs.transpose(-1, -2) @ dout.abs())
    return [t.transpose(1, 2) for t in scales]


def output_and_grads(attention, q, k, v, dout, cast=None):
    leaves = [t.detach().clone().to(cast or t.dtype).requires_grad_() for t in (q, k, v)]
    out = attention(*in_model_layouts(*leaves))
    out.backward(nan_surrounded(dout.to(out.dtype)))
    return [out.detach()] + [leaf.grad for leaf in leaves]


CASES = [
    pytest.param(2, 37 * 5, 7, 3, 15, 30, None, id="rgt-heads-odd-sizes"),
    pytest.param(1, 150, 100, 2, 5, 10, None, id="embed60-several-key-blocks"),
    pytest.param(2, 130, 1, 2, 16, 32, None, id="single-key"),
    pytest.param(1, 200, 40, 2, 15, 30, 16, id="forced-small-chunks"),
    pytest.param(2, 185, 16, 2, 15, 30, 16, id="training-map-forced-chunks"),
    # 16-bit: two whole 64-key blocks, then a masked tail of one key.
    pytest.param(1, 75, 129, 2, 15, 30, None, id="whole-key-blocks-and-a-tail"),
    # 16-bit: three whole blocks and no tail, so the last block's look-ahead load reads nothing.
    pytest.param(2, 70, 192, 3, 15, 30, None, id="whole-key-blocks-only"),
]


def assert_fp32_matches_float64(q, k, v, dout, scale, chunk):
    """fp32 output and gradients against float64: each element within 1e-5 of its rounding scale (the largest
    ratio measured was 1.7e-6)."""
    got = output_and_grads(lambda *t: rgsa.rgsa_attention(*t, scale, backward_query_chunk=chunk), q, k, v, dout)
    want = output_and_grads(lambda *t: plain_attention(*t, scale), q, k, v, dout, cast=torch.float64)
    for name, g, w, bound in zip(("out", "dq", "dk", "dv"), got, want, rounding_scales(q, k, v, dout, scale)):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        excess = ((g.double() - w).abs() - 1e-5 * bound).max().item()
        assert excess <= 0, f"{name}: an error exceeds 1e-5 of its rounding scale by {excess:.3e}"  # NaN fails too
    assert got[0].is_contiguous()


@pytest.mark.parametrize("batch,queries,keys,heads,dqk,dv,chunk", CASES)
@pytest.mark.parametrize("tf32_matmuls", [False], indirect=True)
def test_fp32_matches_float64_oracle(batch, queries, keys, heads, dqk, dv, chunk, tf32_matmuls):
    q, k, v, dout = make_inputs(batch, queries, keys, heads, dqk, dv, torch.float32)
    assert_fp32_matches_float64(q, k, v, dout, dqk ** -0.5, chunk)


@pytest.mark.parametrize("tf32_matmuls", [False], indirect=True)
@drawn_shapes(30)
@given(batch=st.integers(1, 3), queries=st.integers(1, 300), keys=st.integers(1, 90), heads=st.integers(1, 3),
       dqk=st.integers(1, 40), dv=st.integers(1, 72), chunk=st.sampled_from([None, 16, 48]),
       seed=st.integers(0, 2**31 - 1))
def test_fp32_matches_float64_oracle_at_any_shape(tf32_matmuls, batch, queries, keys, heads, dqk, dv, chunk, seed):
    """Shapes drawn by Hypothesis (the same ones every run): head dims and token counts on and off tile sizes,
    single keys, one query, several query chunks."""
    torch.manual_seed(seed)
    q, k, v, dout = make_inputs(batch, queries, keys, heads, dqk, dv, torch.float32)
    assert_fp32_matches_float64(q, k, v, dout, dqk ** -0.5, chunk)


@pytest.mark.parametrize("batch,queries,keys,heads,dqk,dv,chunk", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_flash_attention_bound(batch, queries, keys, heads, dqk, dv, chunk, dtype):
    """FlashAttention's rule: the kernel's error against float64 is at most twice that of the plain
    computation run in the same precision, plus a small absolute term."""
    q, k, v, dout = make_inputs(batch, queries, keys, heads, dqk, dv, dtype)
    scale = dqk ** -0.5
    got = output_and_grads(lambda *t: rgsa.rgsa_attention(*t, scale, backward_query_chunk=chunk), q, k, v, dout)
    plain = output_and_grads(lambda *t: plain_attention(*t, scale), q, k, v, dout)
    want = output_and_grads(lambda *t: plain_attention(*t, scale), q, k, v, dout, cast=torch.float64)
    for name, g, p, w in zip(("out", "dq", "dk", "dv"), got, plain, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert_within_flash_attention_bound(g, p, w, 1e-3, name)


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to TF32's 10 mantissa bits (to nearest, ties away from zero), as float64."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).double()


def tf32_attention_and_grads(q, k, v, dout, scale):
    """(out, dq, dk, dv) as TF32 matrix units compute them: every matmul operand rounded to TF32, the rest in
    float64. PyTorch's own matmuls are no such baseline: cuBLAS may run these head dims (15, 30) and strided
    views on IEEE fp32 kernels even with TF32 allowed, and its fp32 error is far below TF32's."""
    q, k, v, dout = (t.double().transpose(1, 2) for t in (q, k, v, dout))
    probs = ((to_tf32(q) @ to_tf32(k).transpose(-1, -2)) * scale).softmax(dim=-1)
    out = to_tf32(probs) @ to_tf32(v)
    dprobs = to_tf32(dout) @ to_tf32(v).transpose(-1, -2)
    dscores = probs * (dprobs - (dout * out).sum(dim=-1, keepdim=True))
    grads = (scale * to_tf32(dscores) @ to_tf32(k), scale * to_tf32(dscores).transpose(-1, -2) @ to_tf32(q),
             to_tf32(probs).transpose(-1, -2) @ to_tf32(dout))
    return [t.transpose(1, 2) for t in (out, *grads)]


@pytest.mark.parametrize("tf32_matmuls", [True], indirect=True)
def test_tf32_setting_selects_tf32_kernels(tf32_matmuls):
    assert rgsa._operand_precision(torch.float32) == "tf32"
    q, k, v, dout = make_inputs(2, 150, 70, 2, 15, 30, torch.float32)
    got = output_and_grads(lambda *t: rgsa.rgsa_attention(*t, 0.3), q, k, v, dout)
    want = output_and_grads(lambda *t: plain_attention(*t, 0.3), q, k, v, dout, cast=torch.float64)
    tf32 = tf32_attention_and_grads(q, k, v, dout, 0.3)
    for name, b, w in zip(("out", "dq", "dk", "dv"), tf32, want):  # the baseline does round
        assert max_error(b, w) > 1e-5 * w.abs().max().item(), name
    if DEVICE == "cpu":
        # The interpreter multiplies in full fp32, so there the TF32 tiles must match as tightly as the IEEE ones.
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * max(1.0, w.abs().max().item()))
        return
    # TF32 MMAs keep 10 mantissa bits: FlashAttention's rule, against the same computation with TF32 operands.
    for name, g, b, w in zip(("out", "dq", "dk", "dv"), got, tf32, want):
        assert_within_flash_attention_bound(g, b, w, 1e-3 * w.abs().max().item(), name)


# fp32 tests with tight bounds pin TF32 off: on a GPU the kernels and torch.matmul follow the process-wide flag.
@pytest.mark.parametrize("tf32_matmuls", [False], indirect=True)
def test_saved_logsumexp_is_natural_log_of_row_sums(tf32_matmuls):
    q, k, v, _ = make_inputs(2, 90, 33, 2, 15, 30, torch.float32)
    out, lse = torch.ops.rgt_fast.rgsa_attention_forward(q, k, v, 0.4, 0)
    scores = (q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1)) * 0.4
    torch.testing.assert_close(lse.double(), scores.logsumexp(dim=-1), rtol=1e-6, atol=1e-5)
    assert lse.shape == (2, 2, 90) and lse.dtype == torch.float32


@pytest.mark.parametrize("keys", [16, 100])
def test_dk_dv_bitwise_identical_between_runs(keys):
    q, k, v, dout = make_inputs(2, 150, keys, 2, 15, 30, torch.bfloat16)
    runs = [output_and_grads(lambda *t: rgsa.rgsa_attention(*t, 0.25, backward_query_chunk=32), q, k, v, dout)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("tf32_matmuls", [False], indirect=True)
def test_torch_fallback_matches_kernels(tf32_matmuls):
    q, k, v, dout = make_inputs(2, 100, 20, 3, 15, 30, torch.float32)
    got = output_and_grads(lambda *t: rgsa.rgsa_attention(*t, 0.3), q, k, v, dout)
    fallback = output_and_grads(lambda *t: rgsa.rgsa_attention_torch(*t, 0.3), q, k, v, dout)
    for g, f in zip(got, fallback):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-5)
    assert fallback[0].is_contiguous()


def test_float64_dispatches_to_torch_fallback():
    q, k, v, dout = make_inputs(1, 50, 9, 2, 5, 10, torch.float64)
    got = output_and_grads(lambda *t: rgsa.rgsa_attention(*t, 0.5), q, k, v, dout)
    want = output_and_grads(lambda *t: plain_attention(*t, 0.5), q, k, v, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_empty_image_gives_empty_output_and_zero_key_grads():
    q, k, v, dout = make_inputs(1, 0, 4, 2, 15, 30, torch.float32)
    out, dq, dk, dv = output_and_grads(lambda *t: rgsa.rgsa_attention(*t, 0.3), q, k, v, dout)
    assert out.shape == (1, 0, 2, 30) and dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@pytest.mark.parametrize("score_elements", [1, 2 * 2 * 9 * 7, 1 << 30], ids=["row-slices", "7-row-slices", "one-slice"])
def test_torch_fallback_query_slices_match_float64(monkeypatch, score_elements):
    """The fallback attends in query slices sized by score_elements_per_step: every slicing gives the same answer,
    including a last slice shorter than the others (50 rows in slices of 7)."""
    monkeypatch.setattr(rgsa, "score_elements_per_step", lambda device: score_elements)
    q, k, v, dout = make_inputs(2, 50, 9, 2, 5, 10, torch.float64)
    q, k, v, dout = (t.cpu() for t in (q, k, v, dout))
    got = output_and_grads(lambda *t: rgsa.rgsa_attention_torch(*t, 0.5), q, k, v, dout)
    want = output_and_grads(lambda *t: plain_attention(*t, 0.5), q, k, v, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_torch_fallback_under_torch_compile_matches_eager():
    """Under torch.compile the fallback takes its one-slice branch; values and gradients match eager mode."""
    q, k, v, dout = (t.cpu() for t in make_inputs(2, 70, 9, 2, 5, 10, torch.float64))

    def attention(q, k, v):
        return rgsa.rgsa_attention_torch(q, k, v, 0.5)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="eager", fullgraph=True)
    for g, w in zip(output_and_grads(compiled, q, k, v, dout), output_and_grads(attention, q, k, v, dout)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v, dout = make_inputs(1, 80, 16, 2, 15, 30, torch.float32)

    def block(q, k, v):
        return rgsa.rgsa_attention(q, k, v, 0.3).flatten(2) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = output_and_grads(compiled, q, k, v, dout.flatten(2))
    want = output_and_grads(block, q, k, v, dout.flatten(2))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _good_inputs():
    return make_inputs(1, 8, 4, 2, 15, 30, torch.float32)[:3]


@pytest.mark.parametrize("mutate,error,message", [
    (lambda q, k, v: (q.flatten(2), k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "N' = 0"),
    (lambda q, k, v: (q, k[:, :3], v), ValueError, "same number of key tokens"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch sizes differ"),
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "head counts"),
    (lambda q, k, v: (q, k[..., :5], v), ValueError, "head dims (dim 3) differ"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "unsupported dtype"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "must be a torch.Tensor"),
])
def test_bad_inputs_are_rejected_with_guidance(mutate, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        rgsa.rgsa_attention(*mutate(*_good_inputs()), 0.3)


# The float64 inputs take the PyTorch path: both paths check their arguments alike.
BOTH_PATHS = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernels", "pytorch-path"])


@BOTH_PATHS
@pytest.mark.parametrize("scale,error,message", [
    ("0.3", TypeError, "scale must be a real number"),
    (True, TypeError, "scale must be a real number"),
    (torch.tensor(0.3), TypeError, "scale must be a real number"),
    (float("nan"), ValueError, "scale must be a finite"),
    (float("-inf"), ValueError, "scale must be a finite"),
    (1e39, ValueError, "magnitude at most 2.359e"),  # inf once the kernels take it as a float32
    (-3e38, ValueError, "magnitude at most 2.359e"),  # finite in float32, but not times log2(e)
])
def test_bad_scale_is_rejected(scale, error, message, dtype):
    with pytest.raises(error, match=message):
        rgsa.rgsa_attention(*(t.to(dtype) for t in _good_inputs()), scale)


def test_numpy_scale_is_taken_as_its_value():
    q, k, v = _good_inputs()
    assert torch.equal(rgsa.rgsa_attention(q, k, v, np.float32(0.25)), rgsa.rgsa_attention(q, k, v, 0.25))


@BOTH_PATHS
@pytest.mark.parametrize("chunk", [1.5, 0, -16, True, "16"])
def test_bad_backward_query_chunk_is_rejected_before_the_forward(chunk, dtype):
    """1.5 used to pass the forward and crash in the backward; the PyTorch path ignored any value."""
    with pytest.raises(ValueError, match="backward_query_chunk must be None .* or an int >= 1"):
        rgsa.rgsa_attention(*(t.to(dtype) for t in _good_inputs()), 0.3, backward_query_chunk=chunk)


def test_head_dims_beyond_the_kernels_take_the_pytorch_path():
    q, k, v, _ = make_inputs(1, 8, 4, 1, 130, 30, torch.float32)
    assert torch.equal(rgsa.rgsa_attention(q, k, v, 0.1), rgsa.rgsa_attention_torch(q, k, v, 0.1))
