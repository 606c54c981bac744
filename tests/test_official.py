import argparse
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_ibot

from ibot.builders.sources import load_backbone
from ibot.export import export_backbone
from ibot.io import CheckpointError
from ibot.official import load_official


def _official_layout(model, shared=True):
    """A checkpoint laid out as bytedance/ibot main_ibot.py writes it."""

    def backbone_keys(bb, prefix):
        sd = {prefix + k[len("vit.") :]: v for k, v in bb.state_dict().items() if k.startswith("vit.")}
        if bb.masked_embed is not None:
            sd[prefix + "masked_embed"] = bb.masked_embed.detach()
        return sd

    def head_keys(head, prefix):
        sd = {prefix + k: v for k, v in head.state_dict().items()}
        if shared:  # the shared module is saved twice
            sd.update(
                {
                    prefix + k.replace("last_layer.", "last_layer2."): v
                    for k, v in head.state_dict().items()
                    if k.startswith("last_layer.")
                }
            )
        return sd

    student = {
        **backbone_keys(model.student["backbone"], "module.backbone."),
        **head_keys(model.student["head"], "module.head."),
    }
    teacher = {**backbone_keys(model.teacher["backbone"], "backbone."), **head_keys(model.teacher["head"], "head.")}
    args = argparse.Namespace(arch="vit_small", patch_size=8, out_dim=40, shared_head=True)
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {},
        "epoch": 3,
        "args": args,
        "ibot_loss": {"center": torch.zeros(1, 40), "center2": torch.zeros(1, 1, 40)},
    }


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = tiny_ibot(shared_head=True).eval()
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_official_full_checkpoint_loads_with_same_outputs(tmp_path, model):
    path = tmp_path / "checkpoint.pth"
    torch.save(_official_layout(model), path)
    x = torch.randn(2, 3, 32, 32)
    for which in ("teacher", "student"):
        backbone, head, centers, report = load_official(path, which, num_heads=2)
        ref = model.teacher if which == "teacher" else model.student
        ref_cls, ref_patch = ref["backbone"](x)
        cls, patch = backbone.eval()(x)
        torch.testing.assert_close(cls, ref_cls)
        torch.testing.assert_close(patch, ref_patch)
        torch.testing.assert_close(head(cls), ref["head"](ref_cls))
        assert not report.missing or report.missing == ["masked_embed"]
        assert "center" in centers
    # at another resolution too (position-embedding interpolation)
    backbone, *_ = load_official(path, "teacher", num_heads=2)
    y = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(backbone(y)[0], model.teacher["backbone"](y)[0])


def test_backbone_only_files_and_errors(tmp_path, model):
    full = _official_layout(model)
    flat = {k[len("backbone.") :]: v for k, v in full["teacher"].items() if k.startswith("backbone.")}
    torch.save({"state_dict": flat}, tmp_path / "wrapped.pth")
    torch.save(flat, tmp_path / "flat.pth")
    x = torch.randn(1, 3, 32, 32)
    for f in ("wrapped.pth", "flat.pth"):
        backbone, head, _, _ = load_official(tmp_path / f, num_heads=2)
        assert head is None
        torch.testing.assert_close(backbone(x)[0], model.teacher["backbone"](x)[0])
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no ViT backbone keys"):
        load_official(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no 'student' entry"):
        torch.save({"teacher": full["teacher"]}, tmp_path / "t.pth")
        load_official(tmp_path / "t.pth", "student")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"teacher": {}, "evil": Evil()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="--allow-unsafe-pickle"):
        load_official(tmp_path / "bad.pth")


EXPORT_CHECK = r"""
import json, sys, torch, timm
from safetensors.torch import load_file
out = sys.argv[1]
meta = json.load(open(out + "/backbone.json"))
m = timm.create_model(meta["arch"], num_classes=0, **meta["timm_kwargs"]).eval()
m.load_state_dict(load_file(out + "/backbone.safetensors"))
x = torch.load(out + "/x.pt")
torch.save(m(x), out + "/timm_features.pt")
"""


def test_export_loads_in_plain_timm_with_identical_features(tmp_path, model):
    backbone = model.teacher["backbone"].eval()
    export_backbone(backbone, tmp_path, {"mean": [0.5], "std": [0.5]}, arch="vit_tiny_patch16_224")
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["timm_kwargs"]["patch_size"] == 8 and meta["img_size"] == 32
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(tmp_path)], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "timm_features.pt"), backbone(x)[0], rtol=1e-5, atol=1e-5)
    loaded, info, _ = load_backbone(tmp_path / "backbone.safetensors")
    torch.testing.assert_close(loaded(x)[0], backbone(x)[0])


def test_continued_pretraining_from_official_checkpoint(tmp_path, model):
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    cfg = build_config(
        "smoke",
        [
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.knn_at_end=false",
            "run.max_steps=1",
            "model.embed_dim=48",
            "model.num_heads=2",
            "model.out_dim=40",
            "model.patch_out_dim=40",
            "model.bottleneck_dim=32",
            "model.depth=2",
            f"run.init_from={tmp_path / 'official.pth'}",
        ],
    )
    torch.save(_official_layout(model), tmp_path / "official.pth")
    tr = Trainer(cfg, log=lambda *a: None)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(tr.model.teacher["backbone"](x)[0], model.teacher["backbone"](x)[0])
    tr.fit()


def test_official_default_heads_unshared_student_shared_teacher_load_completely(tmp_path, monkeypatch):
    """Official defaults: ``--shared_head false`` for the student, a shared teacher head (last_layer2 is last_layer)."""
    import ibot.builders.sources as sources

    torch.manual_seed(0)
    source = tiny_ibot(shared_head=False)
    ckpt = _official_layout(source, shared=False)
    teacher_head = {k: v for k, v in ckpt["teacher"].items() if not k.startswith("head.last_layer2.")}
    for k in [k for k in teacher_head if k.startswith("head.last_layer.")]:  # the shared module is saved twice
        teacher_head[k.replace("last_layer.", "last_layer2.")] = teacher_head[k]
    ckpt["teacher"] = teacher_head
    torch.save(ckpt, tmp_path / "official.pth")
    calls = []
    real_load = sources.load_safe
    monkeypatch.setattr(sources, "load_safe", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    torch.manual_seed(1)
    target = tiny_ibot(shared_head=False)
    report = sources.init_model_from(target, tmp_path / "official.pth")
    assert len(calls) == 1  # the file is read once
    t_head, s_head = target.teacher["head"], target.student["head"]
    torch.testing.assert_close(t_head.last_layer2.weight_v, ckpt["teacher"]["head.last_layer.weight_v"])
    torch.testing.assert_close(s_head.last_layer2.weight_v, source.student["head"].last_layer2.weight_v)
    assert "shared prototypes copied into last_layer2" in report and "missing" not in report.replace(
        "nothing missing", ""
    )
    bigger = tiny_ibot(shared_head=False, n_patch_prototypes=48)
    with pytest.raises(CheckpointError, match="last_layer2.weight_. has shape .*model.patch_out_dim"):
        sources.init_model_from(bigger, tmp_path / "official.pth")
