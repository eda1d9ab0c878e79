"""RGT presets and reading every hyperparameter back from a state_dict."""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "RGT-S": dict(depth=[6] * 6, num_heads=[6] * 6),
    "RGT": dict(depth=[6] * 8, num_heads=[6] * 8),
}
COMMON_DEFAULTS: dict[str, Any] = dict(
    in_chans=3, img_size=64, img_range=1.0, embed_dim=180, mlp_ratio=2.0, qkv_bias=True, qk_scale=None,
    drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, use_chk=False, resi_connection="1conv",
    split_size=[8, 32], c_ratio=0.5,
)
# Constructor arguments with no preset value (the official defaults, nn.GELU and nn.LayerNorm, stand).
MODULE_ARGUMENTS = ("act_layer", "norm_layer")


def preset_kwargs(name: str, upscale: int, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a preset ("RGT" or "RGT-S") at ``upscale``, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown RGT preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**COMMON_DEFAULTS, **PRESETS[name], "upscale": upscale}
    unknown = set(overrides) - set(kwargs) - set(MODULE_ARGUMENTS)
    if unknown:
        raise TypeError(f"unknown RGT argument(s) {sorted(unknown)}; valid ones are "
                        f"{sorted([*kwargs, *MODULE_ARGUMENTS])}")
    kwargs.update(overrides)
    return kwargs


def preset_name(kwargs: Mapping[str, Any]) -> str | None:
    """The preset whose architecture ``kwargs`` describe, or None for a custom configuration."""
    for name, preset in PRESETS.items():
        if list(kwargs["depth"]) == preset["depth"] and list(kwargs["num_heads"]) == preset["num_heads"] and all(
                kwargs.get(k) == v for k, v in COMMON_DEFAULTS.items()
                if k in ("embed_dim", "mlp_ratio", "split_size", "c_ratio")):
            return name
    return None


class ArchitectureMismatch(ValueError):
    """A state_dict that is not an RGT (or not one this project can read)."""


_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_UPSAMPLE_KEY = re.compile(r"^upsample\.(\d+)\.weight$")
REQUIRED_KEYS = ("conv_first.weight", "before_RG.1.weight", "norm.weight", "conv_before_upsample.0.weight",
                 "conv_last.weight", "layers.0.blocks.0.attn.qkv.weight",
                 "layers.0.blocks.0.attn.attns.0.rpe_biases", "layers.0.blocks.0.mlp.fc1.weight")


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ArchitectureMismatch(f"not an RGT state_dict: key {key!r} is missing")
    return state_dict[key]


def _ratio_rebuilding(size: int, dim: int) -> float:
    """A ratio r for which the constructor's ``int(dim * r)`` gives back ``size``: size / dim where floating point
    allows (the presets' 2.0 and 0.5), else the middle of the interval that truncates to ``size`` (124 / 312 gives
    int(312 * r) = 123)."""
    return next(r for r in (size / dim, (size + 0.5) / dim) if int(dim * r) == size)


def infer_hyperparameters(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """RGT constructor arguments read back from the weights alone.

    Some arguments leave no trace in the weights, and official models use the defaults: ``img_range`` (1.0),
    ``qk_scale`` (None), ``act_layer`` and ``norm_layer`` (GELU, LayerNorm) and the dropout rates. ``img_size``
    shapes nothing (the official code caches its shift masks for 64 whatever it is) and comes back as 64.
    ``num_heads`` comes back even: an odd count 2k+1 has the weights of 2k (each L-SA branch has k heads, and RG-SA's
    head count shapes no weight), but not its outputs. Official checkpoints use even counts; for another model, read
    the count from its modules (``rgt_fast.accelerate`` does). ``c_ratio`` and ``mlp_ratio`` come back as ratios
    that rebuild the stored sizes; RG-SA's attention scale depends on the float ``c_ratio`` itself, which matches
    only where size / embed_dim is exact (the official 0.5).
    """
    for key in REQUIRED_KEYS:
        _require(state_dict, key)
    blocks_per_group: dict[int, int] = {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            group, block = int(match.group(1)), int(match.group(2))
            blocks_per_group[group] = max(blocks_per_group.get(group, 0), block + 1)
    groups = len(blocks_per_group)
    if sorted(blocks_per_group) != list(range(groups)):
        raise ArchitectureMismatch(f"residual groups are not numbered 0..{groups - 1}: {sorted(blocks_per_group)}")
    depth = [blocks_per_group[g] for g in range(groups)]

    embed_dim, in_chans = _require(state_dict, "conv_first.weight").shape[:2]
    num_heads = [2 * int(_require(state_dict, f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight").shape[0])
                 for g in range(groups)]
    mlp_hidden = _require(state_dict, "layers.0.blocks.0.mlp.fc1.weight").shape[0]
    offsets = _require(state_dict, "layers.0.blocks.0.attn.attns.0.rpe_biases")
    split_size = [int(offsets[:, 0].max().item()) + 1, int(offsets[:, 1].max().item()) + 1]
    if any(depth_i > 1 for depth_i in depth):
        reduced_channels = _require(state_dict, "layers.0.blocks.1.attn.conv.weight").shape[0]
        c_ratio = _ratio_rebuilding(reduced_channels, embed_dim)
    else:
        c_ratio = COMMON_DEFAULTS["c_ratio"]

    upsample_convs = sorted(int(m.group(1)) for k in state_dict if (m := _UPSAMPLE_KEY.match(k)))
    if not upsample_convs:
        upscale = 1
    else:
        out_channels = state_dict[f"upsample.{upsample_convs[0]}.weight"].shape[0]
        num_feat = state_dict["conv_before_upsample.0.weight"].shape[0]
        if out_channels == 4 * num_feat:
            upscale = 2 ** len(upsample_convs)
        elif out_channels == 9 * num_feat and len(upsample_convs) == 1:
            upscale = 3
        else:
            raise ArchitectureMismatch(f"unrecognised upsampler: {len(upsample_convs)} conv(s) with "
                                       f"{out_channels} output channels")
    if "conv_after_body.weight" in state_dict:
        resi_connection = "1conv"
    elif "conv_after_body.0.weight" in state_dict:
        resi_connection = "3conv"
    else:
        raise ArchitectureMismatch("not an RGT state_dict: neither conv_after_body.weight nor "
                                   "conv_after_body.0.weight is present")

    return dict(
        upscale=upscale, in_chans=int(in_chans), img_size=COMMON_DEFAULTS["img_size"], img_range=1.0, depth=depth,
        embed_dim=int(embed_dim), num_heads=num_heads, mlp_ratio=_ratio_rebuilding(mlp_hidden, embed_dim),
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state_dict, qk_scale=None, drop_rate=0.0,
        attn_drop_rate=0.0, drop_path_rate=COMMON_DEFAULTS["drop_path_rate"], use_chk=False,
        resi_connection=resi_connection, split_size=split_size, c_ratio=c_ratio,
    )
