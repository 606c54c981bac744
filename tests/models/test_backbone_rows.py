"""``MaskedViT.forward(..., rows=)``: the last block computes only the rows read (issue 27 item 1).

Every test compares the skipped forward with the full forward's selected rows, under the same seed
(so stochastic depth draws the same samples), and the gradients of a loss over those rows.
"""

import pytest
import torch
from conftest import TINY
from torch.utils.flop_counter import FlopCounterMode

from ibot.models import MaskedViT, create_vit, make_teacher_backbone

B, N, D = 5, 16, 48  # 32 px images, patch 8: a 4 x 4 grid
# image 0: three rows (one twice), image 1: none, image 2: one, image 3: every token, image 4: one
ROWS = torch.tensor([0, 5, 15, 5, 2 * N + 7] + [3 * N + j for j in range(N)] + [4 * N + 1])
NONE = torch.zeros(0, dtype=torch.long)


def _vit(drop_path=0.0, efficient=False, **kw):
    torch.manual_seed(0)
    vit = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, drop_path_rate=drop_path, **{**TINY, **kw}))
    vit.efficient_drop_path = efficient
    with torch.no_grad():  # a non-zero mask token
        vit.masked_embed.normal_()
    return vit


def _inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=gen)
    mask = torch.rand(B, N, generator=gen) < 0.3
    return x, mask


def _run(vit, x, mask, rows, seed, full):
    """(cls, rows) of the skipped forward or of the full forward (``rows`` selected afterwards), the
    gradients of a fixed random loss over them, and the next random number."""
    vit.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    if full:
        cls, patches = vit(x, mask=mask)
        out = patches.reshape(-1, D)[rows]
    else:
        cls, out = vit(x, mask=mask, rows=rows)
    after = torch.rand(())  # the random stream is left where the full forward leaves it
    gen = torch.Generator().manual_seed(7)
    w_cls, w_out = torch.randn(cls.shape, generator=gen), torch.randn(out.shape, generator=gen)
    loss = (cls * w_cls).mean() + (out * w_out).sum() / 100
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    return cls.detach(), out.detach(), x.grad, grads, after


def _assert_same(vit, rows, seed=3, mask=None):
    x, m0 = _inputs()
    mask = m0 if mask is None else mask
    cls, out, gx, grads, after = _run(vit, x, mask, rows, seed, full=False)
    ref_cls, ref_out, ref_gx, ref_grads, ref_after = _run(vit, x, mask, rows, seed, full=True)
    assert out.shape == (rows.numel(), D) and cls.shape == (B, D)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads) == {n for n, p in vit.named_parameters() if p.requires_grad}
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)
    assert after == ref_after
    return cls, out


CASES = {
    "eval": dict(kw={}, train=False),
    "drop_path": dict(kw={"drop_path": 0.5}, train=True),
    "efficient_drop_path": dict(kw={"drop_path": 0.5, "efficient": True}, train=True),
    "layer_scale": dict(kw={"drop_path": 0.3, "init_values": 0.5}, train=True),
    "qk_norm": dict(kw={"qk_norm": True, "drop_path": 0.3}, train=True),
    "efficient_eval": dict(kw={"drop_path": 0.5, "efficient": True}, train=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["masked", "cls_only"])
def test_rows_equal_the_full_forward_values_and_gradients(case, which):
    vit = _vit(**CASES[case]["kw"]).train(CASES[case]["train"])
    _assert_same(vit, ROWS if which == "masked" else NONE)


@pytest.mark.parametrize("efficient", [False, True])
def test_drop_path_is_drawn_per_sample_and_the_seed_decides(efficient):
    """The comparisons above are not vacuous: stochastic depth changes the rows and another seed
    gives other rows (the skipped path draws per sample, as the full block)."""
    vit = _vit(drop_path=0.5, efficient=efficient)  # the last of 2 blocks drops with p = 0.5
    x, mask = _inputs()
    vit.eval()
    with torch.no_grad():
        plain = vit(x, mask=mask, rows=ROWS)[1]
    vit.train()
    outs = []
    for seed in range(6):
        _, out = _assert_same(vit, ROWS, seed=seed)
        outs.append(out)
    assert any(not torch.allclose(o, plain) for o in outs)
    assert any(not torch.allclose(o, outs[0]) for o in outs[1:])


def test_no_masked_token_in_the_batch_and_a_teacher_backbone():
    vit = _vit(drop_path=0.2).train()
    _assert_same(vit, NONE, mask=torch.zeros(B, N, dtype=torch.bool))
    teacher = make_teacher_backbone(vit).train()
    x, _ = _inputs()
    with torch.no_grad():
        cls, out = teacher(x, rows=ROWS)
        ref_cls, ref = teacher(x)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref.reshape(-1, D)[ROWS], rtol=1e-6, atol=1e-6)


