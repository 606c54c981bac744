"""One resolver for every command's source (run folder, checkpoint, export, timm weights), and run.init_from."""

import pytest
import torch

from ibot.builders.model import build_model
from ibot.builders.sources import CHECKPOINT, EXPORT, load_backbone, load_head, resolve_source
from ibot.config import build_config
from ibot.export import export_backbone
from ibot.io import CheckpointError, previous_path
from ibot.models.backbone import interpolate_pos_embed


def test_resolve_source_names_the_file_of_each_kind_of_source(tmp_path):
    run, exp, empty = tmp_path / "run", tmp_path / "exp", tmp_path / "empty"
    for d in (run, exp, empty):
        d.mkdir()
    (run / CHECKPOINT).write_bytes(b"x")
    (run / EXPORT).write_bytes(b"x")  # a run folder's checkpoint wins over a stray export
    (exp / EXPORT).write_bytes(b"x")
    assert resolve_source(run) == run / CHECKPOINT
    assert resolve_source(str(exp)) == exp / EXPORT
    assert resolve_source(tmp_path / "official.pth") == tmp_path / "official.pth"  # a file: as given
    with pytest.raises(CheckpointError, match=f"has no {CHECKPOINT} or {EXPORT}$"):
        resolve_source(empty)
    # resuming: a folder names its checkpoint.pth even when only checkpoint.prev.pth survived
    previous_path(empty / CHECKPOINT).write_bytes(b"x")
    assert resolve_source(empty, checkpoint_only=True) == empty / CHECKPOINT


def test_every_command_resolves_a_run_folder_alike(tmp_path):
    """load_backbone, load_head, init_model_from and resume read the same file of a run folder."""
    from ibot.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = build_config(
        "smoke", [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", "run.max_steps=1"]
    )
    Trainer(cfg, log=lambda *a: None).fit()
    x = torch.randn(1, 3, 32, 32)
    from_folder, _, report = load_backbone(run)
    from_file, _, _ = load_backbone(run / CHECKPOINT)
    assert str(run / CHECKPOINT) in report
    torch.testing.assert_close(from_folder.eval()(x)[0], from_file.eval()(x)[0])
    torch.testing.assert_close(load_head(run).state_dict(), load_head(run / CHECKPOINT).state_dict())
    with pytest.raises(CheckpointError, match="has no checkpoint.pth or backbone.safetensors"):
        load_backbone(tmp_path)


# ---------------------------------------------------------------- run.init_from with timm-format weights
def _smoke(tmp_path, source, *extra):
    from ibot.train.trainer import Trainer

    cfg = build_config(
        "smoke",
        [f"run.output_dir={tmp_path / 'run'}", "run.progress=false", "run.knn_at_end=false", "run.max_steps=1"]
        + [f"run.init_from={source}", *extra],
    )
    return Trainer(cfg, log=lambda *a: None)


def _timm_vit(img_size=32, num_classes=0):
    import timm

    torch.manual_seed(1)
    kw = dict(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)
    return timm.create_model("vit_tiny_patch16_224", **kw).eval()


def test_init_from_timm_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    vit = _timm_vit()
    save_file(vit.state_dict(), str(tmp_path / "timm.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    tr = _smoke(tmp_path, tmp_path / "timm.safetensors")
    for part in (tr.model.student, tr.model.teacher):
        torch.testing.assert_close(part["backbone"].eval()(x)[0], vit(x))
    classifier = _timm_vit(num_classes=10)  # a fine-tuned timm model: its classifier is ignored
    torch.save({"model": classifier.state_dict()}, tmp_path / "timm.pth")
    tr = _smoke(tmp_path, tmp_path / "timm.pth")
    torch.testing.assert_close(
        tr.model.teacher["backbone"].eval()(x)[0],
        classifier.forward_head(classifier.forward_features(x), pre_logits=True),
    )
    tr.fit()  # and it trains from there


def test_init_from_resizes_position_embeddings_and_names_other_mismatches(tmp_path):
    from safetensors.torch import save_file

    vit = _timm_vit(img_size=64)
    save_file(vit.state_dict(), str(tmp_path / "big.safetensors"))
    tr = _smoke(tmp_path, tmp_path / "big.safetensors")  # the run is 32 px: 4x4 grid from 8x8
    want = interpolate_pos_embed(vit.pos_embed.detach(), 4, 4)
    torch.testing.assert_close(tr.model.teacher["backbone"].vit.pos_embed.detach(), want)
    with pytest.raises(
        CheckpointError,
        match=r"cls_token has shape \(1, 1, 32\) but the model.s is \(1, 1, 64\); set the model.\* keys",
    ):
        _smoke(tmp_path, tmp_path / "big.safetensors", "model.embed_dim=64")


def test_init_from_an_export_folder(tmp_path):
    cfg = build_config("smoke", ["model.img_size=32"])
    torch.manual_seed(0)
    bb = build_model(cfg).teacher["backbone"].eval()
    export_backbone(bb, tmp_path / "exported", {"mean": [0.5] * 3, "std": [0.5] * 3})
    tr = _smoke(tmp_path, tmp_path / "exported")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tr.model.student["backbone"].eval()(x)[0], bb(x)[0])


KNN_OF_EXPORT = r"""
import sys
from ibot.cli import main
args = ["--dataset", "synthetic", "--limit", "16", "--ks", "3", "--device", "cpu", "--no-progress"]
rc = main(["knn", sys.argv[1], *args])
print(rc, sorted(m for m in sys.modules if m.startswith("ibot.train")))
"""


def test_evaluating_an_export_never_imports_the_training_package(tmp_path):
    import subprocess
    import sys

    cfg = build_config("smoke")
    torch.manual_seed(0)
    export_backbone(
        build_model(cfg).teacher["backbone"].eval(), tmp_path / "exp", {"mean": [0.5] * 3, "std": [0.5] * 3}
    )
    out = subprocess.run(
        [sys.executable, "-c", KNN_OF_EXPORT, str(tmp_path / "exp")], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr
