"""Fused L-SA attention core (rgt_fast.kernels.lsa_attention) against the reference L-SA module in float64.

Under TRITON_INTERPRET=1 the Triton kernels run in Triton's interpreter on CPU tensors; with the interpreter off
and a GPU present they run compiled on CUDA, with the same tests. The interpreter pays a fixed cost per tile
operation: at the shipped tile sizes a 32x32 map with one head per branch takes about ten seconds forward and
backward. So there the shape and path coverage runs with whole-window tiles (one tile per window, same kernels),
and the shipped tile configs of each dot class (16-bit, tf32, ieee fp32) run on small padded maps, where windows
span several tiles.
"""
import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import torch  # noqa: E402
from kernel_device import KERNEL_DEVICE as DEVICE  # noqa: E402
from kernel_device import drawn_shapes  # noqa: E402
from guards import nan_surrounded  # noqa: E402
from numerics import assert_within_flash_attention_bound, max_error  # noqa: E402

lsa = importlib.import_module("rgt_fast.kernels.lsa_attention")
from rgt_fast.reference.rgt import LSA  # noqa: E402

SPLIT = [8, 32]
TABLE_ROWS = 15 * 63
# Unwritten elements, stores outside a buffer and accesses racing between programs show up (conftest).
pytestmark = pytest.mark.usefixtures("kernel_memory_checks")

# The PyTorch path is the same device-generic code everywhere; its CPU run under the interpreter covers it.
pytorch_path_on_cpu = pytest.mark.skipif(DEVICE != "cpu", reason="checks the PyTorch path, run on CPU tensors")


@pytest.fixture
def allow_tf32(request):
    """fp32 runs the tf32 kernels when set: TF32 MMAs on a GPU; the interpreter computes every dot in full fp32,
    so there only the tile configs change."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = saved


def three_score_grad_sum_chunks(num_items: int, programs_per_chunk: int, device: torch.device) -> int:
    """Stands in for lsa._score_grad_sum_chunks: three dS-sum chunks per head on either device (the last one
    short on the maps that use it), where the GPU rule would give each (batch, window) item a chunk of its own."""
    return 3


def make_module(dim: int, heads: int, shifted: bool, reso: int) -> LSA:
    # Block 2 of group 0 is a shifted block and block 0 is not (the official rule).
    module = LSA(dim, heads, split_size=SPLIT, shift_size=[4, 16], qkv_bias=True, qk_scale=None,
                 idx=2 if shifted else 0, reso=reso, rs_id=0).to(DEVICE, torch.float64)
    assert module.shifted == shifted
    return module


def position_bias_parameters(module: LSA) -> list:
    return [p for attn in module.attns for p in attn.pos.parameters()]


def run_reference(module: LSA, qkv: torch.Tensor, H: int, W: int, grad_out: torch.Tensor) -> dict:
    """Output and gradients of the reference; its tables become leaves so their own gradients can be compared."""
    tables = [attn.position_bias_table() for attn in module.attns]
    leaves = [table.detach().requires_grad_() for table in tables]
    qkv = qkv.detach().requires_grad_()
    for attn, leaf in zip(module.attns, leaves):
        attn.position_bias_table = lambda leaf=leaf: leaf
    try:
        out = module.attend(qkv, H, W)
    finally:
        for attn in module.attns:
            del attn.position_bias_table
    grad_qkv, *grad_tables = torch.autograd.grad(out, [qkv, *leaves], grad_out)
    grad_parameters = torch.autograd.grad(tables, position_bias_parameters(module), grad_tables)
    return dict(out=out.detach(), qkv=grad_qkv, tables=grad_tables, parameters=grad_parameters)


def run_fused(module: LSA, qkv: torch.Tensor, H: int, W: int, grad_out: torch.Tensor, layout=nan_surrounded) -> dict:
    """Output and gradients through lsa_attention, the tables straight from the position-bias MLPs. The op gets
    ``layout(qkv)``: by default a view whose row ends and neighbours are NaN, so that any unmasked read outside
    it puts NaN in the result."""
    tables = [attn.position_bias_table() for attn in module.attns]
    qkv = qkv.detach().requires_grad_()
    out = lsa.lsa_attention(layout(qkv), H, W, module.num_heads, SPLIT, module.shifted, *tables,
                            module.attns[0].scale)
    grad_qkv, *grads = torch.autograd.grad(out, [qkv, *tables, *position_bias_parameters(module)],
                                           nan_surrounded(grad_out.to(out.dtype)))
    return dict(out=out.detach(), qkv=grad_qkv, tables=grads[:2], parameters=grads[2:])


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str, scale=None):
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element the kernels did not write?)"
    scale = max(expected.abs().max().item() if scale is None else scale, 1e-12)
    error = max_error(actual, expected)
    assert error <= tolerance * scale, f"{what}: max error {error:.3e} > {tolerance:g} x {scale:.3e}"


def parameter_gradient_scale(reference: dict) -> float:
    """Size of the MLP-parameter gradients' rounding: they are sums of table gradients, some cancelling to ~0
    (the last bias gets sum(dS) = 0), so their error scales with the tables' L1 norm, not with their own size."""
    return sum(grad.abs().sum().item() for grad in reference["tables"])


