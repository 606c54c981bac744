import inspect
import random

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import tiny_ibot
from reference import ref_ibot_loss, ref_sinkhorn, ref_teacher_temp_schedule
from torch.utils._python_dispatch import TorchDispatchMode

from ibot import DINO, iBOT
from ibot.data.masking import MaskBatch, MaskGenerator
from ibot.losses import koleo_loss


def _views(b=4, n_local=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(b, 3, 32, 32, generator=gen) for _ in range(2)]
    loc = [torch.randn(b, 3, 16, 16, generator=gen) for _ in range(n_local)]
    masks = MaskGenerator("block", [0.0, 0.3], [0.0, 0.2])(2 * b, 4, 4, random.Random(seed))
    masks[0] = False  # guarantee one empty mask
    masks[1, :2] = True
    return g, loc, masks


def _reference_loss(model, g, loc, masks, temps):
    """Faithful official computation: heads on every token of every crop, loop over view pairs.

    ``temps``: the (CLS, patch) teacher temperatures, computed by the caller from the official schedule.
    """
    b = g[0].shape[0]
    gi = torch.cat(g)
    model.teacher["head"].train()  # the official teacher is never put in eval mode (matters for a BN head)
    with torch.no_grad():
        t_tok = torch.cat([t.unsqueeze(1) if t.ndim == 2 else t for t in model.teacher["backbone"](gi)], 1)
        t_cls, t_patch = model.teacher["head"](t_tok)
    s_tok = torch.cat([t.unsqueeze(1) if t.ndim == 2 else t for t in model.student["backbone"](gi, mask=masks)], 1)
    s_cls, s_patch = model.student["head"](s_tok)
    s_local = None
    if loc:
        l_tok = torch.cat([t.unsqueeze(1) if t.ndim == 2 else t for t in model.student["backbone"](torch.cat(loc))], 1)
        s_local = model.student["head"](l_tok)[0]
    temp, temp2 = temps
    mask_list = list(masks.reshape(2, b, 4, 4))
    return ref_ibot_loss(
        s_cls,
        s_patch,
        t_cls,
        t_patch,
        s_local,
        mask_list,
        model.cls_center.center.clone(),
        model.patch_center_ema.center.clone().unsqueeze(0),
        temp,
        temp2,
        2,
        model.lambda1,
        model.lambda2,
    )


@pytest.mark.parametrize(
    "n_local,shared,norm,mask_start", [(3, False, None, 0), (0, True, None, 2), (3, False, "bn", 0), (2, True, "ln", 0)]
)
def test_lean_step_equals_faithful_reference(n_local, shared, norm, mask_start):
    """Also ``head_norm="bn"``: official batch statistics over every token of each crop group, teacher too."""
    torch.manual_seed(0)
    model = tiny_ibot(
        drop_path_rate=0.0,
        shared_head=shared,
        cls_loss_weight=0.8,
        patch_loss_weight=1.2,
        head_norm=norm,
        temperature_teacher_patch_warmup=0.06,  # CLS and patch temperatures differ: a swap fails
        temperature_teacher_patch=0.1,
        mask_start_epoch=mask_start,
    )
    with torch.no_grad():  # non-trivial centers and a teacher different from the student
        model.cls_center.center.normal_(0, 0.1)  # small: targets stay soft
        model.patch_center_ema.center.normal_(0, 0.1)
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    g, loc, masks = _views(n_local=n_local)
    epoch = 3
    temps = (
        ref_teacher_temp_schedule(0.04, 0.07, 30, 100)[epoch],
        ref_teacher_temp_schedule(0.06, 0.1, 30, 100, mask_start)[epoch],
    )
    ref_cls, ref_patch, ref_c, ref_c2 = _reference_loss(model, g, loc, masks, temps)
    out = model(global_views=g, local_views=loc, masks=masks, epoch=epoch)
    torch.testing.assert_close(out.loss_cls, ref_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_patch, ref_patch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.cls_center.center, ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.patch_center_ema.center, ref_c2.reshape(1, -1), rtol=1e-5, atol=1e-5)


