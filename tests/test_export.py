"""Exports timm loads by itself (weights, architecture, preprocessing), and timm-format files as init weights."""

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.builders.model import build_model
from ibot.builders.sources import load_backbone
from ibot.cli import main
from ibot.config import build_config
from ibot.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ibot.export import eval_crop_pct, export_backbone

README = Path(__file__).resolve().parents[1] / "README.md"
RGB = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

# runs in a fresh interpreter that never imports ibot: only timm reads the export
TIMM_ONLY = r"""
import json, sys, torch, timm
from PIL import Image
out = sys.argv[1]
model = timm.create_model("local-dir:" + out, pretrained=True).eval()
cfg = timm.data.resolve_data_config(model=model)
x = timm.data.create_transform(**cfg)(Image.open(out + "/image.png").convert("RGB")).unsqueeze(0)
with torch.no_grad():
    torch.save({"features": model(x), "other_size": model(torch.randn(1, 3, 96, 80)).shape}, out + "/timm.pt")
json.dump({"data_config": cfg, "pretrained_cfg": model.pretrained_cfg, "num_classes": model.num_classes},
          open(out + "/timm.json", "w"), default=str)
"""


def _backbone(img_size=64):
    cfg = build_config("smoke", [f"model.img_size={img_size}"])
    torch.manual_seed(0)
    return build_model(cfg).teacher["backbone"].eval()


def _image(path, size=(100, 80), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("size", [28, 32, 64, 96, 100, 160, 224, 384])
def test_crop_pct_reproduces_ibots_resize_side_in_timms_formula(size):
    resize = int(round(size * 256 / 224)) if size >= 64 else size
    import math

    assert math.floor(size / eval_crop_pct(size)) == resize


def test_export_is_timm_native_end_to_end(tmp_path):
    """timm's own resolve_data_config + create_transform on a PIL image give ibot's features."""
    bb = _backbone(64)
    export_backbone(bb, tmp_path, RGB)
    img = _image(tmp_path / "image.png")
    subprocess.run([sys.executable, "-c", TIMM_ONLY, str(tmp_path)], check=True)
    got = json.loads((tmp_path / "timm.json").read_text())
    dc, pc = got["data_config"], got["pretrained_cfg"]  # ibot resizes 64 px images to 73, then crops 64
    assert (
        dc["input_size"] == [3, 64, 64]
        and dc["interpolation"] == "bicubic"
        and dc["crop_pct"] == pytest.approx(64 / 73, abs=1e-4)
    )
    assert dc["mean"] == pytest.approx(IMAGENET_MEAN) and dc["std"] == pytest.approx(IMAGENET_STD)
    assert got["num_classes"] == 0 and pc["source"] == "local-dir" and not pc.get("hf_hub_id")
    timm_out = torch.load(tmp_path / "timm.pt")
    assert tuple(timm_out["other_size"]) == (1, 32)  # dynamic_img_size: 96 x 80 runs too
    with torch.no_grad():
        ours = bb(eval_transform(64, 3)(img).unsqueeze(0))[0]
    torch.testing.assert_close(timm_out["features"], ours, rtol=1e-5, atol=1e-5)
    for name in ("backbone.safetensors", "config.json", "backbone.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_readme_snippet_runs_as_written(tmp_path):
    block = re.search(r"```python\n(import timm\n.*?local-dir:exported.*?)```", README.read_text(), re.S)
    assert block, "README has no timm snippet loading local-dir:exported"
    export_backbone(_backbone(32), tmp_path / "exported", RGB)
    _image(tmp_path / "image.jpg")
    code = block.group(1) + "\nassert features.shape == (1, 32), features.shape\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_checkpoints_are_written_0644(tmp_path):
    from ibot.io import save_atomic

    save_atomic({"a": torch.zeros(1)}, tmp_path / "checkpoint.pth")
    assert stat.S_IMODE((tmp_path / "checkpoint.pth").stat().st_mode) == 0o644


def test_official_swin_export_names_a_swin_arch_and_loads(tmp_path, capsys):
    """Issue 15 bug 7: backbone.json fell back to a ViT arch while writing Swin kwargs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
    from test_swin import _official_swin_layout, tiny_swin

    from ibot.models import MaskedSwin

    torch.manual_seed(0)
    src = MaskedSwin(tiny_swin(img_size=224, patch=4, window=7, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4))).eval()
    torch.save({"teacher": _official_swin_layout(src)}, tmp_path / "swin.pth")
    assert main(["export", str(tmp_path / "swin.pth"), "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert meta["arch"].startswith("swin") and meta["timm_kwargs"]["depths"] == [1, 1, 2, 1]
    loaded, info, _ = load_backbone(tmp_path / "out")
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.eval()(x)[0], src(x)[0])
    _image(tmp_path / "out" / "image.png")
    subprocess.run([sys.executable, "-c", TIMM_ONLY, str(tmp_path / "out")], check=True)
    timm_cfg = json.loads((tmp_path / "out" / "timm.json").read_text())
    assert timm_cfg["pretrained_cfg"]["architecture"].startswith("swin")
    # timm's Swin LayerNorm eps is 1e-5 (official 1e-6): features agree closely, not bit for bit
    img = Image.open(tmp_path / "out" / "image.png").convert("RGB")
    with torch.no_grad():
        ours = src(eval_transform(224, 3)(img).unsqueeze(0))[0]
    torch.testing.assert_close(torch.load(tmp_path / "out" / "timm.pt")["features"], ours, rtol=1e-2, atol=1e-3)