def assert_matches_reference(result: dict, reference: dict, tolerance: float):
    assert result["out"].shape == reference["out"].shape
    assert_close_to(result["out"], reference["out"], tolerance, "output")
    assert_close_to(result["qkv"], reference["qkv"], tolerance, "dqkv")
    for branch in (0, 1):
        assert_close_to(result["tables"][branch], reference["tables"][branch], tolerance, f"table {branch} grad")
    for index, (grad, ref_grad) in enumerate(zip(result["parameters"], reference["parameters"])):
        assert_close_to(grad, ref_grad, tolerance, f"MLP parameter {index} grad", parameter_gradient_scale(reference))


def assert_within_twice_the_plain_error(result: dict, plain: dict, reference: dict):
    """FlashAttention's rule: error vs float64 <= 2 x the error of the reference run at the kernel's precision,
    plus 1e-3 of the largest value (about one fp16 or TF32 unit in the last place there)."""
    assert result["out"].shape == reference["out"].shape
    checks = [("output", "out", None), ("dqkv", "qkv", None)]
    checks += [(f"table {b} grad", "tables", b) for b in (0, 1)]
    checks += [(f"MLP parameter {i} grad", "parameters", i) for i in range(len(reference["parameters"]))]
    for name, key, index in checks:
        actual, plain_value, expected = (r[key] if index is None else r[key][index] for r in (result, plain, reference))
        assert not torch.isnan(actual).any(), name
        scale = parameter_gradient_scale(reference) if key == "parameters" else expected.abs().max().item()
        assert_within_flash_attention_bound(actual, plain_value, expected, 1e-3 * scale, name)


def assert_fp32_matches_reference(module: LSA, qkv: torch.Tensor, H: int, W: int, grad_out: torch.Tensor):
    """The fused op on fp32 qkv against the float64 reference, at the bound of the precision its dots run in."""
    result = run_fused(module, qkv.float(), H, W, grad_out)
    assert result["out"].dtype == torch.float32
    reference = run_reference(module, qkv, H, W, grad_out)
    if DEVICE == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        # TF32 MMAs round their operands to 10 mantissa bits: relative errors near 1e-3, a hundred times the IEEE
        # bound. The bound is then the 16-bit test's, against the reference run in fp32 with TF32 matmuls too.
        plain = run_reference(copy.deepcopy(module).float(), qkv.float(), H, W, grad_out.float())
        assert_within_twice_the_plain_error(result, plain, reference)
    else:
        # IEEE fp32 dots, and every dot under the interpreter: only fp32 rounding separates kernel and reference.
        assert_matches_reference(result, reference, 1e-5)


# (H, W, batch, dim, heads, shifted, reso): all but one map are padded and not multiples of the windows.
FP32_CASES = {
    "30x66-unshifted": (30, 66, 1, 64, 2, False, 64),
    "24x40-shifted-batch2-rebuilt-mask": (24, 40, 2, 64, 2, True, 64),
    "64x64-shifted-cached-mask": (64, 64, 1, 64, 2, True, 64),
    "24x30-shifted-head-dim-30": (24, 30, 1, 180, 6, True, 64),
    "24x30-unshifted-embed-60": (24, 30, 1, 60, 6, False, 64),
}


