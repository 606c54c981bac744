"""Swin backbone: coarse-grid masking, official window order, shapes, gradients/EMA, interop, CLI."""

import inspect
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ibot import iBOT
from ibot.builders.model import build_model
from ibot.builders.sources import load_backbone
from ibot.config import build_config, mask_cell
from ibot.export import export_backbone
from ibot.models import MaskedSwin, create_vit
from ibot.models.swin import swin_block, window_attention
from ibot.official import load_official

ARCH = "swin_tiny_patch4_window7_224"


def tiny_swin(img_size=32, patch=2, window=4, depths=(1, 1, 1), dim=8, heads=None, drop_path=0.0):
    return create_vit(
        ARCH,
        img_size=img_size,
        patch_size=patch,
        embed_dim=dim,
        depths=depths,
        num_heads=heads or (1,) * len(depths),
        window_size=window,
        drop_path_rate=drop_path,
    )


def test_mask_cell_is_patch_times_eight_for_the_official_recipe():
    for name in ("swin_tiny_w7_in1k", "swin_tiny_w14_in1k"):
        cfg = build_config(name, [])
        assert mask_cell(cfg) == 32 and cfg.model.img_size // mask_cell(cfg) == 7  # 7 x 7 prediction grid
        assert cfg.mask.start_epoch == 50 and cfg.model.window_size in (7, 14)
    assert mask_cell(build_config("swin_smoke", [])) == 8  # patch 2, three stages: 2 * 2^2
    assert mask_cell(build_config("smoke", [])) == 8  # ViT: the patch itself
    for name in ("swin_smoke", "smoke"):  # the config's cell (no model built) is the built backbone's
        cfg = build_config(name, [])
        backbone = build_model(cfg).student["backbone"]
        assert backbone.mask_cell == mask_cell(cfg) and backbone.patch_size == cfg.model.patch_size


