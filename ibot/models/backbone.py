"""Mask-aware Vision Transformer backbone over any timm ViT.

The official iBOT ViT (``models/vision_transformer.py`` in bytedance/ibot) differs from a stock
timm ViT in three places, all reproduced here while timm keeps the blocks (fused SDPA attention,
weight layout, ``timm.create_model`` compatibility):

* a learnable mask token ``masked_embed`` (1, D) replaces the patch embeddings of masked positions
  *after* the patch convolution and *before* the class token and position embeddings are added;
* position embeddings are resized for other crop sizes with the official bicubic
  ``scale_factor = (grid + 0.1) / sqrt(N)`` formula (not timm's ``size=`` resampling, which gives
  different numbers);
* the forward returns the final-norm class token and patch tokens separately.

Shapes: B batch, C channels, H/W image size, h/w token grid, N = h*w patch tokens, D width.
"""

from __future__ import annotations

import copy
import functools
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot.grid import grid_size, mask_cell


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize a (1, 1+N, D) class+patch position embedding to a grid_h x grid_w patch grid.

    Follows the official formula: bicubic ``F.interpolate`` with
    ``scale_factor = ((grid + 0.1) / sqrt(N))`` (align_corners False, no antialias), so that a
    96-px local crop on a 224-px ViT/16 gets exactly the official numbers. Returns the input
    unchanged when the grid already matches.
    """
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding has {n} patch positions, which is not a square grid")
    if grid_h == side and grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
        mode="bicubic",
        align_corners=False,
    ).to(pos_embed.dtype)
    if patch_pos.shape[-2:] != (grid_h, grid_w):  # pragma: no cover - guarded by the +0.1
        raise RuntimeError(f"interpolated grid {tuple(patch_pos.shape[-2:])} != {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


def create_vit(
    name: str = "vit_small_patch16_224",
    *,
    patch_size: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a timm ViT (or Swin) without classifier. ``None`` arguments keep the timm default."""
    import timm

    extra = {"patch_size": patch_size, "img_size": img_size, "in_chans": in_chans}
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    if name.startswith("swin"):
        kwargs.setdefault("strict_img_size", False)  # any crop size: local crops, other resolutions
        kwargs.setdefault("norm_layer", functools.partial(nn.LayerNorm, eps=1e-6))  # official Swin eps
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"unknown timm model {name!r}; some known names: {close}") from err
        raise
    except TypeError as err:  # a CNN takes no ViT geometry: drop it (its pooled features work at any size)
        geometry = [k for k in ("img_size", "patch_size") if f"'{k}'" in str(err)]
        if not geometry:
            raise ValueError(f"timm model {name!r} rejects an argument: {err}") from err
        kwargs = {k: v for k, v in kwargs.items() if k not in ("img_size", "patch_size")}
        try:
            return timm.create_model(
                name, pretrained=pretrained, num_classes=0, drop_path_rate=drop_path_rate, **kwargs
            )
        except TypeError as err2:
            raise ValueError(f"timm model {name!r} rejects an argument: {err2}") from err2


