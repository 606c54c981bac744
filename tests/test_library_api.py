"""The library face of the methods: dict-like outputs, DINO on any timm backbone, the per-step helper."""

import pytest
import torch

from ibot import DINO, iBOT

SMALL = dict(projector_hidden_dim=32, projector_bottleneck_dim=16)


def _views(n, b, size, chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, chans, size, size, generator=g) for _ in range(n)]


def _tiny_ibot():
    enc = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    return iBOT("vit_tiny_patch16_224", **SMALL, n_cls_prototypes=16, n_patch_prototypes=16, image_size=32,
                encoder_kwargs=enc)  # fmt: skip


def test_output_is_dict_like():
    torch.manual_seed(0)
    out = _tiny_ibot()(global_views=_views(2, 4, 32))
    assert out["loss"] is out.loss and out[0] is out.loss
    assert out["loss_patch"] is out.loss_patch and "loss_patch" in out
    assert "loss_koleo" not in out  # None fields are absent, as in transformers' ModelOutput
    with pytest.raises(KeyError, match="loss_koleo"):
        out["loss_koleo"]
    assert out.get("loss_koleo", 3) == 3
    d = dict(out)
    keys = ["loss", "loss_cls", "loss_patch", "embedding", "teacher_logits", "student_logits", "teacher_probs"]
    assert list(d) == out.keys() == keys
    assert d["teacher_logits"].shape == (2, 4, 16)
    assert out.to_tuple()[1] is out.loss_cls


def test_dino_trains_a_resnet_on_pooled_features():
    torch.manual_seed(0)
    model = DINO("resnet18", **SMALL, n_prototypes=16)
    assert model.embed_dim == 512
    model.train()
    teacher_bb = model.teacher["backbone"]
    assert teacher_bb.training  # a BatchNorm teacher backbone uses batch statistics (official DINO)
    mean_before = teacher_bb.timm_model.bn1.running_mean.clone()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    out = model(global_views=_views(2, 4, 32), local_views=_views(2, 4, 16, seed=1))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    grads = [p.grad for p in model.student["backbone"].parameters()]
    assert all(g is not None for g in grads)  # every backbone parameter is in the graph
    assert model.student["backbone"].timm_model.conv1.weight.grad.abs().sum() > 0
    assert not torch.equal(mean_before, teacher_bb.timm_model.bn1.running_mean)
    opt.step()
    model.eval()
    emb = model(images=torch.randn(3, 3, 32, 32)).embedding
    assert emb.shape == (3, 512)


def test_dino_on_a_vit_without_class_token_pools():
    model = DINO("vit_tiny_patch16_224", **SMALL, n_prototypes=16, image_size=32,
                 encoder_kwargs={"patch_size": 8, "depth": 1, "class_token": False, "global_pool": "avg"})  # fmt: skip
    out = model(global_views=_views(2, 2, 32))
    assert torch.isfinite(out.loss) and out.embedding.shape == (4, 192)


def test_ibot_on_a_cnn_is_a_one_line_error():
    with pytest.raises(ValueError, match="use ibot.DINO"):
        iBOT("resnet18", **SMALL, n_cls_prototypes=16, n_patch_prototypes=16)


def test_trainer_runs_dino_on_a_resnet_and_explains_vit_only_keys(tmp_path):
    from ibot.config import ConfigError, build_config
    from ibot.train.trainer import Trainer

    base = ["method=dino", "model.arch=resnet18", f"run.output_dir={tmp_path}", "run.progress=false"]
    with pytest.raises(ConfigError, match="unexpected keyword argument 'embed_dim'; check the model"):
        Trainer(build_config("smoke", base))
    vit_keys = ["model.embed_dim=null", "model.depth=null", "model.num_heads=null"]
    cfg = build_config("smoke", [*base, *vit_keys, "run.max_steps=2", "run.knn_at_end=false"])
    result = Trainer(cfg, log=lambda *a: None).fit()
    assert result["final_step"] == 2 and result["final_loss"] > 0
    from ibot.cli import main

    assert main(["export", str(tmp_path), "--out", str(tmp_path / "exported")]) == 2  # one line, no traceback


def test_dino_on_a_resnet_with_a_batchnorm_head():
    torch.manual_seed(0)
    model = DINO("resnet18", **SMALL, n_prototypes=16, head_norm="bn")
    out = model(global_views=_views(2, 4, 32), local_views=_views(2, 4, 16, seed=1))
    assert torch.isfinite(out.loss) and out.student_logits.shape == (4, 4, 16)


def test_dino_takes_any_module_that_returns_features():
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )  # fmt: skip
    model = DINO(cnn, **SMALL, n_prototypes=16)
    assert model.embed_dim == 24
    out = model(global_views=_views(2, 4, 32), local_views=_views(2, 4, 16, seed=1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and cnn[0].weight.grad is not None
