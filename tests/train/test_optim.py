"""The optimizer side of a step against the official ``utils.py`` (oracles in ``tests/reference.py``).

Schedules (``cosine_scheduler``), parameter groups (``get_params_groups``), per-parameter clipping
(``clip_gradients``) and last-layer freezing (``cancel_gradients_last_layer``), first on
hand-computed values, then one whole :class:`TrainStep` against the official order of operations.
"""

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import step_values, tiny_ibot
from reference import (
    ref_cancel_gradients_last_layer,
    ref_clip_gradients,
    ref_cosine_scheduler,
    ref_params_groups,
)

from ibot.data.loader import Batch
from ibot.data.masking import MaskBatch, MaskGenerator
from ibot.train.optim import clip_gradients, drop_last_layer_grads, param_groups
from ibot.train.schedules import Schedules, cosine_scheduler
from ibot.train.step import TrainStep


def test_cosine_scheduler_hand_values():
    # warm-up linspace(0, 1, 2) = [0, 1], then 0.5 * (1 + cos(pi * i / 2)) for i = 0, 1: [1, 0.5]
    np.testing.assert_allclose(cosine_scheduler(1.0, 0.0, 2, 2, warmup_epochs=1), [0.0, 1.0, 1.0, 0.5], atol=1e-15)
    # no warm-up: 4 cosine steps from 2 to 1: 1 + 0.5 * (1 + cos(pi * i / 4))
    expected = [1 + 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(cosine_scheduler(2.0, 1.0, 2, 2), expected, atol=1e-15)
    # the ViT-S/16 recipe: peak 5e-4 * 1024 / 256 reached right after 10 warm-up epochs of 1251 steps
    lr = cosine_scheduler(5e-4 * 1024 / 256, 1e-6, 800, 1251, warmup_epochs=10)
    assert len(lr) == 800 * 1251 and lr[0] == 0.0
    assert lr[10 * 1251 - 1] == pytest.approx(2e-3, rel=1e-12) and lr[10 * 1251] == pytest.approx(2e-3, rel=1e-12)
    t = 790 * 1251
    assert lr[-1] == pytest.approx(1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + math.cos(math.pi * (t - 1) / t)), rel=1e-9)


@pytest.mark.parametrize(
    "args,kw",
    [
        ((2e-3, 1e-6, 7, 13), {"warmup_epochs": 2}),  # lr
        ((0.04, 0.4, 7, 13), {}),  # weight decay
        ((0.996, 1.0, 7, 13), {}),  # teacher momentum
        ((1.0, 0.1, 3, 5), {"warmup_epochs": 1, "start_warmup_value": 0.5}),
    ],
)
def test_cosine_scheduler_matches_official(args, kw):
    np.testing.assert_allclose(cosine_scheduler(*args, **kw), ref_cosine_scheduler(*args, **kw), rtol=1e-12, atol=0)


def test_trainer_builds_the_official_schedules(tmp_path):
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    cfg = build_config(
        "smoke",
        [
            f"run.output_dir={tmp_path}",
            "optim.lr=2e-3",
            "optim.min_lr=1e-5",
            "optim.epochs=3",
            "optim.warmup_epochs=1",
            "optim.weight_decay=0.05",
            "optim.weight_decay_end=0.3",
            "optim.momentum_teacher=0.99",
        ],
    )
    tr = Trainer(cfg, log=lambda *a: None)
    n = tr.data.niter  # 64 images / batch 16
    assert n == 4
    np.testing.assert_allclose(tr.schedules.lr, ref_cosine_scheduler(2e-3 * 16 / 256, 1e-5, 3, n, 1), rtol=1e-12)
    np.testing.assert_allclose(tr.schedules.weight_decay, ref_cosine_scheduler(0.05, 0.3, 3, n), rtol=1e-12)
    np.testing.assert_allclose(tr.schedules.momentum, ref_cosine_scheduler(0.99, 1.0, 3, n), rtol=1e-12)


def _names(groups, module):
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [sorted(name_of[id(p)] for p in g["params"]) for g in groups]


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_param_groups_match_official(norm_last_layer):
    student = tiny_ibot(norm_last_layer=norm_last_layer).student
    ours, ref = param_groups(student), ref_params_groups(student)
    assert _names(ours, student) == _names(ref, student)
    assert [g.get("weight_decay") for g in ours] == [None, 0.0]
    decay, no_decay = _names(ours, student)
    # the official groups decay the tokens and embeddings (>= 2-D) and never biases or norms
    for name in (
        "backbone.vit.cls_token",
        "backbone.vit.pos_embed",
        "backbone.masked_embed",
        "head.last_layer.weight_v",
    ):
        assert name in decay
    assert "backbone.vit.norm.weight" in no_decay and "head.mlp.0.bias" in no_decay
    assert ("head.last_layer.weight_g" in decay) is (not norm_last_layer)  # a frozen gain is in no group
    assert "head.last_layer.weight_g" not in no_decay


