"""The plain PyTorch RGT, checkpoint-exact with the official implementation (see RGT_SPEC.md).

Every module name, parameter and buffer matches the official state_dict, and every numerical quirk the
checkpoints depend on is kept: unmasked zero padding in L-SA, the -100 shift mask, the recursion count of
RG-SA computed with ``math.log(x, 4)``. Blocks work on tokens (B, H*W, C) with ``forward(x, H, W)``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint

RGB_MEAN = (0.4488, 0.4371, 0.4040)
MIN_EVAL_SIZE = 16
MIN_TRAINING_SIZE = 4


def tokens_to_image(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, H, W)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class TokenImageLayout:
    """How the modules turn token sequences (B, H*W, C) into images (B, C, H, W) for their convolutions and back.

    The reference makes the official code's NCHW copies; the fused model overrides both methods.
    """

    @staticmethod
    def tokens_to_image(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return tokens_to_image(x, H, W)

    @staticmethod
    def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
        return image_to_tokens(x)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ImageToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C): first entry of ``before_RG``, so that its LayerNorm keeps the key
    ``before_RG.1``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return image_to_tokens(x)


class SpatialGate(TokenImageLayout, nn.Module):
    """Gate of the MLP: second half of the features through LayerNorm and a depthwise 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        x2 = self.image_to_tokens(self.conv(self.tokens_to_image(self.norm(x2), H, W)))
        return x1 * x2


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.sg = SpatialGate(hidden_features // 2)
        self.fc2 = nn.Linear(hidden_features // 2, in_features)
        # The official MLP has this dropout, but its Block never gives it a rate (drop_rate reaches the attention
        # projections only).
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.sg(x, H, W))
        return self.drop(self.fc2(x))


class DynamicPosBias(nn.Module):
    """MLP from a relative offset (dh, dw) to one bias per head (the official module without residual)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, self.pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, self.pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


def relative_offsets(window_h: int, window_w: int) -> torch.Tensor:
    """All (dh, dw) offsets inside a window, dh outer, as float rows: the ``rpe_biases`` buffer."""
    dh = torch.arange(1 - window_h, window_h)
    dw = torch.arange(1 - window_w, window_w)
    grid = torch.stack(torch.meshgrid(dh, dw, indexing="ij"))
    return grid.flatten(1).transpose(0, 1).contiguous().float()


def relative_position_index(window_h: int, window_w: int) -> torch.Tensor:
    """Row of the offset table for every (query, key) pair of a window: the official index buffer."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + window_h - 1) * (2 * window_w - 1) + (rel[..., 1] + window_w - 1)


class WindowAttention(nn.Module):
    """One L-SA branch: attention inside rectangle windows of one channel half, with a dynamic position bias.

    ``idx`` 0 uses windows of split_size[0] rows x split_size[1] columns; ``idx`` 1 the transposed shape.
    """

    def __init__(self, dim: int, idx: int, split_size: Sequence[int], num_heads: int, attn_drop: float = 0.0,
                 qk_scale: float | None = None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.idx = idx
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        if idx == 0:
            self.H_sp, self.W_sp = split_size[0], split_size[1]
        else:
            self.W_sp, self.H_sp = split_size[0], split_size[1]
        self.pos = DynamicPosBias(dim // 4, num_heads)
        self.register_buffer("rpe_biases", relative_offsets(self.H_sp, self.W_sp))
        self.register_buffer("relative_position_index", relative_position_index(self.H_sp, self.W_sp))
        self.attn_drop = nn.Dropout(attn_drop)

    def position_bias_table(self) -> torch.Tensor:
        """((2*H_sp-1)*(2*W_sp-1), heads) bias of every relative offset."""
        return self.pos(self.rpe_biases)

    def to_windows(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, H*W, C) -> (B*nW, heads, H_sp*W_sp, head_dim), windows and tokens row-major."""
        B, _, C = x.shape
        x = x.view(B, H // self.H_sp, self.H_sp, W // self.W_sp, self.W_sp, C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, self.H_sp * self.W_sp, self.num_heads, C // self.num_heads)
        return x.permute(0, 2, 1, 3)

    def from_windows(self, x: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """(B*nW, heads, N, head_dim) -> (B, H, W, C)."""
        C = x.shape[1] * x.shape[3]
        x = x.transpose(1, 2).reshape(B, H // self.H_sp, W // self.W_sp, self.H_sp, self.W_sp, C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: (B, H*W, dim) on a padded map; returns (B, H, W, dim)."""
        B = q.shape[0]
        q = self.to_windows(q, H, W) * self.scale
        k = self.to_windows(k, H, W)
        v = self.to_windows(v, H, W)
        attn = q @ k.transpose(-2, -1)
        n = self.H_sp * self.W_sp
        bias = self.position_bias_table()[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(B, num_windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(F.softmax(attn, dim=-1, dtype=attn.dtype))
        return self.from_windows(attn @ v, B, H, W)


def is_shifted_block(rs_id: int, idx: int) -> bool:
    """Whether block ``idx`` of residual group ``rs_id`` uses shifted windows (official rule)."""
    return (rs_id % 2 == 0 and idx > 0 and (idx - 2) % 4 == 0) or (rs_id % 2 != 0 and idx % 4 == 0)


def region_ids(length: int, window: int, shift: int) -> torch.Tensor:
    """Region of each position along one axis of a rolled map: [0, L-win), [L-win, L-shift), [L-shift, L)."""
    ids = torch.zeros(length)
    ids[length - window:length - shift] = 1
    ids[length - shift:] = 2
    return ids


def shift_mask(H: int, W: int, window_h: int, window_w: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """(nW, N, N) additive mask of -100 between tokens of different regions of the rolled (H, W) map."""
    region = 3 * region_ids(H, window_h, shift_h)[:, None] + region_ids(W, window_w, shift_w)[None, :]
    windows = region.view(H // window_h, window_h, W // window_w, window_w).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window_h * window_w)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class LSA(TokenImageLayout, nn.Module):
    """Rectangle-window self-attention (L-SA) with the locality complementary module ``get_v``."""

    def __init__(self, dim: int, num_heads: int, split_size: Sequence[int] = (8, 32),
                 shift_size: Sequence[int] = (4, 16), qkv_bias: bool = False, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, idx: int = 0, reso: int = 64, rs_id: int = 0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.split_size = list(split_size)
        self.shift_size = list(shift_size)
        self.idx = idx
        self.rs_id = rs_id
        # The shift masks are cached for a reso x reso map, rounded up to a multiple of both window sides: split
        # sizes whose windows do not tile 64 (e.g. [6, 12], which the official code cannot build) still construct.
        # Outputs do not depend on the size: ``attend`` reads the cache only for a padded map of exactly this size,
        # and the cache then holds what calculate_mask would rebuild for it.
        window_multiple = math.lcm(*self.split_size)
        self.patches_resolution = -(-reso // window_multiple) * window_multiple
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.attns = nn.ModuleList([
            WindowAttention(dim // 2, idx=i, split_size=self.split_size, num_heads=num_heads // 2,
                            attn_drop=attn_drop, qk_scale=qk_scale)
            for i in range(2)
        ])
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.shifted = is_shifted_block(rs_id, idx)
        if self.shifted:
            mask_0, mask_1 = self.calculate_mask(self.patches_resolution, self.patches_resolution)
            self.register_buffer("attn_mask_0", mask_0)
            self.register_buffer("attn_mask_1", mask_1)
        else:
            self.attn_mask_0 = None
            self.attn_mask_1 = None

    def calculate_mask(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        s0, s1 = self.split_size
        t0, t1 = self.shift_size
        return shift_mask(H, W, s0, s1, t0, t1), shift_mask(H, W, s1, s0, t1, t0)

    def attend(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Both window branches on the qkv projection (B, H*W, 3C): pad, roll, attend, roll back, crop.

        Returns the channel concatenation [branch 0 | branch 1], (B, H*W, C), before ``get_v`` and ``proj``.
        """
        B, L, C3 = qkv.shape
        C = C3 // 3
        pad = max(self.split_size)
        pad_b = (pad - H % pad) % pad
        pad_r = (pad - W % pad) % pad
        Hp, Wp = H + pad_b, W + pad_r
        maps = F.pad(qkv.view(B, H, W, C3), (0, 0, 0, pad_r, 0, pad_b))
        s0, s1 = self.shift_size
        if self.shifted:
            if Hp == self.patches_resolution and Wp == self.patches_resolution:
                masks = (self.attn_mask_0, self.attn_mask_1)
            else:
                masks = tuple(m.to(device=qkv.device, dtype=qkv.dtype) for m in self.calculate_mask(Hp, Wp))
            shifts = ((s0, s1), (s1, s0))
        else:
            masks = (None, None)
            shifts = ((0, 0), (0, 0))
        outputs = []
        half = C // 2
        for branch, attn in enumerate(self.attns):
            channels = slice(branch * half, (branch + 1) * half)
            sh, sw = shifts[branch]
            q, k, v = (maps[..., part * C:(part + 1) * C][..., channels] for part in range(3))
            if self.shifted:
                q, k, v = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v))
            q, k, v = (t.reshape(B, Hp * Wp, half) for t in (q, k, v))
            out = attn(q, k, v, Hp, Wp, mask=masks[branch])
            if self.shifted:
                out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
            outputs.append(out[:, :H, :W, :].reshape(B, L, half))
        return torch.cat(outputs, dim=2)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), H, W)

    def from_qkv(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Everything after the qkv projection: both window branches, the LCM (``get_v``) and ``proj``."""
        attended = self.attend(qkv, H, W)
        lcm = self.local_context(qkv, H, W)
        return self.proj_drop(self.proj(attended + lcm))

    def local_context(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The LCM (``get_v``) on the value third of the qkv tokens."""
        C = qkv.shape[-1] // 3
        return self.image_to_tokens(self.get_v(self.tokens_to_image(qkv[..., 2 * C:], H, W)))


def recursion_count(H: int, W: int, training: bool) -> int:
    """Number of times RG-SA applies ``reduction1`` (official rule, truncating math.log(x, 4))."""
    if training:
        if H < MIN_TRAINING_SIZE or W < MIN_TRAINING_SIZE:
            raise ValueError(f"RG-SA needs H and W >= {MIN_TRAINING_SIZE} in training mode, got {H}x{W}")
        return max(int(math.log(H // 4, 4)), int(math.log(W // 4, 4)))
    if H < MIN_EVAL_SIZE or W < MIN_EVAL_SIZE:
        raise ValueError(
            f"RGT in eval mode needs H and W >= {MIN_EVAL_SIZE} (the official model fails with a math domain "
            f"error below that), got {H}x{W}; pad the input (rgt_fast.upscale reflect-pads small images)")
    return max(int(math.log(H // 16, 4)), int(math.log(W // 16, 4)), 2)


class RGSA(TokenImageLayout, nn.Module):
    """Recursive-generalization cross-attention: all tokens attend to a recursively reduced map."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, c_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.cr = int(dim * c_ratio)
        self.scale = qk_scale or (head_dim * c_ratio) ** -0.5
        self.reduction1 = nn.Conv2d(dim, dim, kernel_size=4, stride=4, groups=dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.conv = nn.Conv2d(dim, self.cr, kernel_size=1, stride=1)
        self.norm_act = nn.Sequential(nn.LayerNorm(self.cr), nn.GELU())
        self.q = nn.Linear(dim, self.cr, bias=qkv_bias)
        self.k = nn.Linear(self.cr, self.cr, bias=qkv_bias)
        self.v = nn.Linear(self.cr, dim, bias=qkv_bias)
        self.cpe = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def representatives(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, int, int]:
        """The reduced map as tokens (B, N', cr) after norm_act, and its height and width."""
        steps = recursion_count(H, W, self.training)
        rh, rw = H // 4 ** steps, W // 4 ** steps
        if rh == 0 or rw == 0:
            raise ValueError(
                f"RG-SA cannot reduce a {H}x{W} map {steps} times by 4 (aspect ratio too extreme for RGT's "
                f"recursion rule); use a less elongated input or tile it")
        reduced = self.tokens_to_image(x, H, W)
        for _ in range(steps):
            reduced = self.reduction1(reduced)
        reduced = self.image_to_tokens(self.conv(self.dwconv(reduced)))
        return self.norm_act(reduced), rh, rw

    def project_kv(self, reduced: torch.Tensor, rh: int, rw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k (B, N', heads, cr/heads) and v with its positional encoding (B, N', heads, C/heads)."""
        B, n_rep, _ = reduced.shape
        k = self.k(reduced).view(B, n_rep, self.num_heads, -1)
        v = self.v(reduced)
        v = v + self.image_to_tokens(self.cpe(self.tokens_to_image(v, rh, rw)))
        return k, v.view(B, n_rep, self.num_heads, -1)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        reduced, rh, rw = self.representatives(x, H, W)
        k, v = self.project_kv(reduced, rh, rw)
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        attn = (q @ k.permute(0, 2, 3, 1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """L-SA (even idx) or RG-SA (odd idx) block with MLP and the HAI residual ``gamma``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 idx: int = 0, rs_id: int = 0, split_size: Sequence[int] = (8, 32),
                 shift_size: Sequence[int] = (4, 16), reso: int = 64, c_ratio: float = 0.5,
                 layerscale_value: float = 1e-4):
        super().__init__()
        self.norm1 = norm_layer(dim)
        if idx % 2 == 0:
            self.attn = LSA(dim, num_heads=num_heads, split_size=split_size, shift_size=shift_size,
                            qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, idx=idx,
                            reso=reso, rs_id=rs_id)
        else:
            self.attn = RGSA(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                             attn_drop=attn_drop, proj_drop=drop, c_ratio=c_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = MLP(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.norm2 = norm_layer(dim)
        self.gamma = nn.Parameter(layerscale_value * torch.ones(dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        res = x
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return res * self.gamma + x


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class ResidualGroup(TokenImageLayout, nn.Module):
    def __init__(self, dim: int, reso: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, drop: float, attn_drop: float, drop_paths: Sequence[float],
                 act_layer: Callable[[], nn.Module], norm_layer: Callable[[int], nn.Module], depth: int,
                 use_chk: bool, resi_connection: str, rs_id: int, split_size: Sequence[int], c_ratio: float):
        super().__init__()
        self.use_chk = use_chk
        self.reso = reso
        shift_size = [split_size[0] // 2, split_size[1] // 2]
        # reso (img_size) does not reach the blocks, as in the official code (both copies agree): every shifted
        # L-SA caches its masks for the Block default of 64, and img_size shapes nothing. RGT_SPEC.md says the
        # masks are built for img_size; official state_dicts follow the code, so this does too.
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
                  attn_drop=attn_drop, drop_path=drop_paths[i], act_layer=act_layer, norm_layer=norm_layer, idx=i,
                  rs_id=rs_id, split_size=split_size, shift_size=shift_size, c_ratio=c_ratio)
            for i in range(depth)
        ])
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        res = x
        for block in self.blocks:
            if self.use_chk and x.requires_grad:
                x = checkpoint.checkpoint(block, x, H, W, use_reentrant=False)
            else:
                x = block(x, H, W)
        return res + self.image_to_tokens(self.conv(self.tokens_to_image(x, H, W)))


class Upsample(nn.Sequential):
    """Conv + PixelShuffle stages: log2(scale) x2 stages for powers of two, one x3 stage for 3."""

    def __init__(self, scale: int, num_feat: int):
        layers: list[nn.Module] = []
        if scale >= 1 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale must be 1, a power of two or 3, got {scale}")
        super().__init__(*layers)


class RGT(TokenImageLayout, nn.Module):
    """Recursive Generalization Transformer; takes (B, in_chans, H, W) images in [0, 1]."""

    num_feat = 64

    def __init__(self, upscale: int = 2, in_chans: int = 3, img_size: int = 64, img_range: float = 1.0,
                 depth: Sequence[int] = (2, 2, 2, 2), embed_dim: int = 180, num_heads: Sequence[int] = (2, 2, 2, 2),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 use_chk: bool = False, resi_connection: str = "1conv", split_size: Sequence[int] = (8, 8),
                 c_ratio: float = 0.5, **unused_kwargs):
        # Unknown arguments are ignored, as the official class does: the authors' option files pass some
        # (upsampler='pixelshuffle').
        super().__init__()
        depth = list(depth)
        num_heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else [num_heads] * len(depth)
        split_size = list(split_size)
        self.upscale = upscale
        self.in_chans = in_chans
        self.img_range = img_range
        mean = RGB_MEAN if in_chans == 3 else (0.0,)
        # Not in the official state_dict; a buffer so that it moves with the model instead of being copied from the
        # CPU on every forward (a copy that also cannot be recorded in a CUDA graph).
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.num_layers = depth
        self.num_features = self.embed_dim = embed_dim
        self.before_RG = nn.Sequential(ImageToTokens(), nn.LayerNorm(embed_dim))
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depth))]
        self.layers = nn.ModuleList([
            ResidualGroup(embed_dim, reso=img_size, num_heads=num_heads[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                          drop_paths=rates[sum(depth[:i]):sum(depth[:i + 1])], act_layer=act_layer,
                          norm_layer=norm_layer, depth=depth[i], use_chk=use_chk, resi_connection=resi_connection,
                          rs_id=i, split_size=split_size, c_ratio=c_ratio)
            for i in range(len(depth))
        ])
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, self.num_feat, 3, 1, 1),
                                                  nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(upscale, self.num_feat)
        self.conv_last = nn.Conv2d(self.num_feat, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"RGT expects a (B, C, H, W) tensor, got {type(x).__name__} "
                             f"of shape {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"RGT was built for {self.in_chans} input channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"RGT expects a floating point image in [0, 1], got {x.dtype}; "
                            f"convert uint8 images with x.float() / 255")
        H, W = x.shape[-2:]
        minimum = MIN_TRAINING_SIZE if self.training else MIN_EVAL_SIZE
        if H < minimum or W < minimum:
            mode = "training" if self.training else "eval"
            raise ValueError(f"RGT in {mode} mode needs H and W >= {minimum}, got {H}x{W}; pad the input "
                             f"(rgt_fast.upscale reflect-pads small images)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = self.before_RG(x)
        for layer in self.layers:
            x = layer(x, H, W)
        return self.tokens_to_image(self.norm(x), H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)  # no copy where the model's .to() moved it
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.reconstruct(self.conv_before_upsample(x))
        return x / self.img_range + mean

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The upsampling tail: (B, num_feat, H, W) features to (B, in_chans, H * upscale, W * upscale)."""
        return self.conv_last(self.upsample(x))