def test_mask_on_coarse_grid_expands_to_the_embedding_grid():
    torch.manual_seed(0)
    bb = MaskedSwin(tiny_swin())
    with torch.no_grad():
        bb.masked_embed.normal_()
    assert bb.mask_cell == 8 and bb.patch_size == 2 and bb.grid_size(32, 32) == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 4, 4) > 0.5
    tokens = bb.prepare_tokens(x, mask)  # (2, 16, 16, 8): each cell covers 4 x 4 embedding positions
    plain = bb.swin.patch_embed(x)
    for b in range(2):
        for r in range(16):
            for c in range(16):
                want = bb.masked_embed[0] if mask[b, r // 4, c // 4] else plain[b, r, c]
                torch.testing.assert_close(tokens[b, r, c], want)
    flat = bb.prepare_tokens(x, mask.reshape(2, 16))  # (B, N) masks are the same thing
    torch.testing.assert_close(flat, tokens)
    with pytest.raises(ValueError, match="prediction grid is 4x4"):
        bb(x, torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="not divisible by the Swin prediction cell 8"):
        bb.grid_size(36, 36)


def _dense_window_attention(blk, x):
    """Reference from the definition: pad, roll, then full attention restricted to same window and region."""
    _, h, w, c = x.shape
    wh, ww = blk.window_size
    sh, sw = blk.shift_size
    xp = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = xp.shape[1:3]
    xp = torch.roll(xp, (-sh, -sw), (1, 2))
    ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()

    def region(v, size, win, shift):  # official slices: [0, -win), [-win, -shift), [-shift, end)
        if not shift:
            return torch.zeros_like(v)
        return (v >= size - win).long() + (v >= size - shift).long()

    reg = region(ys, hp, wh, sh) * 3 + region(xs, wp, ww, sw)
    win = (ys // wh) * (wp // ww) + xs // ww
    attn = blk.attn
    heads = attn.num_heads
    t = xp.reshape(-1, c)
    qkv = attn.qkv(t).reshape(len(t), 3, heads, -1).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * attn.scale) @ k.transpose(-1, -2)  # (heads, T, T)
    ry = (ys % wh)[:, None] - (ys % wh)[None, :] + wh - 1
    rx = (xs % ww)[:, None] - (xs % ww)[None, :] + ww - 1
    bias = attn.relative_position_bias_table[ry * (2 * ww - 1) + rx].permute(2, 0, 1)
    logits = logits + bias + (reg[:, None] != reg[None, :]).float() * -100.0
    logits = logits.masked_fill(win[:, None] != win[None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(t), -1)
    out = attn.proj(out).reshape(1, hp, wp, c)
    return torch.roll(out, (sh, sw), (1, 2))[:, :h, :w]


@pytest.mark.parametrize("size", [8, 5])  # whole windows, and a map padded 5 -> 8 before the shift
def test_window_attention_pads_before_the_shift_like_the_official_code(size):
    torch.manual_seed(0)
    swin = tiny_swin(img_size=32, patch=4, window=4, depths=(2,), heads=(2,), dim=8)
    blk = swin.layers[0].blocks[1]  # the shifted block
    assert tuple(blk.shift_size) == (2, 2)
    with torch.no_grad():
        for p in blk.attn.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, size, size, 8)
    torch.testing.assert_close(window_attention(blk, x), _dense_window_attention(blk, x), rtol=1e-5, atol=1e-5)
    if size % 4:  # timm's own order (shift, then pad) gives other numbers on padded maps
        assert (blk._attn(x) - window_attention(blk, x)).abs().max() > 0.1
    y = swin_block(blk, x)
    assert y.shape == x.shape


def test_shapes_at_224_and_local_crop_sizes():
    torch.manual_seed(0)
    bb = MaskedSwin(tiny_swin(img_size=224, patch=4, window=7, depths=(1, 1, 1, 1), dim=8)).eval()
    assert bb.mask_cell == 32 and bb.patch_size == 4 and bb.embed_dim == 64
    x = torch.randn(2, 3, 224, 224)
    cls, patch = bb(x, torch.rand(2, 7, 7) > 0.5)
    assert cls.shape == (2, 64) and patch.shape == (2, 49, 64)
    torch.testing.assert_close(cls, patch.mean(1))  # the "CLS" is the average of the final tokens
    cls, patch = bb(torch.randn(3, 3, 96, 96))  # local crop: 24 -> 12 -> 6 -> 3 tokens per side
    assert cls.shape == (3, 64) and patch.shape == (3, 9, 64)
    layers = bb.get_intermediate_layers(x, 2)
    assert [t.shape for t in layers] == [(2, 1 + 196, 32), (2, 1 + 49, 64)]
    torch.testing.assert_close(layers[-1][:, 0], bb(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="viz patterns"):
        bb.last_selfattention(x)


def _swin_ibot(**kw):
    enc = dict(patch_size=2, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 2, 2), window_size=4)
    return iBOT(
        ARCH,
        projector_hidden_dim=32,
        projector_bottleneck_dim=16,
        n_cls_prototypes=24,
        n_patch_prototypes=24,
        image_size=32,
        encoder_kwargs=enc,
        mask_ratio=[0.0, 0.3],
        mask_ratio_var=[0.0, 0.2],
        **kw,
    )


def test_swin_gradients_reach_every_student_parameter_and_ema_is_exact():
    torch.manual_seed(0)
    model = _swin_ibot(norm_last_layer=False, drop_path_rate=0.1)
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    loc = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)]
    masks = torch.rand(8, 4, 4, generator=gen) > 0.6
    masks[0, 0, 0] = True
    out = model(global_views=g, local_views=loc, masks=masks)
    assert torch.isfinite(out.loss) and out.loss_patch is not None
    # the "CLS" pools every final token: no last-block skip (issue 27 item 1), the forward takes no rows
    assert model.reads("student", None) is None and model.reads("teacher", None) is None
    assert "rows" not in inspect.signature(MaskedSwin.forward).parameters
    out.loss.backward()
    missing = [n for n, p in model.student.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not missing and model.student["backbone"].masked_embed.grad.abs().sum() > 0
    teacher = model.teacher["backbone"]
    assert isinstance(teacher, MaskedSwin) and teacher.masked_embed is None
    assert not any("DropPath" in type(m).__name__ for m in teacher.modules())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * student[n])


