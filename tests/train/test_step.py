"""The training step: device-side skip of non-finite steps (centers included), stacked clipping
bit-identical to the official loop, no host synchronisation, a constant number of clipping launches,
the patch center computed from bottleneck features."""

import random

import pytest
import torch
from conftest import step_values, tiny_ibot

from ibot.data.loader import Batch
from ibot.data.masking import MaskBatch, MaskGenerator
from ibot.train.counters import OpCounter
from ibot.train.optim import clip_gradients_per_param
from ibot.train.step import TrainStep

B = 4


def _batch(seed=0, n_local=2):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2 * B, 3, 32, 32, generator=gen)
    loc = torch.randn(n_local * B, 3, 16, 16, generator=gen) if n_local else None
    masks = MaskGenerator("block", [0.0, 0.3], [0.0, 0.2])(2 * B, 4, 4, random.Random(seed))
    masks[1, :2] = True
    return Batch(g, loc, MaskBatch.from_masks(masks, 2), torch.zeros(B, dtype=torch.long), 2, n_local)


def _model(**kw):
    torch.manual_seed(0)
    # CLS and patch settings differ so a swap would show
    kw = {"temperature_teacher_patch": 0.05, "center_momentum": 0.8, "norm_last_layer": False, **kw}
    return tiny_ibot(**kw).train()


def _state(model, step):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt = {
        (i, k): v.clone()
        for i, s in enumerate(step.optimizer.state.values())
        for k, v in s.items()
        if torch.is_tensor(v)
    }
    return sd, opt


def _official_clip(params, clip):
    """The official ``utils.clip_gradients`` loop, written from it."""
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


@pytest.mark.parametrize("clip", [0.05, 3.0])
def test_stacked_clipping_is_bit_identical_to_the_official_loop(clip):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,), (64,), (9, 9)]
    grads = [torch.randn(s, generator=gen) * torch.rand(1, generator=gen) * 10 for s in shapes]
    a = [torch.zeros(s, requires_grad=True) for s in shapes]
    b = [torch.zeros(s, requires_grad=True) for s in shapes]
    for pa, pb, g in zip(a, b, grads, strict=True):
        pa.grad, pb.grad = g.clone(), g.clone()
    clip_gradients_per_param(a, clip)
    _official_clip(b, clip)
    clipped = sum(not torch.equal(pb.grad, g) for pb, g in zip(b, grads, strict=True))
    assert clipped > 0  # the case exercises the clipping itself
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_clipping_launches_do_not_grow_with_the_parameter_count():
    params = [torch.zeros(3, requires_grad=True) for _ in range(200)]
    for p in params:
        p.grad = torch.ones(3)
    with OpCounter() as c:
        clip_gradients_per_param(params, 0.1)
    assert c.launches <= 8 and c.syncs == 0  # the official loop: 4 ops and one sync per parameter


def test_a_step_never_synchronises_with_the_host():
    model = _model()
    step = TrainStep(model, clip_grad=0.3)
    step.set_hyperparameters(1e-3, 0.04)
    batch = _batch()
    step(batch, step_values(model))  # the optimizer state exists from here on
    with OpCounter() as c:
        res = step(batch, step_values(model))
    assert c.syncs == 0, dict(c.sync_ops)
    assert c.launches > 100  # the counter saw the step
    assert res.flags.tolist() == [0.0, 0.0]


def test_gradients_of_the_previous_step_are_freed_before_the_forward():
    """Issue 25: zero_grad ran after the forward, so the last step's gradients lived through it."""
    model = _model()
    seen = []

    def forward(**kw):
        seen.append([p.grad is None for p in model.trainable_parameters()])
        return model(**kw)

    step = TrainStep(model, forward, clip_grad=3.0)
    for k in range(2):
        step(_batch(k), step_values(model))
    assert any(p.grad is not None for p in model.trainable_parameters())  # the step made gradients
    assert all(seen[1]), "gradients of step 1 were alive during the forward of step 2"


