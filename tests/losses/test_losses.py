import pytest
import torch
import torch.nn.functional as F
from reference import ref_ibot_loss, ref_sinkhorn, ref_teacher_temp_schedule

from ibot.grid import patch_loss_weights
from ibot.losses import (
    Center,
    cls_distillation_loss,
    ibot_criterion,
    ibot_loss,
    iBOTLoss,
    koleo_loss,
    masked_patch_loss,
    sinkhorn_knopp,
    teacher_temperature,
)


def _inputs(g, nl, b=4, n=9, k=16, kp=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen) * 3  # noqa: E731
    s_cls, s_patch = r(g * b, k), r(g * b, n, kp)
    t_cls, t_patch = r(g * b, k), r(g * b, n, kp)
    s_local = r(nl * b, k) if nl else None
    masks = [torch.rand(b, 3, 3, generator=gen) < 0.4 for _ in range(g + nl)]
    masks[0][0] = False  # an image with an empty mask
    masks[0][1] = True
    center, center2 = r(1, k) * 0.1, r(1, 1, kp) * 0.1
    return s_cls, s_patch, t_cls, t_patch, s_local, masks, center, center2


# CLS and patch settings all differ (temperatures, warm-up starts, center momenta), so a swap of any
# pair between the two branches changes the result.
TEMPS = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp2=0.06, teacher_temp2=0.1)
MOMENTA = dict(center_momentum=0.9, center_momentum2=0.7)


def _official_loss(g, nl, **kw):
    return iBOTLoss(16, 12, g, nl, *TEMPS.values(), 30, 100, **MOMENTA, **kw)


@pytest.mark.parametrize("g,nl", [(2, 10), (2, 0), (3, 4)])
@pytest.mark.parametrize("epoch,mim_start", [(7, 0), (12, 10)])
def test_official_signature_loss_matches_reference(g, nl, epoch, mim_start):
    s_cls, s_patch, t_cls, t_patch, s_local, masks, center, center2 = _inputs(g, nl)
    loss = _official_loss(g, nl, lambda1=0.7, lambda2=1.3, mim_start_epoch=mim_start)
    loss.cls_center.center.copy_(center)
    loss.patch_center.center.copy_(center2.reshape(1, -1))
    temp = ref_teacher_temp_schedule(0.04, 0.07, 30, 100)[epoch]
    temp2 = ref_teacher_temp_schedule(0.06, 0.1, 30, 100, mim_start)[epoch]
    assert temp != temp2
    out = loss((s_cls, s_patch), (t_cls, t_patch), s_local, masks, epoch)
    ref_cls, ref_patch, ref_c, ref_c2 = ref_ibot_loss(
        s_cls, s_patch, t_cls, t_patch, s_local, masks, center, center2, temp, temp2, g, 0.7, 1.3, 0.1, 0.9, 0.7
    )
    torch.testing.assert_close(out["cls"], ref_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["patch"], ref_patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], ref_cls + ref_patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.center, ref_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.center2, ref_c2, rtol=1e-5, atol=1e-6)


def test_loss_gradients_match_reference():
    s_cls, s_patch, t_cls, t_patch, s_local, masks, center, center2 = _inputs(2, 3)
    s_cls.requires_grad_(True)
    s_patch.requires_grad_(True)
    loss = _official_loss(2, 3)
    epoch = 20
    loss((s_cls, s_patch), (t_cls, t_patch), s_local, masks, epoch)["loss"].backward()
    g1, g2 = s_cls.grad.clone(), s_patch.grad.clone()
    s_cls.grad = s_patch.grad = None
    zc, zc2 = torch.zeros(1, 16), torch.zeros(1, 1, 12)
    temp, temp2 = 0.04 + 0.03 * 20 / 29, 0.06 + 0.04 * 20 / 29  # linspace(warm-up, final, 30)[20]
    ref = ref_ibot_loss(s_cls, s_patch, t_cls, t_patch, s_local, masks, zc, zc2, temp, temp2, 2)
    (ref[0] + ref[1]).backward()
    torch.testing.assert_close(g1, s_cls.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g2, s_patch.grad, rtol=1e-5, atol=1e-7)


def test_cls_loss_pairs_exclude_same_view_only():
    # teacher one-hot on view 0, student views all identical -> known closed form
    b, k = 3, 5
    s = torch.randn(4, b, k)
    t = F.softmax(torch.randn(2, b, k), -1)
    expected = 0.0
    for q in range(2):
        for v in range(4):
            if v != q:
                expected += (-(t[q] * F.log_softmax(s[v] / 0.1, -1)).sum(-1)).mean()
    torch.testing.assert_close(cls_distillation_loss(s, t), expected / 6)


def test_cls_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected student"):
        cls_distillation_loss(torch.randn(4, 3, 5), torch.randn(2, 3, 6))


def test_patch_weights_empty_mask_counts_in_mean():
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # G=1, B=2
    w = patch_loss_weights(masks, 1)
    assert w[0].tolist() == [0.25, 0.25, 0.0, 0.0]  # 1 / (2 masked * B=2)
    assert w[1].sum() == 0
    ce_s = torch.zeros(2, 3)
    t = torch.full((2, 3), 1 / 3)
    loss = masked_patch_loss(ce_s, t, w[0, :2])
    torch.testing.assert_close(loss, torch.log(torch.tensor(3.0)) / 2)  # mean over B=2 counts the empty image