class _Params(nn.Module):
    def __init__(self, grads):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros_like(g)) for g in grads])
        for p, g in zip(self.ps, grads, strict=True):
            p.grad = g.clone()


def test_clip_gradients_per_parameter_hand_values():
    grads = [
        torch.tensor([3.0, 4.0]),  # norm 5 > clip 1: scaled by 1 / (5 + 1e-6)
        torch.tensor([0.3, 0.4]),  # norm 0.5 < clip: unchanged
        torch.tensor([[0.6], [0.8]]),  # norm exactly 1: still scaled by 1 / (1 + 1e-6), as the official code
        torch.zeros(3),
    ]
    m = _Params(grads)
    clip_gradients(list(m.parameters()), 1.0)
    torch.testing.assert_close(m.ps[0].grad, torch.tensor([3.0, 4.0]) / (5 + 1e-6), rtol=0, atol=2e-7)
    torch.testing.assert_close(m.ps[1].grad, grads[1], rtol=0, atol=0)
    torch.testing.assert_close(m.ps[2].grad, grads[2] / (1 + 1e-6), rtol=0, atol=2e-7)  # not unchanged: 8e-7 off
    torch.testing.assert_close(m.ps[3].grad, torch.zeros(3), rtol=0, atol=0)
    # per parameter, not a global norm: the small gradient is not shrunk by the large one
    assert not torch.allclose(m.ps[1].grad, grads[1] / math.sqrt(25 + 0.25 + 1))
    m = _Params(grads)
    clip_gradients(list(m.parameters()), 0.0)  # 0 disables clipping
    for p, g in zip(m.ps, grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_clip_gradients_matches_official_on_a_model():
    torch.manual_seed(0)
    model = tiny_ibot(norm_last_layer=False).student
    for i, p in enumerate(model.parameters()):
        if i % 7 == 3:
            continue  # some parameters without gradient
        p.grad = torch.randn_like(p) * (0.01 if i % 2 else 2.0)  # some above, some below the clip
    ref = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()  # deepcopy leaves gradients behind
    clip_gradients(list(model.parameters()), 0.5)
    norms = ref_clip_gradients(ref, 0.5)
    assert min(norms) < 0.5 < max(norms)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=n)


def test_clip_gradients_global_mode_uses_the_total_norm():
    m = _Params([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 12.0])])  # total norm 13
    clip_gradients(list(m.parameters()), 1.0, mode="global")
    torch.testing.assert_close(m.ps[0].grad, torch.tensor([3.0, 4.0]) / (13 + 1e-6), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.ps[1].grad, torch.tensor([0.0, 0.0, 12.0]) / (13 + 1e-6), rtol=1e-6, atol=0)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_last_layer_freeze_matches_official(epoch):
    model = tiny_ibot(norm_last_layer=False).student  # unshared head: last_layer and last_layer2
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ref = copy.deepcopy(model)
    for q in ref.parameters():
        q.grad = torch.ones_like(q)
    if Schedules(3, 5, lr=1e-3, warmup_epochs=0, freeze_last_layer=2)[
        epoch * 5 + 4
    ].freeze_last_layer:  # last step of the epoch
        drop_last_layer_grads(model)
    ref_cancel_gradients_last_layer(epoch, ref, 2)
    dropped = {n for n, p in model.named_parameters() if p.grad is None}
    assert dropped == {n for n, p in ref.named_parameters() if p.grad is None}
    expected = {f"head.last_layer{s}.{w}" for s in ("", "2") for w in ("weight_v", "weight_g")} if epoch < 2 else set()
    assert dropped == expected


def _batch(b=4, n_local=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2 * b, 3, 32, 32, generator=gen)
    loc = torch.randn(n_local * b, 3, 16, 16, generator=gen)
    masks = MaskGenerator("block", [0.0, 0.3], [0.0, 0.2])(2 * b, 4, 4, random.Random(seed))
    return Batch(g, loc, MaskBatch.from_masks(masks, 2), torch.zeros(b, dtype=torch.long), 2, n_local)