def test_non_finite_step_leaves_parameters_optimizer_centers_and_teacher_unchanged():
    """Issue 15 bug 1: the centers moved inside forward, before the finite check."""
    model = _model()
    step = TrainStep(model, clip_grad=3.0)
    step.set_hyperparameters(1e-3, 0.04)
    step(_batch(0), step_values(model))
    sd0, opt0 = _state(model, step)
    real = model.step

    def poisoned(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    model.step = poisoned
    res = step(_batch(1), step_values(model))
    assert res.bad.item() == 1.0
    sd1, opt1 = _state(model, step)
    for k, v in sd0.items():
        assert torch.equal(v, sd1[k]), k  # student, teacher, cls_center.center, patch_center_ema.center
    for k, v in opt0.items():
        assert torch.equal(v, opt1[k]), k  # exp_avg, exp_avg_sq and the step count
    model.step = real
    res = step(_batch(1), step_values(model))  # a good step after it moves everything again
    assert res.bad.item() == 0.0
    assert res.out.targets is None  # released once the centers moved: no (M, K_p) tensors across steps
    sd2, _ = _state(model, step)
    for k in ("cls_center.center", "patch_center_ema.center", "teacher.backbone.vit.cls_token"):
        assert not torch.equal(sd2[k], sd1[k]), k


def test_plain_forward_still_moves_the_centers_after_the_loss():
    model = _model()
    c0 = model.cls_center.center.clone()
    out = model(batch=_batch(), epoch=1)
    assert torch.isfinite(out.loss) and not torch.equal(model.cls_center.center, c0)
    # the targets the loss used were made with the center before the update
    t = out.teacher_logits.float()
    temp = model.teacher_temperatures(1)[0]
    torch.testing.assert_close(out.teacher_probs, torch.softmax((t - c0) / temp, -1))


def test_patch_center_from_bottleneck_means_equals_the_mean_of_all_logits():
    model = _model()
    batch = _batch()
    targets = model(batch=batch, epoch=1, update_centers=False).targets
    patch_sum, n_img = targets.patch_mean_logits.sum(0), targets.patch_mean_logits.shape[0]
    assert n_img == 2 * B
    with torch.no_grad():  # the official way: every token's logits, then the per-image mean
        tok = model.teacher["backbone"](batch.global_crops)[1]
        logits = model.teacher["head"].patch_prototypes(model.teacher["head"].project(tok.reshape(-1, tok.shape[-1])))
        want = logits.reshape(2 * B, tok.shape[1], -1).mean(1).sum(0)
    torch.testing.assert_close(patch_sum, want, rtol=1e-5, atol=1e-6)


def test_bf16_step_updates_and_skips():
    model = _model()
    step = TrainStep(model, precision="bf16", clip_grad=3.0)
    step.set_hyperparameters(1e-3, 0.04)
    p0 = [p.detach().clone() for p in model.trainable_parameters()]
    res = step(_batch(0), step_values(model))
    assert res.bad.item() == 0.0 and torch.isfinite(res.loss)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    assert any(not torch.equal(a, p) for a, p in zip(p0, model.trainable_parameters(), strict=True))
    sd0, opt0 = _state(model, step)
    real = model.step

    def poisoned(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    model.step = poisoned
    assert step(_batch(1), step_values(model)).bad.item() == 1.0
    sd1, opt1 = _state(model, step)
    for k, v in sd0.items():
        assert torch.equal(v, sd1[k]), k
    for k, v in opt0.items():
        assert torch.equal(v, opt1[k]), k


def test_fp16_overflow_is_skipped_by_the_fused_optimizer_and_the_scale_backs_off():
    """fp16: the gradient scaler's own inf check reaches fused AdamW on the device (no host sync)."""
    model = _model()
    step = TrainStep(model, precision="fp16", clip_grad=3.0)
    step.set_hyperparameters(1e-3, 0.04)
    sd0, _ = _state(model, step)
    scale = step.scaler.get_scale()
    step(_batch(0), step_values(model))  # 2**16 overflows fp16 gradients here
    assert not all(torch.isfinite(p.grad).all() for p in model.trainable_parameters() if p.grad is not None)
    assert step.scaler.get_scale() == scale / 2
    sd1, opt1 = _state(model, step)
    for k, v in sd0.items():
        if k.startswith("student."):
            assert torch.equal(v, sd1[k]), k  # the optimizer skipped the update
    assert all(v.sum() == 0 for (_, name), v in opt1.items() if name != "step")  # moments untouched
    assert all(v.item() == 0 for (_, name), v in opt1.items() if name == "step")  # step count undone


def test_update_centers_after_a_forward_equals_the_plain_forward():
    """What TrainStep does (forward without the update, then update_centers) moves the centers as a plain call."""
    plain, split = _model(), _model()
    plain(batch=_batch(), epoch=1)
    c0 = split.cls_center.center.clone()
    out = split(batch=_batch(), epoch=1, update_centers=False)
    assert torch.equal(split.cls_center.center, c0) and "targets" not in out  # an attribute, not a key
    split.update_centers(out.targets, torch.tensor(False))  # a skipped step leaves them
    assert torch.equal(split.cls_center.center, c0)
    split.update_centers(out.targets)
    for name in ("cls_center.center", "patch_center_ema.center"):
        assert torch.equal(split.state_dict()[name], plain.state_dict()[name]), name
    assert not hasattr(split, "epoch") and not hasattr(split.mask_generator, "epoch")  # no epoch state
