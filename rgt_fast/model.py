"""The fused RGT: the reference module tree and state_dict, with both attentions on fused ops.

Backends: "triton" runs the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
"torch" runs the fastest plain-PyTorch path (what CPU users get); "auto" picks triton for CUDA tensors and
torch otherwise. On both, the convolutions read channels-last views of the tokens instead of NCHW copies. The
fused modules subclass the reference ones and add no parameters or buffers, so official checkpoints load strictly
and ``accelerate`` can convert any RGT-structured module in place of a copy.
"""
from __future__ import annotations

import copy
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels._common import (SUPPORTED_DTYPES, autograd_records, image_as_tokens, tokens_as_image,
                             triton_runs_on)
from .kernels.add_layer_norm import add_layer_norm, layer_norm
from .kernels.lsa_attention import lsa_attention, lsa_attention_torch
from .kernels.rgsa_attention import rgsa_attention, rgsa_attention_torch
from .kernels.spatial_gate import spatial_gate
from .reference import rgt as reference

BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def uses_triton(backend: str, t: torch.Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernel on ``t``; a clear error where "triton" cannot."""
    if backend == "torch":
        return False
    if backend == "auto":
        return t.is_cuda and t.dtype in SUPPORTED_DTYPES
    if not (triton_runs_on(t) and t.dtype in SUPPORTED_DTYPES):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors of dtype float32/bfloat16/float16 (or CPU tensors with "
            f"TRITON_INTERPRET=1), got a {t.dtype} tensor on {t.device}; use backend='auto' or 'torch'")
    return True


class ChannelsLastLayout(reference.TokenImageLayout):
    """Token sequences become channels-last images for the convolutions: views instead of NCHW copies."""

    tokens_to_image = staticmethod(tokens_as_image)
    image_to_tokens = staticmethod(image_as_tokens)


# Products smaller than this many multiply-adds ran faster through F.linear: oneDNN's per-call setup dominates.
ONEDNN_LINEAR_MIN_MACS = 1 << 23
ONEDNN_ON_X86 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def linear_runs_on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :class:`TokenLinear` computes ``x @ weight.T`` as a oneDNN 1x1 convolution (float32 CPU products
    on x86 large enough to amortise oneDNN's setup, outside autocast, whose bf16 matmuls already use oneDNN)."""
    # Cheapest tests first: most small linears (the position-bias MLPs') leave at the size test.
    return (ONEDNN_ON_X86 and x.numel() * weight.shape[0] >= ONEDNN_LINEAR_MIN_MACS and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


class TokenLinear(nn.Linear):
    """nn.Linear whose large float32 CPU products run as a 1x1 convolution on a channels-last view of the rows.

    PyTorch sends float32 matmuls to MKL, which runs its AVX2 code on AMD CPUs: about 200 GFLOP/s on the 2-core
    development machine, where oneDNN's convolution reaches 410-470 GFLOP/s on RGT's token-sized linears. The
    backward gains as much on 2 threads; on one, PyTorch's convolution backward takes MKL again
    (``benchmarks/bench_token_linear.py``). A contiguous input and the output stay views, the bias is added inside
    the convolution, and results differ from F.linear only by the order of the sums.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not linear_runs_on_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(1, -1, x.shape[-1])
        image = tokens_as_image(rows, 1, rows.shape[1])  # (1, K, 1, M)
        kernel = self.weight.view(*self.weight.shape, 1, 1)
        if torch.compiler.is_compiling():
            out = F.conv2d(image, kernel, self.bias)  # mkldnn_convolution has no fake-tensor implementation
        else:
            # Called directly in eager mode: F.conv2d hands 1x1 convolutions of a single image to its native
            # (MKL) path when PyTorch runs on one thread, 2x slower here. It reads the bias as if contiguous,
            # whatever its strides (an expanded or sliced bias gave garbage); the weight's strides it honours.
            bias = None if self.bias is None else self.bias.contiguous()
            out = torch.mkldnn_convolution(image, kernel, bias, (0, 0), (1, 1), (1, 1), 1)
        # Contiguous like F.linear's result; a no-op unless rows stored features-first made oneDNN choose NCHW.
        return image_as_tokens(out).reshape(*x.shape[:-1], self.out_features).contiguous()


class FusedSpatialGate(ChannelsLastLayout, reference.SpatialGate):
    """The MLP's gate on the torch backend (the triton backend replaces it with one op in ``FusedMLP``)."""

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        # LayerNorm's CPU backward on the strided half took 1.7x as long as a copy plus the contiguous backward
        # (a training step of RGT-S x4 at 64x64: 2.5% faster); the forward costs the same either way.
        x2 = self.image_to_tokens(self.conv(self.tokens_to_image(self.norm(x2.contiguous()), H, W)))
        return x1 * x2


class FusedResidualGroup(ChannelsLastLayout, reference.ResidualGroup):
    """Residual group whose closing convolution runs on a channels-last view of the tokens."""


class FusedLSA(ChannelsLastLayout, reference.LSA):
    """L-SA whose two window branches (pad, roll, windows, bias, mask, softmax, merge) are one fused op."""

    backend = "auto"

    def from_qkv(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        attended = self.attend(qkv, H, W)
        lcm = self.local_context(qkv, H, W)
        attended = attended.add_(lcm) if sums_in_place(attended, lcm) else attended + lcm
        del lcm  # neither term is held through proj
        return self.proj_drop(self.proj(attended))

    def attend(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        # The fused op has no dropout on attention probabilities, and it splits C into num_heads equal heads: with
        # an odd num_heads the official branches have num_heads // 2 heads of (C/2) // (num_heads // 2) channels.
        if (self.num_heads % 2 or (self.training and self.attns[0].attn_drop.p > 0)
                or has_hooks(*self.attns, *(branch.attn_drop for branch in self.attns))):
            return super().attend(qkv, H, W)
        op = lsa_attention if uses_triton(self.backend, qkv) else lsa_attention_torch
        return op(qkv, H, W, self.num_heads, self.split_size, self.shifted, self.attns[0].position_bias_table(),
                  self.attns[1].position_bias_table(), self.attns[0].scale)


class FusedRGSA(ChannelsLastLayout, reference.RGSA):
    """RG-SA whose cross-attention of all tokens to the reduced map is one fused op (no N x N' scores)."""

    backend = "auto"

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if (self.training and self.attn_drop.p > 0) or has_hooks(self.attn_drop):
            return super().forward(x, H, W)
        B, N, C = x.shape
        reduced, rh, rw = self.representatives(x, H, W)
        k, v = self.project_kv(reduced, rh, rw)
        q = self.q(x).view(B, N, self.num_heads, -1)
        op = rgsa_attention if uses_triton(self.backend, q) else rgsa_attention_torch
        out = op(q, k, v, self.scale)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


def sums_in_place(total: torch.Tensor, *terms: torch.Tensor) -> bool:
    """Whether a sum into ``total``, a temporary its caller owns, may go into total's memory: when no autograd graph
    records the sum (it might keep ``total`` for a backward), the rule the kernels' reuse flags follow, and
    ``total`` already has the result's dtype."""
    return (not autograd_records(total, *terms)
            and all(torch.promote_types(total.dtype, t.dtype) == total.dtype for t in terms))


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling any of ``modules`` would run hooks of its own (forward, forward-pre or backward hooks, as
    pruning and the old weight_norm register). A fused path reads such modules' parameters instead of calling
    them, so where any has hooks the module's own path runs. Global module hooks are not looked at."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def is_exact_gelu(act: nn.Module) -> bool:
    """Whether ``act`` is the activation the spatial-gate kernel computes (the default act_layer)."""
    return type(act) is nn.GELU and act.approximate == "none"


def is_affine_layer_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is what the fused LayerNorm ops compute: nn.LayerNorm with weight and bias, of any eps
    (they take it as an argument), and without hooks."""
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None and not has_hooks(norm)


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` computes what a fused op's projection computes (so the op may take its parameters): a
    plain linear layer without hooks."""
    return type(layer) in (nn.Linear, TokenLinear) and not has_hooks(layer)


class FusedMLP(reference.MLP):
    """MLP whose GELU, spatial gate (LayerNorm, depthwise conv), product and fc2 are one fused op after fc1.

    fc2 joins the op so that the gate's output is not kept for the backward (the op recomputes it there); in a
    ``FusedBlock`` fc1 joins the op before it (``add_layer_norm``) for the same reason. The torch backend runs the
    reference's ops in the reference's order, with the gate's conv on a channels-last view
    (``FusedSpatialGate``): that is what PyTorch ran fastest on CPU. So does an ``act_layer`` other than exact
    GELU, on both backends; an fc2 other than a plain linear layer stays a module call after the fused gate.
    """

    backend = "auto"

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether the fused gate runs on ``x`` (the fused op has no dropout)."""
        return (not (self.training and self.drop.p > 0) and uses_triton(self.backend, x) and is_exact_gelu(self.act)
                and not has_hooks(self.act, self.sg, self.sg.norm, self.sg.conv, self.drop))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if not self.fuses(x):
            return super().forward(x, H, W)
        return self.from_hidden(self.fc1(x), H, W)

    def from_hidden(self, hidden: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The fused gate and fc2 on fc1's output (before the GELU), which nothing reads afterwards: in inference
        the gate works in its memory (``reuse_hidden``)."""
        gate = self.sg
        gate_args = (hidden, H, W, gate.norm.weight, gate.norm.bias, gate.conv.weight, gate.conv.bias, gate.norm.eps)
        if not is_plain_linear(self.fc2):
            return self.fc2(spatial_gate(*gate_args, reuse_hidden=True))
        return spatial_gate(*gate_args, proj_weight=self.fc2.weight, proj_bias=self.fc2.bias, reuse_hidden=True)


class FusedBlock(reference.Block):
    """Block whose norms write what the next matmul reads (the autocast dtype under autocast), whose residual add
    and ``norm2`` are one op, and whose HAI residual is one multiply-add. The linear layers after the norms (L-SA's
    qkv, the MLP's fc1) join the norms' ops, so that the normalised rows are not kept for the backward; RG-SA's
    norm1 output also feeds its reduction conv, and stays a separate op. A ``norm_layer`` other than an affine
    nn.LayerNorm takes the reference's path."""

    backend = "auto"

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if not (uses_triton(self.backend, x) and is_affine_layer_norm(self.norm1)
                and is_affine_layer_norm(self.norm2)):
            return super().forward(x, H, W)
        summed, mixed = self.attend_and_mix(x, H, W)
        if sums_in_place(summed, mixed, x, self.gamma):
            # The same sums in the same order, into summed's memory: two (B, N, C) activations less at the end of
            # every block, where inference peaked.
            return summed.add_(mixed).addcmul_(x, self.gamma)
        return torch.addcmul(summed + mixed, x, self.gamma)

    def attend_and_mix(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + attention, MLP branch) with drop-path applied; the attention's output and the MLP's hidden
        activations are freed on return, before the block's last sums."""
        attended = self.drop_path(self.attend(x, H, W))
        norm, mlp = self.norm2, self.mlp
        if mlp.fuses(x) and is_plain_linear(mlp.fc1) and not has_hooks(mlp):
            # In inference the normalised rows take the attention output's memory (reuse_delta), which is then
            # not held through the MLP.
            summed, hidden = add_layer_norm(x, attended, norm.weight, norm.bias, norm.eps,
                                            proj_weight=mlp.fc1.weight, proj_bias=mlp.fc1.bias, reuse_delta=True)
            del attended
            return summed, self.drop_path(mlp.from_hidden(hidden, H, W))
        summed, normed = add_layer_norm(x, attended, norm.weight, norm.bias, norm.eps, reuse_delta=True)
        del attended
        return summed, self.drop_path(mlp(normed, H, W))

    def attend(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        norm, attn = self.norm1, self.attn
        if isinstance(attn, FusedLSA) and is_plain_linear(attn.qkv) and not has_hooks(attn):
            qkv = layer_norm(x, norm.weight, norm.bias, norm.eps, proj_weight=attn.qkv.weight, proj_bias=attn.qkv.bias)
            return attn.from_qkv(qkv, H, W)
        return attn(layer_norm(x, norm.weight, norm.bias, norm.eps), H, W)


FUSED_CLASSES = {reference.LSA: FusedLSA, reference.RGSA: FusedRGSA, reference.MLP: FusedMLP,
                 reference.SpatialGate: FusedSpatialGate, reference.Block: FusedBlock,
                 reference.ResidualGroup: FusedResidualGroup, nn.Linear: TokenLinear}


# Without an autograd graph, the upsampling tail runs on chunks of images whose largest tail tensor (num_feat
# channels at the output resolution) holds about this many elements: at batch 8 of 128x128 x4, the whole batch's
# last pixel shuffle (its input and output, 537 MB in bf16) is most of the 682 MB peak an H100 measured.
RECONSTRUCTION_CHUNK_ELEMENTS = 1 << 24


class RGT(ChannelsLastLayout, reference.RGT):
    """The fused RGT: same constructor (plus ``backend``), module tree and state_dict as the reference."""

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any):
        super().__init__(*args, **kwargs)
        for module in self.modules():
            fused = FUSED_CLASSES.get(type(module))
            if fused is not None:
                module.__class__ = fused
        self.set_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The convolutions after the body run channels-last; callers get a contiguous NCHW image whatever layout
        # the convolutions chose (a channels-last result would make their .view() calls fail).
        return super().forward(x).contiguous()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's upsampling tail; where autograd does not record the body's output (inference, or a
        frozen model), on chunks of the batch of about RECONSTRUCTION_CHUNK_ELEMENTS elements in the largest tail
        tensor. Where it does, the tail's activations are kept for the backward whatever the chunking, so the batch
        runs whole."""
        per_image = self.num_feat * x.shape[2] * x.shape[3] * self.upscale ** 2
        images = max(1, RECONSTRUCTION_CHUNK_ELEMENTS // max(1, per_image))
        if autograd_records(x) or images >= x.shape[0]:
            return super().reconstruct(x)
        return torch.cat([super(RGT, self).reconstruct(chunk) for chunk in x.split(images)])

    def set_backend(self, backend: str) -> "RGT":
        check_backend(backend)
        self.backend = backend
        for module in self.modules():
            if isinstance(module, (FusedLSA, FusedRGSA, FusedMLP, FusedBlock)):
                module.backend = backend
        return self


def _drop_path_rate(model: nn.Module) -> float:
    rates = [float(getattr(m, "drop_prob", 0.0)) for name, m in model.named_modules() if name.endswith("drop_path")]
    return max(rates, default=0.0)


def _network(model: Any) -> nn.Module:
    """The network itself: spandrel's ModelDescriptor (and wrappers like it) hold it in ``.model``, torch.compile's
    in ``._orig_mod``, DataParallel and DistributedDataParallel in ``.module``."""
    inner = getattr(model, "model", None)
    network = inner if isinstance(inner, nn.Module) else model
    while True:
        if isinstance(getattr(network, "_orig_mod", None), nn.Module):
            network = network._orig_mod
        elif isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        else:
            break
    if not isinstance(network, nn.Module):
        raise TypeError(f"accelerate() needs an RGT nn.Module, or an object holding one in .model (spandrel's "
                        f"ModelDescriptor), got {type(model).__name__}")
    return network


def _refuse_hooks(network: nn.Module) -> None:
    # Hooks are functions of the source modules (they may hold them, or state about them): carried over silently,
    # they could act on the wrong model.
    hooked = [name or "the model itself" for name, m in network.named_modules() if has_hooks(m)]
    if hooked:
        raise ValueError(f"accelerate() does not carry forward/backward hooks, and {len(hooked)} module(s) have "
                         f"some ({hooked[:5]}); remove them (handle.remove()) and register them on the returned "
                         f"model instead")


def accelerate(model: Any, *, backend: str = "auto") -> RGT:
    """The fused RGT with the weights, settings and train/eval mode of any RGT-structured ``model``.

    Works for ``rgt_fast.reference.RGT``, the official BasicSR class and spandrel's copy, and for spandrel's
    ModelDescriptor (anything holding the network in ``.model``). The architecture is read back from the
    state_dict, except what the weights cannot tell, which comes from the modules: ``num_heads`` (an odd count has
    the weights of the even count below it), ``img_range`` and the drop-path rate. Module by module, it then copies
    the attention scales (``qk_scale``; RG-SA's also depends on the float ``c_ratio``), the dropout rates,
    ``use_chk``, the ``act_layer`` and ``norm_layer`` modules, the train/eval mode and each parameter's
    ``requires_grad``. Every tensor keeps its own dtype and device. Modules with forward or backward hooks are
    refused: register the hooks on the returned model.
    """
    from .config import ArchitectureMismatch, infer_hyperparameters

    network = _network(model)
    _refuse_hooks(network)
    state_dict = network.state_dict()
    try:
        kwargs = infer_hyperparameters(state_dict)
    except ArchitectureMismatch as err:
        raise TypeError(f"accelerate() needs an RGT-structured module (rgt_fast.reference.RGT, the official class "
                        f"or spandrel's); {type(network).__name__}: {err}") from err
    kwargs.update(img_range=float(getattr(network, "img_range", kwargs["img_range"])),
                  drop_path_rate=_drop_path_rate(network),
                  num_heads=[group.blocks[0].attn.num_heads for group in network.layers])
    fused = RGT(**kwargs, backend=backend)
    for name, module in network.named_modules():
        if name == "norm" or name.endswith((".norm1", ".norm2", ".mlp.act")):
            # The act_layer and norm_layer modules, whole: any class and setting (eps, approximate) carries over.
            fused.set_submodule(name, copy.deepcopy(module))
    # assign=True keeps each tensor's dtype and device; the clones share no storage with ``model``.
    fused.load_state_dict({key: value.clone() for key, value in state_dict.items()}, strict=True, assign=True)
    # The buffers outside the state_dict (the RGB mean) join the weights, instead of staying where they were made.
    device = fused.conv_first.weight.device
    for name, buffer in list(fused.named_buffers()):
        if name not in state_dict:
            module_name, _, buffer_name = name.rpartition(".")
            fused.get_submodule(module_name).register_buffer(buffer_name, buffer.to(device), persistent=False)
    fused_modules = dict(fused.named_modules())
    for name, module in network.named_modules():
        target = fused_modules[name]
        target.training = module.training
        if isinstance(target, nn.Dropout):
            target.p = module.p
        elif isinstance(target, (reference.WindowAttention, reference.RGSA)):
            target.scale = module.scale
        elif isinstance(target, reference.ResidualGroup):
            target.use_chk = module.use_chk
    for name, parameter in network.named_parameters():
        fused.get_parameter(name).requires_grad_(parameter.requires_grad)
    return fused