def test_lean_gradients_equal_faithful_gradients():
    torch.manual_seed(1)
    model = tiny_ibot(drop_path_rate=0.0)
    g, loc, masks = _views()
    centers = (model.cls_center.center.clone(), model.patch_center_ema.center.clone())
    out = model(global_views=g, local_views=loc, masks=masks)
    out.loss.backward()
    lean = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.cls_center.center.copy_(centers[0])
    model.patch_center_ema.center.copy_(centers[1])
    ref_cls, ref_patch, _, _ = _reference_loss(model, g, loc, masks, (0.04, 0.04))
    (ref_cls + ref_patch).backward()
    for n, p in model.student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(lean[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_every_trainable_student_parameter_gets_a_gradient_teacher_none():
    torch.manual_seed(0)
    model = tiny_ibot(norm_last_layer=False)
    g, loc, masks = _views()
    model(global_views=g, local_views=loc, masks=masks).loss.backward()
    trainable = [n for n, p in model.student.named_parameters() if p.requires_grad]
    missing = [
        n
        for n, p in model.student.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert trainable and not missing
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def _moved_student():
    """A tiny iBOT whose student has moved away from its teacher; the teacher's weights before the EMA."""
    torch.manual_seed(0)
    model = tiny_ibot()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = {n: p.clone() for n, p in model.teacher.named_parameters()}
    return model, before_t, dict(model.student.named_parameters())


def test_ema_update_is_exact():
    model, before_t, student = _moved_student()
    model.update_teacher(0.9)
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before_t[n] + 0.1 * student[n])


class _Outputs(TorchDispatchMode):
    """Records the size of every tensor an op returns in memory none of its inputs use (a new allocation)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        used = _storages((args, kwargs))
        self.sizes += [t.numel() for t in _tensors(out) if t.untyped_storage().data_ptr() not in used]
        return out


def _tensors(tree) -> list:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storages(tree) -> set:
    return {t.untyped_storage().data_ptr() for t in _tensors(tree)}


@pytest.mark.parametrize("apply", [True, False])
def test_gated_ema_is_in_place_and_equals_the_formula(apply):
    """Issue 25: the device-gated EMA (what the training step runs) made a student-sized temporary
    (``_foreach_mul(student, w)``); it now updates the teacher in place with the same values."""
    model, before_t, student = _moved_student()
    with _Outputs() as rec:
        model.update_teacher(0.9, torch.tensor(apply))
    assert rec.sizes and max(rec.sizes) <= 1, rec.sizes  # only the 0-d momentum / weight
    for n, p in model.teacher.named_parameters():
        if apply:  # one fused multiply-add: within fp32 rounding of the two-rounding formula
            torch.testing.assert_close(p, 0.9 * before_t[n] + 0.1 * student[n], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, before_t[n]), n  # a skipped step leaves the teacher bit for bit


def test_same_seed_same_loss_and_self_sampled_masks():
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny_ibot(mask_shape="rand")
        g, loc, _ = _views()
        torch.manual_seed(4)
        losses.append(model(global_views=g, local_views=loc).loss.item())
    assert losses[0] == losses[1]


def _loop_cls_loss(student_logits, teacher_probs, student_temp=0.1):
    """Official CLS term from (V, B, K) student logits and (G, B, K) teacher targets, one pair at a time."""
    total, n = 0.0, 0
    for q in range(teacher_probs.shape[0]):
        for v in range(student_logits.shape[0]):
            if v != q:
                total = (
                    total
                    + (-(teacher_probs[q] * torch.log_softmax(student_logits[v] / student_temp, -1)).sum(-1)).mean()
                )
                n += 1
    return total / n


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_centering_option_sets_the_teacher_targets(centering):
    torch.manual_seed(0)
    g, loc, masks = _views()
    model = tiny_ibot(drop_path_rate=0.0, centering=centering, cls_loss_weight=0.6)
    with torch.no_grad():
        model.cls_center.center.normal_(0, 0.1)
    center = model.cls_center.center.clone()
    out = model(global_views=g, local_views=loc, masks=masks, epoch=0)
    t = out.teacher_logits  # (G, B, K)
    if centering == "center":
        targets = torch.softmax((t - center) / 0.04, -1)
        assert not torch.equal(model.cls_center.center, center)  # updated after the loss
    else:
        targets = ref_sinkhorn(t.reshape(-1, t.shape[-1]).double(), 0.04).float().reshape(t.shape)
        torch.testing.assert_close(model.cls_center.center, center, rtol=0, atol=0)  # unused, untouched
    expected = 0.6 * _loop_cls_loss(out.student_logits.detach(), targets)
    torch.testing.assert_close(out.loss_cls, expected, rtol=1e-5, atol=1e-6)


def test_patch_center_masked_averages_masked_tokens_only():
    torch.manual_seed(0)
    g, loc, masks = _views()
    outs, centers = {}, {}
    for mode in ("all", "masked"):
        torch.manual_seed(0)
        model = tiny_ibot(drop_path_rate=0.0, patch_center=mode, center_momentum=0.8)
        outs[mode] = model(global_views=g, local_views=loc, masks=masks)
        centers[mode] = model.patch_center_ema.center.clone()
    with torch.no_grad():  # teacher patch logits of every token, as the official head computes them
        _, t_patch_tok = model.teacher["backbone"](torch.cat(g))
        t_patch = model.teacher["head"].patch_prototypes(model.teacher["head"].project(t_patch_tok))  # (G*B, N, K)
    flat = masks.reshape(masks.shape[0], -1)
    torch.testing.assert_close(centers["masked"], 0.2 * t_patch[flat].mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(centers["all"], 0.2 * t_patch.mean(1).mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(centers["masked"], centers["all"], rtol=1e-3, atol=1e-4)
    # the first step uses the zero-initialised centers in both modes: same loss
    torch.testing.assert_close(outs["masked"].loss, outs["all"].loss)


def test_koleo_option_adds_the_koleo_of_the_student_global_cls():
    torch.manual_seed(0)
    g, loc, masks = _views()
    torch.manual_seed(0)
    plain = tiny_ibot(drop_path_rate=0.0)(global_views=g, local_views=loc, masks=masks)
    torch.manual_seed(0)
    model = tiny_ibot(drop_path_rate=0.0, koleo_loss_weight=0.3)
    out = model(global_views=g, local_views=loc, masks=MaskBatch.from_masks(masks, 2))
    with torch.no_grad():
        s_cls, _ = model.student["backbone"](torch.cat(g), mask=masks.reshape(masks.shape[0], -1))
    expected = 0.3 * torch.stack([koleo_loss(c) for c in s_cls.split(4)]).mean()
    torch.testing.assert_close(out.loss_koleo, expected)
    assert out.loss_koleo.abs() > 1e-3
    torch.testing.assert_close(out.loss, out.loss_cls + out.loss_patch + out.loss_koleo)
    torch.testing.assert_close(out.loss_cls, plain.loss_cls)  # the other terms are unchanged
    torch.testing.assert_close(out.loss_patch, plain.loss_patch)
    out.loss.backward()
    assert model.student["backbone"].vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_dino_is_ibot_without_patch_loss():
    torch.manual_seed(0)
    model = tiny_ibot(DINO)
    assert model.student["backbone"].masked_embed is None
    g, loc, _ = _views()
    out = model(global_views=g, local_views=loc)
    assert out.loss_patch is None and out.student_logits.shape == (5, 4, 40)
    out.loss.backward()


def test_seed_api_names_and_defaults():
    params = inspect.signature(iBOT).parameters
    expected = {
        "encoder_name": "vit_small_patch16_224",
        "projector_hidden_dim": 2048,
        "projector_bottleneck_dim": 256,
        "n_cls_prototypes": 65536,
        "n_patch_prototypes": 8192,
        "mask_ratio": 0.3,
        "patch_loss_weight": 1.0,
        "temperature_student": 0.1,
        "temperature_teacher_warmup": 0.04,
        "temperature_teacher": 0.07,
        "warmup_epochs_temperature_teacher": 30,
        "ema_decay_start": 0.996,
        "ema_decay_end": 1.0,
        "image_size": 224,
        "pretrained": False,
    }
    assert list(params)[: len(expected)] == list(expected)
    assert {k: params[k].default for k in expected} == expected
    dino = inspect.signature(DINO).parameters
    assert dino["n_prototypes"].default == 65536 and dino["center_momentum"].default == 0.9


def test_bad_inputs_give_clear_errors():
    model = tiny_ibot()
    with pytest.raises(ValueError, match="needs global_views or images"):
        model()
    g, loc, masks = _views()
    with pytest.raises(ValueError, match="masks have shape"):
        model(global_views=g, masks=torch.zeros(8, 9, dtype=torch.bool))


def test_vit_tiny_224_with_local_crops_done_when():
    torch.manual_seed(0)
    model = iBOT("vit_tiny_patch16_224")
    g = [torch.randn(2, 3, 224, 224) for _ in range(2)]
    loc = [torch.randn(2, 3, 96, 96) for _ in range(4)]
    out = model(global_views=g, local_views=loc)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    assert out.embedding.shape == (4, 192)
    assert model(images=g[0]).embedding.shape == (2, 192)


def test_head_norm_is_one_module_reused_after_every_hidden_layer_as_official():
    """Official DINOHead appends the same norm module after each hidden layer (keys mlp.1 and mlp.4)."""
    model = tiny_ibot(head_norm="bn")
    head = model.student["head"]
    assert head.mlp[1] is head.mlp[4] and isinstance(head.mlp[1], torch.nn.BatchNorm1d)
    sd = head.state_dict()
    assert torch.equal(sd["mlp.1.weight"], sd["mlp.4.weight"]) and "mlp.4.running_mean" in sd
    assert model.train().teacher["head"].training and not model.teacher["backbone"].training


def test_masked_student_without_patch_loss_is_official_lambda2_zero():
    """``patch_loss_weight=0`` = official ``--lambda2 0`` by default (``--use_masked_im_modeling`` defaults
    to true): the CLS loss sees masked crops; ``masked_im_modeling=False`` is DINO's inputs."""
    torch.manual_seed(0)
    g, loc, masks = _views(n_local=2)
    official = tiny_ibot(drop_path_rate=0.0, patch_loss_weight=0.0)
    dino_like = tiny_ibot(drop_path_rate=0.0, patch_loss_weight=0.0, masked_im_modeling=False)
    assert official.student["backbone"].masked_embed is not None
    assert dino_like.student["backbone"].masked_embed is None and not dino_like.masked_im_modeling
    with torch.no_grad():
        official.student["backbone"].masked_embed.normal_()
        for name, p in dino_like.named_parameters():
            p.copy_(dict(official.named_parameters())[name])
    temps = (ref_teacher_temp_schedule(0.04, 0.07, 30, 100)[1],) * 2  # epoch 1, default CLS and patch schedules
    ref_cls, _, _, _ = _reference_loss(official, g, loc, masks, temps)  # before the step moves the centers
    out = official(global_views=g, local_views=loc, masks=masks, epoch=1)
    assert out.loss_patch is None
    torch.testing.assert_close(out.loss_cls, ref_cls, rtol=1e-5, atol=1e-5)
    unmasked = dino_like(global_views=g, local_views=loc, epoch=1)
    assert not torch.allclose(out.loss_cls, unmasked.loss_cls, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs masked student crops"):
        tiny_ibot(patch_loss_weight=1.0, masked_im_modeling=False)


SKIP_CASES = {
    "center_all_separate": dict(),
    "center_all_shared": dict(shared_head=True),
    "center_masked": dict(patch_center="masked"),
    "center_masked_shared": dict(patch_center="masked", shared_head=True),
    "sinkhorn": dict(centering="sinkhorn"),
    "lambda2_zero": dict(patch_loss_weight=0.0),
    "koleo": dict(koleo_loss_weight=0.3),
    "bn_head": dict(head_norm="bn"),
    "efficient_drop_path": dict(efficient=True),
    "no_masked_token": dict(empty_masks=True),
    "dino": dict(cls=DINO),
}


def _skip_step(kind, skip, seed=5):
    """One ``iBOT.step`` (loss, backward) of a model in training mode with drop path, ``skip_unread_tokens``
    on or off: the loss, the teacher targets, the student gradients and the step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    kw = dict(SKIP_CASES[kind])
    cls, efficient, empty = kw.pop("cls", None), kw.pop("efficient", False), kw.pop("empty_masks", False)
    torch.manual_seed(0)
    model = tiny_ibot(cls, drop_path_rate=0.4, skip_unread_tokens=skip, **kw).train()
    model.student["backbone"].efficient_drop_path = efficient
    with torch.no_grad():  # a teacher different from the student, non-zero centers
        model.cls_center.center.normal_(0, 0.1)
        model.patch_center_ema.center.normal_(0, 0.1)
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    g, loc, masks = _views()
    batch = model._views_batch(g, loc, None if cls is DINO else masks & ~empty, epoch=1)
    torch.manual_seed(seed)  # the drop-path draws
    with FlopCounterMode(display=False) as fc:
        out = model.step(batch, (0.05, 0.06))
        out.loss.backward()
    grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
    return out, grads, fc.get_total_flops()


@pytest.mark.parametrize("kind", list(SKIP_CASES))
def test_skipping_unread_tokens_keeps_the_step_loss_and_gradients(kind):
    """Issue 27 item 1: the last block computes only the tokens the losses read (``skip_unread_tokens``,
    the default); the step's loss, targets and gradients are those of the full computation."""
    out, grads, flops = _skip_step(kind, True)
    ref, ref_grads, ref_flops = _skip_step(kind, False)
    for k in ("loss", "loss_cls", "loss_patch", "loss_koleo", "teacher_probs", "student_logits"):
        if ref.get(k) is None:
            assert out.get(k) is None, k
        else:
            torch.testing.assert_close(out[k].detach(), ref[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    t, rt = out.targets, ref.targets
    for k in ("patch_probs", "patch_mean_logits"):
        a, b = getattr(t, k), getattr(rt, k)
        assert (a is None) == (b is None), k
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert set(grads) == set(ref_grads) and grads
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    if kind == "bn_head":  # the head's statistics read every token: nothing is skipped
        assert flops == ref_flops
    else:
        assert flops < 0.97 * ref_flops, (flops, ref_flops)


def test_what_each_branch_reads():
    g, loc, masks = _views()
    model = tiny_ibot()
    mb = MaskBatch.from_masks(masks, 2)
    assert model.reads("teacher", mb) is None  # the official patch center: every token
    assert torch.equal(model.reads("student", mb), mb.index)
    model.patch_center = "masked"
    assert torch.equal(model.reads("teacher", mb), mb.index)
    model.skip_unread_tokens = False
    assert model.reads("student", mb) is None and model.reads("teacher", mb) is None
    dino = tiny_ibot(DINO)
    assert dino.reads("student", None).numel() == 0 and dino.reads("teacher", None).numel() == 0
    assert tiny_ibot(head_norm="bn").reads("student", mb) is None
