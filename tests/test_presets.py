"""Presets derived from others resolve to the values they used to spell out."""

import pytest

from ibot.config import PRESETS, build_config, from_dict, to_dict


def _swin_tiny_in1k_before_derivation(window: int, batch: int) -> dict:
    """The explicit swin_tiny_w{7,14}_in1k presets as written before they derived from vit_small_in1k."""
    return {
        "model": {
            "arch": "swin_tiny_patch4_window7_224",
            "patch_size": 4,
            "img_size": 224,
            "window_size": window,
            "out_dim": 8192,
            "patch_out_dim": 8192,
            "shared_head": True,
            "norm_last_layer": False,
            "drop_path": 0.1,
        },
        "mask": {"shape": "block", "ratio": [0.0, 0.3], "ratio_var": [0.0, 0.2], "start_epoch": 50},
        "loss": {"teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30},
        "data": {
            "dataset": "imagefolder",
            "global_crops_scale": [0.25, 1.0],
            "local_crops_number": 10,
            "local_crops_scale": [0.05, 0.25],
            "local_crop_size": 96,
            "num_workers": 10,
        },
        "optim": {"epochs": 300, "batch_size": batch, "lr": 5e-4, "warmup_epochs": 10},
    }


@pytest.mark.parametrize("window, batch", [(7, 64), (14, 26)])
def test_swin_in1k_presets_resolve_to_their_former_explicit_values(window, batch):
    before = _swin_tiny_in1k_before_derivation(window, batch)
    assert PRESETS[f"swin_tiny_w{window}_in1k"] == before  # the preset itself, key by key
    resolved = to_dict(build_config(f"swin_tiny_w{window}_in1k"))
    expected = to_dict(from_dict(before))  # the whole resolved config, defaults included
    assert resolved.keys() == expected.keys()
    for section in expected:
        if isinstance(expected[section], dict):
            for key in expected[section]:
                assert resolved[section][key] == expected[section][key], f"{section}.{key}"
        else:
            assert resolved[section] == expected[section], section
    assert resolved == expected


def test_efficient_drop_path_is_on_where_no_parity_test_pins_the_drop_path_stream():
    """Issue 27 item 2: the ViT ImageNet recipe runs its residual branches on the kept samples only; the
    golden curve's smoke preset keeps timm's per-sample drop path (its stream is pinned), Swin has no
    efficient path, and ``model.efficient_drop_path=false`` gives the official stream back."""
    assert build_config("vit_small_in1k").model.efficient_drop_path is True
    assert build_config("vit_small_in1k", ["model.efficient_drop_path=false"]).model.efficient_drop_path is False
    for name in ("smoke", "fmnist_tiny", "swin_tiny_w7_in1k", "swin_tiny_w14_in1k"):
        assert build_config(name).model.efficient_drop_path is False, name