def _official_swin_layout(bb: MaskedSwin) -> dict:
    """Keys as the official Swin saves them: downsample at the end of a stage, index buffers kept."""
    sd = {}
    for k, v in bb.swin.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        sd["backbone." + k] = v
    for name, buf in bb.swin.named_buffers():
        if name.endswith("relative_position_index"):
            sd["backbone." + name] = buf
    sd["backbone.masked_embed"] = bb.masked_embed.detach()
    return sd


def test_official_swin_checkpoint_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    src = MaskedSwin(tiny_swin(img_size=224, patch=4, window=7, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4)))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"teacher": _official_swin_layout(src)}, tmp_path / "swin.pth")
    bb, head, _, report = load_official(tmp_path / "swin.pth")
    assert isinstance(bb, MaskedSwin) and head is None and not report.missing, str(report)
    assert [len(s.blocks) for s in bb.swin.layers] == [1, 1, 2, 1] and bb.embed_dim == 64
    x, mask = torch.randn(2, 3, 224, 224), torch.rand(2, 7, 7) > 0.5
    for m in (None, mask):
        torch.testing.assert_close(bb(x, m)[1], src(x, m)[1])
    torch.testing.assert_close(bb(torch.randn(1, 3, 96, 96).expand(2, -1, -1, -1))[0].std(0), torch.zeros(64))


EXPORT_CHECK = r"""
import functools, json, sys, torch, timm
from safetensors.torch import load_file
out = sys.argv[1]
meta = json.load(open(out + "/backbone.json"))
norm = functools.partial(torch.nn.LayerNorm, eps=meta["norm_eps"])
m = timm.create_model(meta["arch"], num_classes=0, norm_layer=norm, **meta["timm_kwargs"]).eval()
m.load_state_dict(load_file(out + "/backbone.safetensors"))
torch.save(m(torch.load(out + "/x.pt")), out + "/timm_features.pt")
"""


def test_swin_export_loads_in_plain_timm(tmp_path):
    torch.manual_seed(0)
    bb = MaskedSwin(tiny_swin(img_size=64, patch=4, window=4, depths=(1, 1), heads=(1, 2)), False).eval()
    export_backbone(bb, tmp_path, {"mean": [0.5] * 3, "std": [0.5] * 3}, arch=ARCH)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["norm_eps"] == 1e-6 and meta["timm_kwargs"]["depths"] == [1, 1] and "avg" in meta["features"]
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(tmp_path)], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "timm_features.pt"), bb(x)[0], rtol=1e-5, atol=1e-5)
    loaded, info, _ = load_backbone(tmp_path)
    assert isinstance(loaded, MaskedSwin) and info["img_size"] == 64
    torch.testing.assert_close(loaded(x)[0], bb(x)[0])


def test_swin_smoke_preset_pretrains_evaluates_and_visualises(tmp_path, capsys):
    from ibot.cli import main
    from ibot.eval.protocols import run_linear

    run = tmp_path / "run"
    assert main(["pretrain", "preset=swin_smoke", f"run.output_dir={run}", "run.progress=false"]) == 0
    knn = json.loads((run / "summary.json").read_text())["knn"]
    assert (run / "checkpoint.pth").is_file() and (knn["n_train"], knn["n_test"]) == (64, 16)
    assert knn["top1"] >= 50  # 4 classes: chance 25% (measured 9 of 16)
    res = run_linear(run, epochs=1, n_last_blocks=2, log=lambda m: None)  # runs on Swin features
    assert (res["n_fit"] + res["n_val"], res["n_test"]) == (64, 16)
    assert main(["viz", "patterns", str(run), "--out", str(tmp_path / "pat")]) == 0
    assert list((tmp_path / "pat").glob("*.png"))
    assert main(["viz", "correspond", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["viz", "attention", str(run), "--out", str(tmp_path / "a.png")]) == 2
    assert "attention maps need a ViT class token" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert isinstance(load_backbone(tmp_path / "exp")[0], MaskedSwin)


def test_swin_config_errors():
    from ibot.config import ConfigError

    with pytest.raises(ConfigError, match="model.window_size applies to Swin backbones only"):
        build_config("smoke", ["model.window_size=7"])
    with pytest.raises(ConfigError, match="not model.depth/num_heads"):
        build_config("swin_smoke", ["model.depth=2"])
    with pytest.raises(ConfigError, match="Swin mask cell"):
        build_config("swin_smoke", ["model.img_size=36"])