@pytest.mark.parametrize("epoch", [0, 1])  # last layer frozen in epoch 0 (freeze_last_layer=1), trained in 1
def test_train_step_equals_official_optimizer_side(epoch):
    """backward -> per-parameter clip -> last-layer cancel -> AdamW (wd on group 0 only) -> EMA, as main_ibot.py."""
    torch.manual_seed(0)
    model = tiny_ibot(drop_path_rate=0.0, norm_last_layer=False)
    ref = copy.deepcopy(model)
    before = model.student["head"].last_layer.weight_v.detach().clone()
    batch = _batch()
    lr, wd, m, clip = 1e-2, 0.2, 0.9, 0.3

    step = TrainStep(model, clip_grad=clip)
    step.set_hyperparameters(lr, wd)
    out = step(batch, step_values(model, epoch, m, lr, wd, freeze_last_layer=epoch < 1))

    ref_out = ref(batch=batch, epoch=epoch)
    torch.testing.assert_close(out.loss, ref_out.loss)
    ref_out.loss.backward()
    norms = ref_clip_gradients(ref.student, clip)
    assert sum(n > clip for n in norms) > 5  # clipping is active
    ref_cancel_gradients_last_layer(epoch, ref.student, 1)
    groups = ref_params_groups(ref.student)
    groups[0]["weight_decay"] = wd
    opt = torch.optim.AdamW(groups, lr=lr)
    opt.step()
    with torch.no_grad():
        student = dict(ref.student.named_parameters())
        for n, t in ref.teacher.named_parameters():
            t.mul_(m).add_(student[n].detach(), alpha=1 - m)

    moved = not torch.equal(model.student["head"].last_layer.weight_v, before)
    assert moved is (epoch >= 1)  # frozen: no gradient, so AdamW neither steps nor decays it
    for part in ("student", "teacher"):
        ours, theirs = dict(getattr(model, part).named_parameters()), dict(getattr(ref, part).named_parameters())
        for n, p in ours.items():
            torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6, msg=f"{part}.{n}")


def _step_pair(precision, epoch=1, clip=0.3):
    """The same model and batch through a ``precision`` TrainStep and an fp32 one (CPU autocast)."""
    torch.manual_seed(0)
    model = tiny_ibot(drop_path_rate=0.0)
    ref = copy.deepcopy(model)
    batch = _batch()
    steps = []
    for m, prec in ((model, precision), (ref, "fp32")):
        s = TrainStep(m, precision=prec, device_type="cpu", clip_grad=clip)
        s.set_hyperparameters(1e-3, 0.04)
        steps.append(s)
    return model, ref, batch, steps


def test_bf16_autocast_step_is_close_to_fp32():
    model, ref, batch, (step, ref_step) = _step_pair("bf16")
    before = {n: p.detach().clone() for n, p in model.student.named_parameters() if p.requires_grad}
    out, ref_out = step(batch, step_values(model)), ref_step(batch, step_values(ref))
    assert step.scaler is None
    assert out.loss.item() != ref_out.loss.item()  # autocast ran the matmuls in bf16
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=2e-2)
    moved = [n for n, p in model.student.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every trainable student parameter was updated


def test_fp16_grad_scaler_unscales_before_clipping():
    model, ref, batch, (step, ref_step) = _step_pair("fp16", clip=1.0)
    assert isinstance(step.scaler, torch.amp.GradScaler)
    # the default 2**16 overflows this tiny head's fp16 gradients (the scaler skips such steps and
    # backs off, as in the official code); start at a scale that fits so that this step is applied
    step.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    step(batch, step_values(model))
    ref_step(batch, step_values(ref))
    assert step.scaler.get_scale() == 16.0  # no overflow: scale kept
    ref_grads = dict(ref.student.named_parameters())
    unclipped = 0
    for n, p in model.student.named_parameters():
        if not p.requires_grad:  # the frozen weight-norm gains
            continue
        g, r = p.grad.float(), ref_grads[n].grad
        # clipping saw unscaled gradients: the same per-parameter norms as fp32 (a scaled gradient
        # would be 16 times larger, or clipped to norm 1)
        assert g.norm().item() == pytest.approx(r.norm().item(), rel=5e-2, abs=1e-6), n
        unclipped += r.norm().item() < 0.99
    assert unclipped >= 5


def test_fp16_overflow_skips_the_update_and_halves_the_scale():
    model, _, batch, (step, _) = _step_pair("fp16")
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    qkv = model.student["backbone"].vit.blocks[0].attn.qkv.weight
    handle = qkv.register_hook(lambda g: g * float("inf"))
    step.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    step(batch, step_values(model))
    handle.remove()
    assert step.scaler.get_scale() == 8.0
    for n, p in model.student.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, msg=n)  # optimizer step skipped