def test_unfused_attention():
    vit = _vit(drop_path=0.3).train()
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    _assert_same(vit, ROWS)


def _last_block_flops(vit, x, mask, rows):
    tokens = vit.prepare_tokens(x, mask)
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    blk = vit.blocks[-1]
    with FlopCounterMode(display=False) as fc:
        if rows is None:
            vit.vit.norm(blk(tokens))
        else:
            read = torch.cat([torch.arange(B) * (N + 1), rows + rows // N + 1])
            vit.vit.norm(blk(tokens, read=read))
    return fc.get_total_flops()


def test_the_last_block_skips_the_unread_rows():
    vit = _vit().eval()
    x, mask = _inputs()
    full = _last_block_flops(vit, x, mask, None)
    few = torch.tensor([1, 2 * N + 3])
    # read: 5 CLS + 2 rows of 85 tokens; left: qkv (3 of the 12 D^2 per token) and the scores
    assert _last_block_flops(vit, x, mask, few) < 0.45 * full
    assert _last_block_flops(vit, x, mask, NONE) < 0.45 * full


def test_dropout_in_training_falls_back_to_the_full_block():
    """Dropout draws per element over every token: the rows come from the full block (same values)."""
    vit = _vit(drop_path=0.2, proj_drop_rate=0.2).train()
    _assert_same(vit, ROWS)
    x, mask = _inputs()
    assert _last_block_flops(vit, x, mask, ROWS) == _last_block_flops(vit, x, mask, None)
    vit.eval()  # inactive dropout: the skip again
    assert _last_block_flops(vit, x, mask, ROWS) < 0.6 * _last_block_flops(vit, x, mask, None)


def test_activation_checkpointing_recomputes_the_same_rows(monkeypatch):
    import torch.utils.checkpoint as ckpt_mod

    calls, real = [], ckpt_mod.checkpoint
    monkeypatch.setattr(ckpt_mod, "checkpoint", lambda fn, *a, **k: calls.append(k) or real(fn, *a, **k))
    for efficient in (False, True):
        vit = _vit(drop_path=0.5, efficient=efficient).train()
        vit.vit.set_grad_checkpointing(True)
        calls.clear()
        _assert_same(vit, ROWS)
        assert len(calls) == 2 * len(vit.blocks) and "read" in calls[len(vit.blocks) - 1]  # checkpointed, rows too


def test_per_block_compile_runs_the_rows_path():
    vit = _vit(drop_path=0.0).train()
    for blk in vit.blocks:
        blk.compile(backend="eager")
    _assert_same(vit, ROWS)
    _assert_same(vit, NONE)


def test_rows_errors_and_an_installed_forward():
    vit = _vit().eval()
    x, mask = _inputs()
    with pytest.raises(ValueError, match="1-D long"):
        vit(x, rows=ROWS.int())
    vit.blocks[-1].forward = lambda t: type(vit.blocks[-1]).forward(vit.blocks[-1], t)  # someone else's forward
    _assert_same(vit, ROWS)  # the whole block, then the rows
