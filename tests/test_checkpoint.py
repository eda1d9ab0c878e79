"""Loading official-format weights: detection from weights alone, formats, and clear errors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rgt_fast
from rgt_fast import CheckpointError, infer_hyperparameters, load_model
from rgt_fast.config import preset_name
from rgt_fast.reference.rgt import shift_mask


@pytest.fixture(scope="module")
def official_state_dicts():
    """State_dicts of every preset and scale, as the official code would save them."""
    return {(name, scale): rgt_fast.create_model(name, scale, fused=False).state_dict()
            for name in ("RGT", "RGT-S") for scale in (2, 3, 4)}


@pytest.mark.parametrize("name", ["RGT", "RGT-S"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_every_preset_and_scale_is_detected_from_weights_alone(official_state_dicts, name, scale):
    kwargs = infer_hyperparameters(official_state_dicts[(name, scale)])
    assert kwargs == rgt_fast.preset_kwargs(name, scale)
    assert preset_name(kwargs) == name


def test_custom_configurations_are_detected():
    kwargs = rgt_fast.preset_kwargs("RGT-S", 1, depth=[2, 3], num_heads=[4, 4], embed_dim=64, mlp_ratio=4.0,
                                    split_size=[4, 16], c_ratio=0.25, resi_connection="3conv", in_chans=1,
                                    qkv_bias=False)
    state_dict = rgt_fast.reference.RGT(**kwargs).state_dict()
    assert infer_hyperparameters(state_dict) == kwargs
    assert preset_name(kwargs) is None


def test_ratios_that_do_not_divide_back_exactly_rebuild_the_stored_sizes():
    """int(44 * 0.7) = 30 and int(44 * 1.37) = 60, but int(44 * (30 / 44)) = 29 and int(44 * (60 / 44)) = 59."""
    kwargs = rgt_fast.preset_kwargs("RGT-S", 2, depth=[2], num_heads=[2], embed_dim=44, c_ratio=0.7, mlp_ratio=1.37)
    state_dict = rgt_fast.reference.RGT(**kwargs).state_dict()
    inferred = infer_hyperparameters(state_dict)
    assert int(44 * inferred["c_ratio"]) == 30 and int(44 * inferred["mlp_ratio"]) == 60
    load_model(state_dict, fused=False)


def test_img_size_shapes_nothing_and_masks_cached_for_another_size_still_load():
    """The official code caches every shift mask for 64 whatever img_size is; files this project wrote while
    img_size sized them (32 in train/options/smoke_cpu.yml) still load."""
    kwargs = rgt_fast.preset_kwargs("RGT-S", 2, depth=[3], num_heads=[2], embed_dim=32, split_size=[4, 8])
    state_dict = rgt_fast.reference.RGT(**{**kwargs, "img_size": 32}).state_dict()
    assert {k: v.shape for k, v in state_dict.items()} == {
        k: v.shape for k, v in rgt_fast.reference.RGT(**kwargs).state_dict().items()}
    assert infer_hyperparameters(state_dict)["img_size"] == 64
    mask_key = "layers.0.blocks.2.attn.attn_mask_0"
    written_at_32 = {**state_dict, mask_key: shift_mask(32, 32, 4, 8, 2, 4)}
    model = load_model(written_at_32, fused=False)
    assert torch.equal(model.state_dict()[mask_key], state_dict[mask_key])


def _save_variants(state_dict, tmp_path):
    """The layouts users have on disk: BasicSR params / params_ema, bare, DataParallel prefix, safetensors."""
    files = {}
    files["params"] = tmp_path / "params.pth"
    torch.save({"params": state_dict}, files["params"])
    files["params_ema"] = tmp_path / "ema.pth"
    decoy = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state_dict.items()}
    torch.save({"params": decoy, "params_ema": state_dict}, files["params_ema"])
    files["bare"] = tmp_path / "bare.pt"
    torch.save(state_dict, files["bare"])
    files["module"] = tmp_path / "module.pth"
    torch.save({"params": {f"module.{k}": v for k, v in state_dict.items()}}, files["module"])
    files["safetensors"] = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(files["safetensors"]))
    return files


@pytest.mark.parametrize("layout", ["params", "params_ema", "bare", "module", "safetensors"])
def test_load_model_reads_every_layout(tmp_path, layout):
    source = rgt_fast.create_model("RGT-S", 4, fused=False, depth=[2, 2], num_heads=[6, 6])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = _save_variants(source.state_dict(), tmp_path)[layout]
    model = load_model(path, fused=False)
    assert not model.training
    assert isinstance(model, rgt_fast.reference.RGT)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x), rtol=0, atol=0)


def test_param_key_picks_the_entry_and_falls_back_to_params_as_basicsr(tmp_path):
    small = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6])
    params = small.state_dict()
    params_ema = {k: v + 1 if v.is_floating_point() else v for k, v in params.items()}
    torch.save({"params": params, "params_ema": params_ema}, tmp_path / "both.pth")
    torch.save({"params": params}, tmp_path / "params.pth")
    torch.save(params, tmp_path / "bare.pth")
    torch.save({"state_dict": params}, tmp_path / "other.pth")

    def read(name, param_key):
        weights = rgt_fast.read_state_dict(tmp_path / name, param_key=param_key)
        return weights["conv_first.weight"]

    assert torch.equal(read("both.pth", None), params_ema["conv_first.weight"])
    assert torch.equal(read("both.pth", "params"), params["conv_first.weight"])
    assert torch.equal(read("both.pth", "params_ema"), params_ema["conv_first.weight"])
    assert torch.equal(read("params.pth", "params_ema"), params["conv_first.weight"])
    assert torch.equal(read("bare.pth", "params_ema"), params["conv_first.weight"])
    with pytest.raises(CheckpointError, match=r"other.pth: holds no 'params_ema' \(or 'params'\).*\['state_dict'\]"):
        read("other.pth", "params_ema")
    model = load_model(tmp_path / "both.pth", fused=False, param_key="params")
    assert torch.equal(model.conv_first.weight, params["conv_first.weight"])


def test_load_model_from_a_state_dict_and_to_a_device():
    source = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6])
    model = load_model(source.state_dict(), fused=False, device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_state_dicts_of_compiled_and_data_parallel_models_load():
    source = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6])
    for prefix in ("_orig_mod.", "module.", "_orig_mod.module."):
        model = load_model({prefix + k: v for k, v in source.state_dict().items()}, fused=False)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items()), prefix


def test_safetensors_files_are_recognised_whatever_the_case_of_their_suffix(tmp_path):
    state_dict = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6]).state_dict()
    path = tmp_path / "NET_G.SAFETENSORS"
    rgt_fast.save_state_dict(state_dict, path)
    assert path.read_bytes()[8:9] == b"{"  # safetensors' JSON header after its 8-byte length, not a pickle
    loaded = rgt_fast.read_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_save_state_dict_is_atomic_and_round_trips(tmp_path):
    state_dict = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2], num_heads=[6]).state_dict()
    for name in ("net_g.pth", "net_g.safetensors"):
        rgt_fast.save_state_dict(state_dict, tmp_path / name)
        loaded = rgt_fast.read_state_dict(tmp_path / name)
        assert loaded.keys() == state_dict.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net_g.pth", "net_g.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "net_g.pth").stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model(tmp_path / "nope.pth", fused=False)


def test_truncated_file_names_the_path(tmp_path, official_state_dicts):
    path = tmp_path / "truncated.pth"
    torch.save({"params": official_state_dicts[("RGT-S", 2)]}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated, corrupt"):
        load_model(path, fused=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_files_that_are_no_checkpoint_get_a_checkpoint_error(tmp_path, suffix):
    """Whatever their bytes, the error names the file: a text file made the weights-only unpickler raise a bare
    KeyError from deep inside torch.load."""
    rng = np.random.default_rng(7)
    contents = {"text": b"hi there", "empty": b"", "zip magic": b"PK\x03\x04" + bytes(40),
                "pickle protocol header": b"\x80\x02", "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()}
    for name, data in contents.items():
        path = tmp_path / f"{name.replace(' ', '_')}{suffix}"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{path.name}: cannot read weights"):
            load_model(path, fused=False)


def test_other_architecture_is_named(tmp_path):
    path = tmp_path / "edsr.pth"
    torch.save({"params": {"head.0.weight": torch.randn(64, 3, 3, 3), "tail.0.weight": torch.randn(3, 64, 3, 3)}},
               path)
    with pytest.raises(CheckpointError, match=r"edsr.pth: not an RGT state_dict: key 'conv_first.weight'"):
        load_model(path, fused=False)


def test_inconsistent_weights_list_the_mismatches(official_state_dicts):
    state_dict = dict(official_state_dicts[("RGT-S", 2)])
    state_dict["layers.0.blocks.0.mlp.fc2.weight"] = torch.randn(180, 99)
    del state_dict["layers.1.blocks.3.attn.proj.bias"]
    state_dict["layers.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_model(state_dict, fused=False)
    message = str(info.value)
    assert "missing keys: ['layers.1.blocks.3.attn.proj.bias']" in message
    assert "unexpected keys: ['layers.0.extra']" in message
    assert "layers.0.blocks.0.mlp.fc2.weight: checkpoint (180, 99) vs model (180, 180)" in message


class NotAWeight:
    """Unpickling this would run arbitrary code under weights_only=False."""

    def __reduce__(self):
        return (print, ("code from a weights file ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": NotAWeight()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_model(path, fused=False)
    assert "code from a weights file ran" not in capsys.readouterr().out


def test_non_tensor_entries_are_rejected(tmp_path):
    path = tmp_path / "opts.pth"
    torch.save({"params": {"conv_first.weight": "not a tensor"}}, path)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_model(path, fused=False)



def test_buffers_derived_from_the_architecture_may_be_left_out(tmp_path):
    source = rgt_fast.create_model("RGT-S", 2, fused=False, depth=[2, 2], num_heads=[6, 6])
    full = source.state_dict()
    derived = [k for k in full if k.endswith(("attn_mask_0", "attn_mask_1", "relative_position_index"))]
    assert any(k.endswith("attn_mask_0") for k in derived)
    rgt_fast.save_state_dict({k: v for k, v in full.items() if k not in derived}, tmp_path / "small.safetensors")
    model = load_model(tmp_path / "small.safetensors", fused=False)
    for key, value in full.items():
        assert torch.equal(model.state_dict()[key], value), key
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "small.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