class MaskedViT(nn.Module):
    """A timm ``VisionTransformer`` with an iBOT mask token and multi-resolution position embeddings.

    ``patch_size`` is the patch-embedding size; ``mask_cell`` (:func:`ibot.grid.mask_cell`)
    the pixels per mask position, the patch itself; :meth:`grid_size` the mask grid of an image.

    Args:
        vit: a timm VisionTransformer with a class token and absolute position embeddings.
        masked_im_modeling: create the learnable ``masked_embed`` token (students only).
    """

    def __init__(self, vit: nn.Module, masked_im_modeling: bool = True) -> None:
        super().__init__()
        for attr in ("patch_embed", "blocks", "norm", "pos_embed"):
            if not hasattr(vit, attr):
                raise TypeError(f"MaskedViT needs a timm VisionTransformer; {type(vit).__name__} has no {attr!r}")
        if getattr(vit, "cls_token", None) is None or getattr(vit, "no_embed_class", False):
            raise TypeError("MaskedViT needs a ViT with a class token whose position is embedded")
        if getattr(vit, "num_reg_tokens", 0):
            raise TypeError("ViTs with register tokens are not supported")
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.mask_cell: int = mask_cell("vit", self.patch_size)
        self.in_chans: int = vit.patch_embed.proj.in_channels
        self.masked_embed = nn.Parameter(torch.zeros(1, self.embed_dim)) if masked_im_modeling else None
        self.efficient_drop_path = False  # (also clears a copied student's block forwards)

    @property
    def efficient_drop_path(self) -> bool:
        """DINOv2-style stochastic depth in training: each block's residual branches run on the samples
        it keeps only (:func:`_subset_drop_path_block`). Set on the blocks' own forward, so a block
        called through its module (activation checkpointing, per-block ``compile()``, hooks) runs it."""
        return self._efficient_drop_path

    @efficient_drop_path.setter
    def efficient_drop_path(self, on: bool) -> None:
        self._efficient_drop_path = bool(on)
        for blk in self.vit.blocks:
            if on:
                blk.forward = types.MethodType(_efficient_block_forward, blk)
            else:
                blk.__dict__.pop("forward", None)

    @property
    def timm_model(self) -> nn.Module:
        return self.vit

    @property
    def blocks(self) -> nn.Module:
        return self.vit.blocks

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) patch grid of an image, which is also its mask grid."""
        return grid_size(height, width, self.mask_cell)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images [+ (B, h, w) or (B, N) bool mask] -> (B, 1+N, D) input tokens."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        gh, gw = self.grid_size(x.shape[-2], x.shape[-1])
        pe = self.vit.patch_embed
        tokens = pe.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the h x w grid
        tokens = pe.norm(tokens)
        if mask is not None:
            if self.masked_embed is None:
                raise ValueError("this backbone was built without a mask token (teacher); do not pass a mask")
            mask = mask.reshape(b, -1)
            if mask.shape[1] != gh * gw:
                raise ValueError(f"mask has {mask.shape[1]} positions but the image has {gh}x{gw} patches")
            tokens = torch.where(mask.unsqueeze(-1), self.masked_embed.to(tokens.dtype), tokens)
        cls = self.vit.cls_token.expand(b, -1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(self.vit.pos_embed, gh, gw)
        tokens = self.vit.pos_drop(tokens)
        return self.vit.norm_pre(tokens)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer blocks, with activation checkpointing when the timm model has it enabled
        (each block through its module call: its per-block compile and efficient drop path apply)."""
        if getattr(self.vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for blk in self.vit.blocks:
                tokens = checkpoint(blk, tokens, use_reentrant=False)
            return tokens
        return self.vit.blocks(tokens)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> final-norm class token (B, D) and patch tokens (B, N, D)."""
        tokens = self.vit.norm(self.run_blocks(self.prepare_tokens(x, mask)))
        return tokens[:, 0], tokens[:, 1:]

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> final-norm class token (B, D): the features used by k-NN."""
        return self(x)[0]  # through __call__, so FSDP2 hooks run

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-norm tokens (B, 1+N, D) of the last ``n`` blocks, as the official helper."""
        tokens = self.prepare_tokens(x)
        out = []
        depth = len(self.vit.blocks)
        for i, blk in enumerate(self.vit.blocks):
            tokens = blk(tokens)
            if i >= depth - n:
                out.append(self.vit.norm(tokens))
        return out

    def last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention (B, heads, 1+N, 1+N) of the last block, computed explicitly."""
        tokens = self.prepare_tokens(x)
        for blk in self.vit.blocks[:-1]:
            tokens = blk(tokens)
        blk = self.vit.blocks[-1]
        attn = blk.attn
        y = blk.norm1(tokens)
        b, n, d = y.shape
        qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _subset_drop_path_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm Block whose residual branches run only on the samples stochastic depth keeps.

    With drop rate p, ``max(1, int(B * (1 - p)))`` random samples get each branch, scaled by
    ``B / kept`` and added back with ``index_add``; the others skip it (DINOv2's efficient stochastic
    depth). Same expectation as per-sample drop-path, about p times fewer FLOPs in the branches.
    """
    b = x.shape[0]
    for norm, branch, ls, dp in (
        (blk.norm1, blk.attn, blk.ls1, blk.drop_path1),
        (blk.norm2, blk.mlp, blk.ls2, blk.drop_path2),
    ):
        p = float(getattr(dp, "drop_prob", 0.0))
        if p <= 0.0:
            x = x + ls(branch(norm(x)))
            continue
        keep = max(1, int(b * (1 - p)))
        idx = torch.randperm(b, device=x.device)[:keep]
        res = ls(branch(norm(x[idx])))
        x = torch.index_add(x, 0, idx, res.to(x.dtype), alpha=b / keep)
    return x


def _efficient_block_forward(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's forward with :attr:`MaskedViT.efficient_drop_path`: the kept-samples branches in
    training, the block's own forward otherwise."""
    if blk.training:
        return _subset_drop_path_block(blk, x)
    return type(blk).forward(blk, x)


def _without_drop_path(module: nn.Module) -> nn.Module:
    from timm.layers import DropPath

    for name, child in module.named_children():
        if isinstance(child, DropPath):
            setattr(module, name, nn.Identity())
        else:
            _without_drop_path(child)
    return module


def wrap_backbone(model: nn.Module, masked_im_modeling: bool = True) -> nn.Module:
    """The iBOT wrapper of a timm model: :class:`MaskedSwin` for a Swin, :class:`MaskedViT` for a ViT
    with a class token, :class:`ibot.models.pooled.PooledBackbone` (pooled features, DINO only) otherwise."""
    from ibot.models.pooled import PooledBackbone
    from ibot.models.swin import MaskedSwin, is_swin

    if is_swin(model):
        return MaskedSwin(model, masked_im_modeling)
    is_vit = all(hasattr(model, a) for a in ("patch_embed", "blocks", "norm", "pos_embed"))
    has_cls = getattr(model, "cls_token", None) is not None and not getattr(model, "no_embed_class", False)
    if is_vit and has_cls and not getattr(model, "num_reg_tokens", 0):
        return MaskedViT(model, masked_im_modeling)
    return PooledBackbone(model, masked_im_modeling)


def make_teacher_backbone(student: nn.Module) -> nn.Module:
    """A copy of the student with no mask token and no drop-path, as the official teacher."""
    model = _without_drop_path(copy.deepcopy(student.timm_model))
    teacher = type(student)(model, masked_im_modeling=False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