@pytest.mark.parametrize("allow_tf32", [True], indirect=True)
@pytest.mark.parametrize("case", FP32_CASES.values(), ids=FP32_CASES.keys())
def test_fp32_matches_reference(case, allow_tf32, whole_window_tiles, monkeypatch):
    H, W, batch, dim, heads, shifted, reso = case
    if batch > 1:
        # The chunked reduction of the table gradient.
        monkeypatch.setattr(lsa, "_score_grad_sum_chunks", three_score_grad_sum_chunks)
    module = make_module(dim, heads, shifted, reso)
    qkv = torch.randn(batch, H * W, 3 * dim, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(batch, H * W, dim, dtype=torch.float64, device=DEVICE)
    assert_fp32_matches_reference(module, qkv, H, W, grad_out)


@pytest.mark.parametrize("allow_tf32", [True], indirect=True)
@drawn_shapes(6)
@given(H=st.integers(1, 40), W=st.integers(1, 40), batch=st.integers(1, 2), shifted=st.booleans(),
       dim_heads=st.sampled_from([(64, 2), (60, 6)]), seed=st.integers(0, 2**31 - 1))
def test_fp32_matches_reference_at_any_size(allow_tf32, whole_window_tiles, monkeypatch, H, W, batch, shifted,
                                            dim_heads, seed):
    """Sizes drawn by Hypothesis (the same ones every run): maps smaller than a window, one row or column of
    windows, padding on either axis or both."""
    monkeypatch.setattr(lsa, "_score_grad_sum_chunks", three_score_grad_sum_chunks)
    torch.manual_seed(seed)
    dim, heads = dim_heads
    module = make_module(dim, heads, shifted, 64)
    qkv = torch.randn(batch, H * W, 3 * dim, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(batch, H * W, dim, dtype=torch.float64, device=DEVICE)
    assert_fp32_matches_reference(module, qkv, H, W, grad_out)


@pytest.mark.parametrize("allow_tf32", [True, False], indirect=True, ids=["tf32-tiles", "ieee-tiles"])
def test_fp32_shipped_tiles_match_reference(allow_tf32):
    H, W = 24, 30
    module = make_module(64, 2, True, 64)
    qkv = torch.randn(1, H * W, 3 * 64, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(1, H * W, 64, dtype=torch.float64, device=DEVICE)
    assert_fp32_matches_reference(module, qkv, H, W, grad_out)


# Shipped 16-bit tiles, both shift modes. reso is the padded size: the reference's rebuilt masks stay float32
# and cannot be added to bf16 scores, its cached mask buffers follow the module's dtype.
LOW_PRECISION_CASES = {
    "bf16-24x30-shifted": (torch.bfloat16, 24, 30, True, 32),
    "fp16-24x30-unshifted": (torch.float16, 24, 30, False, 64),
}


@pytest.mark.parametrize("case", LOW_PRECISION_CASES.values(), ids=LOW_PRECISION_CASES.keys())
def test_low_precision_within_twice_the_pytorch_error(case):
    """FlashAttention's rule: error vs float64 <= 2 x the error of the reference run in that dtype + a small term."""
    dtype, H, W, shifted, reso = case
    module = make_module(64, 2, shifted, reso)
    qkv = torch.randn(1, H * W, 3 * 64, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(1, H * W, 64, dtype=torch.float64, device=DEVICE)
    reference = run_reference(module, qkv, H, W, grad_out)
    low = run_reference(copy.deepcopy(module).to(dtype), qkv.to(dtype), H, W, grad_out.to(dtype))
    # The kernel path gets float32 tables, as from a float32 position-bias MLP next to low-precision activations.
    result = run_fused(copy.deepcopy(module).float(), qkv.to(dtype), H, W, grad_out)
    assert result["out"].dtype == dtype
    assert_within_twice_the_plain_error(result, low, reference)


# Extra channels of the wider buffer: 12 keeps the token stride even (16-bit rows load in pairs), 13 makes it odd.
@pytest.mark.parametrize("extra_channels", [12, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("allow_tf32", [True], indirect=True)
def test_strided_qkv_view_gives_the_contiguous_result(allow_tf32, whole_window_tiles, dtype, extra_channels):
    H, W, batch, dim = 24, 30, 2, 64
    module = make_module(dim, 2, True, 64)

    def every_other_row_of_a_wider_buffer(qkv):
        """Every other batch row, starting 5 channels in: no stride is the contiguous one, and the rest is NaN."""
        storage = torch.full((2 * batch, H * W, 3 * dim + extra_channels), float("nan"), dtype=qkv.dtype,
                             device=DEVICE)
        strided = storage[::2, :, 5:5 + 3 * dim]
        assert not strided.is_contiguous() and strided.stride(-1) == 1
        return strided.copy_(qkv)

    qkv = torch.randn(batch, H * W, 3 * dim, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(batch, H * W, dim, device=DEVICE, dtype=dtype)
    result = run_fused(module, qkv, H, W, grad_out, layout=every_other_row_of_a_wider_buffer)
    contiguous = run_fused(module, qkv, H, W, grad_out, layout=lambda qkv: qkv)
    assert torch.equal(result["out"], contiguous["out"])
    assert torch.equal(result["qkv"], contiguous["qkv"])
    for grad, contiguous_grad in zip(result["tables"], contiguous["tables"]):
        if DEVICE == "cpu" or extra_channels % 2 == 0 or dtype == torch.float32:
            assert torch.equal(grad, contiguous_grad)
        else:
            # An odd stride compiles the 16-bit kernels with 2-byte loads instead of 4-byte pairs: another register
            # layout, whose reductions may add the table's float32 partial sums in another order. On the H200
            # (run of 309cd67) the tables differed while the output and dqkv stayed bitwise the same.
            torch.testing.assert_close(grad, contiguous_grad, rtol=1e-5, atol=1e-5 * contiguous_grad.abs().max())


@pytest.mark.parametrize("allow_tf32", [True], indirect=True)
def test_table_gradient_is_bitwise_reproducible(allow_tf32, whole_window_tiles, monkeypatch):
    monkeypatch.setattr(lsa, "_score_grad_sum_chunks", three_score_grad_sum_chunks)
    H, W = 20, 36
    qkv = torch.randn(2, H * W, 3 * 64, device=DEVICE, requires_grad=True)
    tables = [torch.randn(TABLE_ROWS, 1, device=DEVICE, requires_grad=True) for _ in range(2)]
    out = lsa.lsa_attention(qkv, H, W, 2, SPLIT, True, *tables, 0.125)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, [qkv, *tables], grad_out, retain_graph=True)
    second = torch.autograd.grad(out, [qkv, *tables], grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("allow_tf32", [True], indirect=True)
def test_torch_compile_fullgraph_has_no_graph_break(allow_tf32, whole_window_tiles):
    H, W, dim = 24, 30, 64
    qkv = torch.randn(1, H * W, 3 * dim, device=DEVICE, requires_grad=True)
    tables = [torch.randn(TABLE_ROWS, 1, device=DEVICE, requires_grad=True) for _ in range(2)]

    def loss(qkv, table_0, table_1):
        return (lsa.lsa_attention(qkv, H, W, 2, SPLIT, True, table_0, table_1, 0.125) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled_value = compiled(qkv, *tables)
    compiled_grads = torch.autograd.grad(compiled_value, [qkv, *tables])
    eager_value = loss(qkv, *tables)
    eager_grads = torch.autograd.grad(eager_value, [qkv, *tables])
    torch.testing.assert_close(compiled_value, eager_value)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


# (H, W, batch, dim, heads, shifted, reso) for the PyTorch path, which is cheap on CPU: the spec's sizes.
TORCH_PATH_CASES = {
    "62x66-unshifted": (62, 66, 2, 64, 2, False, 64),
    "62x66-shifted": (62, 66, 1, 64, 4, True, 64),
    "36x70-shifted": (36, 70, 2, 180, 6, True, 64),
    "24x30-shifted": (24, 30, 1, 60, 6, True, 64),
    "64x64-shifted-cached-mask": (64, 64, 2, 180, 6, True, 64),
    "64x64-unshifted": (64, 64, 1, 180, 6, False, 64),
    "40x100-shifted": (40, 100, 1, 64, 2, True, 128),
    # Smaller than the shifts (4 and 16): every image position lands in the last window row or column.
    "3x13-shifted": (3, 13, 2, 64, 2, True, 64),
}


@pytorch_path_on_cpu
@pytest.mark.parametrize("case", TORCH_PATH_CASES.values(), ids=TORCH_PATH_CASES.keys())
def test_float64_takes_the_pytorch_path_and_matches_reference(case):
    H, W, batch, dim, heads, shifted, reso = case
    module = make_module(dim, heads, shifted, reso)
    qkv = torch.randn(batch, H * W, 3 * dim, dtype=torch.float64)
    grad_out = torch.randn(batch, H * W, dim, dtype=torch.float64)
    assert_matches_reference(run_fused(module, qkv, H, W, grad_out), run_reference(module, qkv, H, W, grad_out),
                             1e-11)


def test_maps_of_2_31_padded_tokens_take_the_pytorch_path():
    """The kernels index the padded map's tokens in 32 bits. W = 2**15 - 1 pads to 2**15: with H = 2**16 the map
    holds fewer than 2**31 tokens but its padded form does not. (Stride-0 views: no memory behind the tokens.)"""
    def qkv_of(H: int, W: int) -> torch.Tensor:
        return torch.randn(1, 1, 6, device=DEVICE, dtype=torch.float16).expand(1, H * W, 6)

    assert lsa._kernels_take(qkv_of(2**16 - 32, 2**15 - 1), 2**16 - 32, 2**15 - 1, SPLIT)
    assert not lsa._kernels_take(qkv_of(2**16, 2**15 - 1), 2**16, 2**15 - 1, SPLIT)


@pytorch_path_on_cpu
def test_pytorch_path_in_float32_matches_reference():
    H, W = 36, 70
    module = make_module(64, 2, True, 64)
    qkv = torch.randn(2, H * W, 3 * 64, dtype=torch.float64)
    ref_out = module.attend(qkv, H, W)
    tables = [attn.position_bias_table().float() for attn in module.attns]
    out = lsa.lsa_attention_torch(qkv.float(), H, W, 2, SPLIT, True, *tables, module.attns[0].scale)
    assert_close_to(out, ref_out, 1e-5, "output")


@pytorch_path_on_cpu
@pytest.mark.parametrize("score_elements", [1, 1 << 30], ids=["one-window-per-step", "whole-runs"])
@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
def test_pytorch_path_window_steps_match_reference(monkeypatch, score_elements, shifted):
    """Steps of one window and steps as long as a run of windows with one bias give the reference's outputs and
    gradients (36x70 pads to 64x96: several rows and columns of windows, batch 2)."""
    monkeypatch.setattr(lsa, "score_elements_per_step", lambda device: score_elements)
    H, W = 36, 70
    module = make_module(64, 2, shifted, 64)
    qkv = torch.randn(2, H * W, 3 * 64, dtype=torch.float64)
    grad_out = torch.randn(2, H * W, 64, dtype=torch.float64)
    assert_matches_reference(run_fused(module, qkv, H, W, grad_out), run_reference(module, qkv, H, W, grad_out),
                             1e-11)


@pytest.mark.parametrize("kinds,per_step", [
    ([0] * 7, 3), ([0, 1, 0, 1, 2, 3], 4), ([0, 0, 1, 0, 0, 1, 2, 2, 3], 2), ([3], 5), ([0, 0, 0, 0], 1)])
def test_window_steps_are_runs_of_one_bias(kinds, per_step):
    steps = lsa._window_steps(kinds, per_step)
    assert [index for start, stop, _ in steps for index in range(start, stop)] == list(range(len(kinds)))
    for start, stop, kind in steps:
        assert 1 <= stop - start <= per_step and set(kinds[start:stop]) == {kind}
    # As long as they can be: a step is shorter than per_step only where the next window has another bias.
    for (start, stop, kind), (_, _, next_kind) in zip(steps, steps[1:]):
        assert stop - start == per_step or kind != next_kind


def test_values_times_probabilities_t_has_matmuls_gradients():
    """The product both PyTorch attention paths end with: its hand-written backward (p's gradient in p's layout)
    gives autograd's gradients and second derivatives, on strided inputs."""
    from rgt_fast.kernels._common import values_times_probabilities_t

    # D = 7 value channels, N = 11 keys, M = 5 queries; both inputs are transposed views.
    v_t = torch.randn(2, 3, 11, 7, dtype=torch.float64).transpose(-1, -2).requires_grad_()
    probabilities = torch.softmax(torch.randn(2, 3, 11, 5, dtype=torch.float64), dim=-2).transpose(-1, -2)
    probabilities.requires_grad_()
    out = values_times_probabilities_t(v_t, probabilities)
    torch.testing.assert_close(out, v_t @ probabilities.transpose(-1, -2), rtol=0, atol=0)
    assert torch.autograd.gradcheck(values_times_probabilities_t, (v_t, probabilities))
    assert torch.autograd.gradgradcheck(values_times_probabilities_t, (v_t, probabilities))


@given(length=st.integers(1, 200), window=st.sampled_from([1, 4, 8, 32]), multiple=st.sampled_from([1, 2, 4]),
       shifted=st.booleans())
def test_axis_runs_read_every_image_position_once_from_the_rolled_padded_map(length, window, multiple, shifted):
    """Position p of the padded map, rolled by the shift, holds image position (p + shift) mod padded_length, or
    padding past the image: the runs copy exactly those positions, each image position once, and no padding."""
    padded_length = -(-length // (window * multiple)) * window * multiple
    shift = window // 2 if shifted else 0
    covered = []
    for run in lsa._axis_runs(length, padded_length, window, shift):
        assert run.windows == 1 or (run.first_offset, run.offsets) == (0, window)
        assert 0 <= run.first_offset and run.first_offset + run.offsets <= window
        positions = [w * window + o for w in range(run.first_window, run.first_window + run.windows)
                     for o in range(run.first_offset, run.first_offset + run.offsets)]
        assert [(p + shift) % padded_length for p in positions] == list(range(run.source, run.source + len(positions)))
        covered += positions
    expected = [p for p in range(padded_length) if (p + shift) % padded_length < length]
    assert sorted(covered) == expected


def test_steps_fit_l2_only_on_eager_cpu():
    """CPU steps stay near a core's L2 cache; on GPUs (a launch per step) and under torch.compile (unrolled
    steps) they only bound memory."""
    from rgt_fast.kernels._common import score_elements_per_step

    assert score_elements_per_step(torch.device("cpu")) == 1 << 19
    assert score_elements_per_step(torch.device("cuda", 0)) == 1 << 24
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * score_elements_per_step(x.device), backend="eager", fullgraph=True)
    assert compiled(torch.full((1,), 3.0)).item() == 3 << 24


@pytorch_path_on_cpu
def test_pytorch_path_under_torch_compile_matches_eager():
    """Under torch.compile the PyTorch path attends all windows in one call with a bias per window; values and
    gradients match eager mode, shifted and padded, and Dynamo has no warning for it."""
    H, W, dim = 36, 70, 64
    module = make_module(dim, 2, True, 64)
    qkv = torch.randn(2, H * W, 3 * dim, dtype=torch.float64, requires_grad=True)
    tables = [attn.position_bias_table().detach().requires_grad_() for attn in module.attns]

    def attend(qkv, table_0, table_1):
        return lsa.lsa_attention_torch(qkv, H, W, 2, SPLIT, True, table_0, table_1, module.attns[0].scale)

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="eager", fullgraph=True)
    grad_out = torch.randn(2, H * W, dim, dtype=torch.float64)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (compiled, attend):
            out = fn(qkv, *tables)
            results.append([out, *torch.autograd.grad(out, [qkv, *tables], grad_out)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dynamo_warnings = [str(w.message) for w in caught if "dynamo" in str(w.filename).lower()]
    assert not dynamo_warnings, dynamo_warnings


def _valid_arguments():
    return dict(qkv=torch.randn(1, 20 * 24, 3 * 64), H=20, W=24, num_heads=2, split_size=[8, 32], shifted=True,
                bias_table_0=torch.randn(TABLE_ROWS, 1), bias_table_1=torch.randn(TABLE_ROWS, 1), scale=0.125)


BAD_INPUTS = {
    "tokens-not-H*W": ({"H": 21}, ValueError, "H\\*W"),
    "qkv-not-3d": ({"qkv": torch.randn(20 * 24, 3 * 64)}, ValueError, "shape"),
    "channels-not-3C": ({"qkv": torch.randn(1, 20 * 24, 190)}, ValueError, "3\\*C"),
    "C-not-divisible-by-heads": ({"num_heads": 6}, ValueError, "divisible"),
    "odd-heads": ({"num_heads": 1}, ValueError, "even"),
    "integer-qkv": ({"qkv": torch.ones(1, 20 * 24, 3 * 64, dtype=torch.int32)}, TypeError, "floating"),
    "split-size-one-entry": ({"split_size": [8]}, ValueError, "split_size"),
    "table-wrong-shape": ({"bias_table_1": torch.randn(TABLE_ROWS, 2)}, ValueError, "bias_table_1"),
    "table-not-float": ({"bias_table_0": torch.ones(TABLE_ROWS, 1, dtype=torch.long)}, TypeError, "bias_table_0"),
    "table-on-other-device": ({"bias_table_0": torch.randn(TABLE_ROWS, 1, device="meta")}, ValueError, "device|on"),
    "last-dim-strided": ({"qkv": torch.randn(1, 20 * 24, 6 * 64)[..., ::2]}, ValueError, "stride"),
    "shifted-not-bool": ({"shifted": 1}, TypeError, "shifted"),
    "scale-not-number": ({"scale": torch.tensor(0.1)}, TypeError, "scale"),
    "scale-string": ({"scale": "0.125"}, TypeError, "scale must be a real number"),
    "scale-nan": ({"scale": float("nan")}, ValueError, "scale must be a finite"),
    "scale-infinite": ({"scale": float("inf")}, ValueError, "scale must be a finite"),
    "scale-inf-in-float32": ({"scale": 1e39}, ValueError, "magnitude at most"),
    "no-channels": ({"qkv": torch.randn(1, 20 * 24, 0)}, ValueError, "no channels"),
}


@pytest.mark.parametrize("change,error,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_a_clear_error(change, error, message):
    with pytest.raises(error, match=message):
        lsa.lsa_attention(**{**_valid_arguments(), **change})


# float64 takes the PyTorch path: the scale check is the op's, whichever path runs.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernels", "pytorch-path"])
def test_numpy_scale_is_taken_as_its_value(dtype, whole_window_tiles):
    qkv = torch.randn(1, 8 * 32, 3 * 32, dtype=dtype, device=DEVICE)
    tables = [torch.randn(TABLE_ROWS, 1, device=DEVICE) for _ in range(2)]
    want = lsa.lsa_attention(qkv, 8, 32, 2, SPLIT, True, *tables, 0.125)
    assert torch.equal(lsa.lsa_attention(qkv, 8, 32, 2, SPLIT, True, *tables, np.float32(0.125)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernels", "pytorch-path"])
def test_numpy_integer_sizes_are_taken_as_their_values(dtype, whole_window_tiles):
    qkv = torch.randn(1, 8 * 32, 3 * 32, dtype=dtype, device=DEVICE)
    tables = [torch.randn(TABLE_ROWS, 1, device=DEVICE) for _ in range(2)]
    want = lsa.lsa_attention(qkv, 8, 32, 2, SPLIT, True, *tables, 0.125)
    got = lsa.lsa_attention(qkv, np.int64(8), np.int32(32), np.int64(2), [np.int64(s) for s in SPLIT], True, *tables,
                            0.125)
    assert torch.equal(got, want)


L_SA_PATHS = {"kernels": lsa.lsa_attention, "pytorch-path": lsa.lsa_attention_torch}


@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("attention", L_SA_PATHS.values(), ids=L_SA_PATHS.keys())
def test_empty_batch_gives_empty_output_and_zero_gradients(attention, shifted):
    qkv = torch.randn(0, 8 * 32, 3 * 32, device=DEVICE, requires_grad=True)
    tables = [torch.randn(TABLE_ROWS, 1, device=DEVICE, requires_grad=True) for _ in range(2)]
    out = attention(qkv, 8, 32, 2, SPLIT, shifted, *tables, 0.125)
    assert out.shape == (0, 8 * 32, 32)
    grad_qkv, *grad_tables = torch.autograd.grad(out, [qkv, *tables], torch.randn_like(out))
    assert grad_qkv.shape == qkv.shape
    for grad in grad_tables:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_aot_variants_cover_every_kernel_dtype_branch_and_shift():
    variants = lsa.aot_variants()
    kernels = {"lsa_fwd", "lsa_dq", "lsa_dkdv", "lsa_score_grad_sum"}
    assert {v.kernel for v in variants} == kernels
    assert len(variants) == len(kernels) * 4 * 2 * 2
    for variant in variants:
        assert variant.constexprs["UPCAST_DOT_OPERANDS"] is False
        assert set(variant.signature) == set(variant.fn.arg_names)
        assert {name for name, kind in variant.signature.items() if kind == "constexpr"} == set(variant.constexprs)
        assert variant.uses_dot == (variant.constexprs["INPUT_PRECISION"] != "ieee" or "fp32" not in variant.config)
