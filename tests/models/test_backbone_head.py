import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from ibot.models import MaskedViT, WeightNormLinear, create_vit, iBOTHead, interpolate_pos_embed, make_teacher_backbone


def test_pos_embed_interpolation_matches_official_formula_for_96px():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = interpolate_pos_embed(pos, 6, 6)
    patch = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(patch, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic")  # official call
    ref = ref.permute(0, 2, 3, 1).reshape(1, 36, 8)
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, 1:], ref)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    assert interpolate_pos_embed(pos, 14, 14) is pos
    # differs from size-based resampling: the formula matters
    by_size = F.interpolate(patch, size=(6, 6), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 36, 8)
    assert not torch.allclose(out[:, 1:], by_size)


def test_mask_token_replaces_patch_embedding_before_pos_embed():
    vit = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, **TINY))
    with torch.no_grad():
        vit.masked_embed.copy_(torch.randn(1, 48))
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    tok = vit.prepare_tokens(x, mask)
    plain = vit.prepare_tokens(x)
    pos = vit.vit.pos_embed[0]
    idx = 1 + 1 * 4 + 2  # row-major, after the class token
    torch.testing.assert_close(tok[0, idx], vit.masked_embed[0] + pos[idx])
    keep = torch.ones(17, dtype=torch.bool)
    keep[idx] = False
    torch.testing.assert_close(tok[0, keep], plain[0, keep])
    torch.testing.assert_close(tok[1], plain[1])


def test_backbone_shapes_any_crop_size_and_errors():
    vit = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, **TINY))
    cls, patches = vit(torch.randn(3, 3, 16, 16))
    assert cls.shape == (3, 48) and patches.shape == (3, 4, 48)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        vit(torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="expected images"):
        vit(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="mask has"):
        vit(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 9, dtype=torch.bool))


def test_teacher_has_no_mask_token_and_no_drop_path():
    student = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.5, **TINY))
    teacher = make_teacher_backbone(student)
    assert teacher.masked_embed is None
    teacher.train()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x)[0], teacher(x)[0])  # deterministic: no drop-path
    with pytest.raises(ValueError, match="without a mask token"):
        teacher(x, mask=torch.zeros(2, 16, dtype=torch.bool))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_attention_map_matches_fused_block():
    vit = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, **TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    attn = vit.last_selfattention(x)
    assert attn.shape == (2, 2, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 17))
    # the explicit map, applied to the values, gives the fused (SDPA) attention output of the last block
    blk = vit.blocks[-1]
    with torch.no_grad():
        tokens = vit.blocks[:-1](vit.prepare_tokens(x))
        y = blk.norm1(tokens)
        v = blk.attn.qkv(y).reshape(2, 17, 3, 2, 24)[:, :, 2].transpose(1, 2)  # (B, heads, N, head_dim)
        explicit = blk.attn.proj((attn @ v).transpose(1, 2).reshape(2, 17, 48))
        torch.testing.assert_close(explicit, blk.attn(y), rtol=1e-5, atol=1e-6)
        # and the block output the map belongs to is the one the forward computes
        out = vit.vit.norm(blk(tokens))
        torch.testing.assert_close(out[:, 0], vit(x)[0], rtol=1e-5, atol=1e-6)


def test_weight_norm_linear_matches_torch_weight_norm():
    wn = WeightNormLinear(8, 5, freeze_norm=False)
    with torch.no_grad():
        wn.weight_g.copy_(torch.rand(5, 1) + 0.5)
    ref = torch.nn.Linear(8, 5, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    ref.parametrizations.weight.original0.data.copy_(wn.weight_g.data)
    ref.parametrizations.weight.original1.data.copy_(wn.weight_v.data)
    x = torch.randn(3, 8)
    torch.testing.assert_close(wn(x), ref(x))
    assert not WeightNormLinear(8, 5).weight_g.requires_grad


def test_head_shared_and_separate():
    head = iBOTHead(16, 10, 7, hidden_dim=32, bottleneck_dim=8)
    cls, patch = head(torch.randn(2, 5, 16))
    assert cls.shape == (2, 10) and patch.shape == (2, 4, 7)
    shared = iBOTHead(16, 10, 10, shared_head=True, hidden_dim=32, bottleneck_dim=8, norm="bn")
    assert shared.patch_prototypes is shared.last_layer
    names = set(dict(shared.named_parameters()))
    assert "last_layer.weight_g" in names and "mlp.0.weight" in names
    z = shared.project(torch.randn(4, 16))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="unknown head norm"):
        iBOTHead(16, norm="gn")


def test_efficient_drop_path_and_checkpointing_keep_semantics():
    torch.manual_seed(0)
    vit = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.0, **TINY)).train()
    x = torch.randn(4, 3, 32, 32)
    ref = vit(x)[0]
    vit.efficient_drop_path = True  # rate 0: identical to the plain blocks
    torch.testing.assert_close(vit(x)[0], ref)
    vit.efficient_drop_path = False
    vit.vit.set_grad_checkpointing(True)
    out = vit(x)[0]
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert vit.vit.blocks[0].attn.qkv.weight.grad is not None
    dp = MaskedViT(create_vit("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.5, **TINY)).train()
    dp.efficient_drop_path = True
    y = dp(x)[0]
    assert torch.isfinite(y).all() and not torch.allclose(y, dp(x)[0])  # random subsets


def test_efficient_drop_path_composes_with_checkpointing_and_per_block_compile(monkeypatch):
    """Issue 25 item 5: model.efficient_drop_path=true called the blocks' parts directly, so
    run.grad_checkpointing checkpointed 0 of 2 blocks and per-block compile never ran. Each block now
    runs through its module call, with the efficient drop path as its forward."""
    import torch.utils.checkpoint as ckpt_mod

    from ibot.builders.model import build_model
    from ibot.config import build_config
    from ibot.models.backbone import _subset_drop_path_block
    from ibot.train.parallelize import parallelize

    cfg = build_config(
        "smoke", ["model.efficient_drop_path=true", "run.grad_checkpointing=true", "model.drop_path=0.5"]
    )
    model = build_model(cfg)
    parallelize(model, cfg, torch.device("cpu"))
    bb = model.student["backbone"].train()
    assert bb.efficient_drop_path and bb.timm_model.grad_checkpointing
    checkpointed, compiled, real = [], [], ckpt_mod.checkpoint
    monkeypatch.setattr(ckpt_mod, "checkpoint", lambda fn, *a, **k: checkpointed.append(fn) or real(fn, *a, **k))
    for blk in bb.blocks:  # what blk.compile() installs, with a spy instead of torch.compile
        blk._compiled_call_impl = lambda *a, _blk=blk, **k: compiled.append(_blk) or _blk._call_impl(*a, **k)
    tokens = bb.prepare_tokens(torch.randn(4, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size))
    torch.manual_seed(0)
    out = bb.run_blocks(tokens)
    assert checkpointed == list(bb.blocks) and compiled == list(bb.blocks)  # 2 of 2 each
    torch.manual_seed(0)
    ref = tokens
    for blk in bb.blocks:
        ref = _subset_drop_path_block(blk, ref)
    torch.testing.assert_close(out, ref)  # still the kept-samples drop path
    out.sum().backward()  # the checkpoint's recomputation draws the same kept samples
    assert bb.blocks[0].attn.qkv.weight.grad is not None
    bb.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.run_blocks(tokens), bb.vit.blocks(tokens))  # eval: the plain blocks