def test_teacher_temperature_schedule_official_values():
    vals = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(40)]
    assert vals[0] == pytest.approx(0.04)
    assert vals[1] == pytest.approx(0.04103448, rel=1e-5)
    assert vals[29] == pytest.approx(0.07) and vals[39] == pytest.approx(0.07)
    shifted = [teacher_temperature(e, 0.04, 0.07, 30, start_epoch=50) for e in (0, 49, 50, 79, 80)]
    assert shifted == pytest.approx([0.04, 0.04, 0.04, 0.07, 0.07])
    assert teacher_temperature(0, 0.04, 0.07, 1) == pytest.approx(0.04)  # np.linspace(a, b, 1) == [a]


def test_sinkhorn_marginals_and_reference():
    logits = torch.randn(64, 10) * 4
    q = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    torch.testing.assert_close(q, ref_sinkhorn(logits.double(), 0.5).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(64), rtol=1e-5, atol=1e-5)
    converged = sinkhorn_knopp(logits, 0.5, n_iterations=200)  # prototype marginals equalise
    torch.testing.assert_close(converged.sum(0), torch.full((10,), 6.4), rtol=1e-3, atol=1e-3)


def test_sinkhorn_stable_for_large_logits():
    logits = torch.randn(32, 8) + 1e3  # exp(logits / 0.04) overflows without the max subtraction
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(32), rtol=1e-4, atol=1e-4)


def test_center_update_and_empty_update_keeps_center():
    c = Center(4, momentum=0.9)
    x = torch.arange(8.0).reshape(2, 4)
    c.update(x.sum(0), 2)
    torch.testing.assert_close(c.center, 0.1 * x.mean(0, keepdim=True))
    before = c.center.clone()
    c.update(torch.zeros(4), 0)
    torch.testing.assert_close(c.center, before)


def test_koleo_guards_and_value():
    x = torch.randn(1, 8, requires_grad=True)
    assert koleo_loss(x).item() == 0.0
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -torch.log(torch.tensor(2.0).sqrt() + 1e-8)
    torch.testing.assert_close(koleo_loss(pts), expected)


def test_ibot_loss_state_uses_the_official_center_keys_and_shapes():
    """The official ``restart_from_checkpoint`` loads ``ibot_loss`` with strict=False: keys ``center``, ``center2``."""
    kw = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp2=0.04, teacher_temp2=0.07)
    loss = iBOTLoss(5, 7, 2, 0, warmup_teacher_temp_epochs=1, nepochs=2, **kw)
    loss.cls_center.center.copy_(torch.arange(5.0).reshape(1, 5))
    loss.patch_center.center.copy_(torch.arange(7.0).reshape(1, 7) + 10)
    sd = loss.state_dict()
    assert set(sd) == {"center", "center2"}
    assert sd["center"].shape == (1, 5) and sd["center2"].shape == (1, 1, 7)
    official = {"center": torch.full((1, 5), 2.0), "center2": torch.full((1, 1, 7), 3.0)}
    fresh = iBOTLoss(5, 7, 2, 0, warmup_teacher_temp_epochs=1, nepochs=2, **kw)
    result = fresh.load_state_dict(official, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh.center, official["center"])
    torch.testing.assert_close(fresh.center2, official["center2"])
    fresh.load_state_dict(sd)  # round trip, strict
    torch.testing.assert_close(fresh.center2, loss.center2)
    inner = {"cls_center.center": torch.ones(1, 5), "patch_center.center": torch.ones(1, 7)}
    fresh.load_state_dict(inner)  # the previous ibot layout still loads
    torch.testing.assert_close(fresh.center, torch.ones(1, 5))


def test_criterion_returns_the_weighted_terms_and_their_sum():
    gen = torch.Generator().manual_seed(0)
    s_cls, t = torch.randn(4, 3, 8, generator=gen), torch.softmax(torch.randn(2, 3, 8, generator=gen), -1)
    s_p, t_p = torch.randn(5, 6, generator=gen), torch.softmax(torch.randn(5, 6, generator=gen), -1)
    w, feats = torch.rand(5, generator=gen), torch.randn(2, 3, 4, generator=gen)
    kw = dict(cls_weight=0.5, patch_weight=2.0, koleo_features=feats, koleo_weight=0.1)
    out = ibot_criterion(s_cls, t, s_p, t_p, w, **kw)
    assert set(out) == {"loss", "loss_cls", "loss_patch", "loss_koleo"}
    torch.testing.assert_close(out["loss_cls"], 0.5 * cls_distillation_loss(s_cls, t))
    torch.testing.assert_close(out["loss_patch"], 2.0 * masked_patch_loss(s_p, t_p, w))
    torch.testing.assert_close(out["loss_koleo"], 0.1 * (koleo_loss(feats[0]) + koleo_loss(feats[1])) / 2)
    torch.testing.assert_close(out["loss"], out["loss_cls"] + out["loss_patch"] + out["loss_koleo"])
    cls_only = ibot_criterion(s_cls, t)
    assert cls_only["loss_patch"] is None and cls_only["loss_koleo"] is None


def test_official_loss_weights_are_the_masks_weights():
    masks = torch.rand(6, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    masks[0] = False
    # iBOTLoss (every token) and the collate (MaskBatch) weigh tokens with the same function
    assert ibot_loss.patch_loss_weights is patch_loss_weights
    assert torch.equal(ibot_loss.patch_loss_weights(masks, 2), patch_loss_weights(masks, 2))
