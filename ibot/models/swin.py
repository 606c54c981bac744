"""Mask-aware Swin Transformer backbone over timm's ``SwinTransformer`` (official iBOT Swin-T).

The official iBOT Swin (``models/swin_transformer.py`` in bytedance/ibot) differs from a plain
Swin in three places, reproduced here while timm keeps the stages:

* masks are drawn on a coarse *prediction grid* whose cell (``mask_cell``,
  :func:`ibot.grid.mask_cell`) is ``patch_size * 2 ** (stages - 1)`` pixels (official
  ``pred_size = patch_size * 8``: 32 px, a 7 x 7 grid at 224 px) and expanded with
  ``repeat_interleave`` to the patch-embedding grid, where the learnable ``masked_embed`` (1, C0)
  replaces the embeddings of masked positions (after the patch-embedding norm);
* the "class token" is the average pool of the final-norm tokens of the last stage;
* the patch tokens are those final-stage tokens, one per prediction cell, so the masked-patch loss
  compares the same cells the mask was drawn on;
* a feature map that is not a whole number of windows (a 96-px local crop: 24 x 24 tokens, window 7)
  is zero-padded *before* the cyclic shift (timm shifts first, then pads, which gives different
  numbers), and LayerNorm uses eps 1e-6 (timm's Swin default is 1e-5). Blocks therefore run through
  :func:`swin_block` here rather than timm's ``forward``; the weights and their names are timm's.

Any input size divisible by the patch size runs, so local crops work.

Shapes: B batch, H/W image size, h/w prediction grid, N = h*w final tokens, D final width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ibot.grid import grid_size, mask_cell


def is_swin(module_or_name) -> bool:
    """True for a timm SwinTransformer instance or a timm Swin model name."""
    if isinstance(module_or_name, str):
        return module_or_name.startswith("swin")
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(module_or_name, SwinTransformer)


def window_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention of a timm ``SwinTransformerBlock`` on (B, H, W, C), official order.

    Pad to whole windows, then roll by the shift, attend within windows (with the shifted-window
    region mask built for the padded grid), roll back and crop. Padded positions are zeros that take
    part in attention, as in the official code.
    """
    from timm.models.swin_transformer import window_partition, window_reverse

    _, h, w, c = x.shape
    wh, ww = blk.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = x.shape[1], x.shape[2]
    shift = tuple(blk.shift_size)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mask = blk.get_attn_mask(x) if any(shift) else None
    windows = window_partition(x, blk.window_size).view(-1, wh * ww, c)
    out = blk.attn(windows, mask=mask).view(-1, wh, ww, c)
    x = window_reverse(out, blk.window_size, hp, wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w].contiguous()


def swin_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One timm ``SwinTransformerBlock`` on (B, H, W, C) with :func:`window_attention`."""
    b, h, w, c = x.shape
    x = x + blk.drop_path1(window_attention(blk, blk.norm1(x)))
    x = x.reshape(b, -1, c)
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    return x.reshape(b, h, w, c)


class MaskedSwin(nn.Module):
    """A timm ``SwinTransformer`` with an iBOT mask token, average-pooled "CLS" and final tokens.

    ``patch_size`` is the patch-embedding size (as :class:`ibot.models.MaskedViT`'s); ``mask_cell`` the
    pixels per mask position, a final-stage cell (``patch_size * 2 ** (stages - 1)``).

    The last-block skip of :class:`ibot.models.MaskedViT` (``forward(rows=)``) does not apply: the
    "CLS" pools every final token, so every token of the last block is read (:meth:`ibot.iBOT.reads`
    gives None for a Swin and its forward takes no ``rows``).

    Args:
        swin: a timm SwinTransformer (build it with ``strict_img_size=False`` for multi-crop).
        masked_im_modeling: create the learnable ``masked_embed`` token (students only).
    """

    def __init__(self, swin: nn.Module, masked_im_modeling: bool = True) -> None:
        super().__init__()
        if not is_swin(swin):
            raise TypeError(f"MaskedSwin needs a timm SwinTransformer, got {type(swin).__name__}")
        self.swin = swin
        self.embed_dim: int = swin.num_features
        self.patch_size: int = swin.patch_embed.patch_size[0]
        self.mask_cell: int = mask_cell("swin", self.patch_size, len(swin.layers))  # prediction cell
        self.in_chans: int = swin.patch_embed.proj.in_channels
        width0 = swin.patch_embed.proj.out_channels
        self.masked_embed = nn.Parameter(torch.zeros(1, width0)) if masked_im_modeling else None
        self.efficient_drop_path = False  # not used by Swin (kept for the trainer's uniform interface)

    @property
    def timm_model(self) -> nn.Module:
        return self.swin

    @property
    def blocks(self) -> list[nn.Module]:
        return [blk for stage in self.swin.layers for blk in stage.blocks]

    @property
    def num_heads(self) -> int:
        return self.swin.layers[-1].blocks[0].attn.num_heads

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The prediction grid (h, w) of an image: one cell per final-stage token (the mask grid)."""
        note = f" (patch {self.patch_size} x 2^{len(self.swin.layers) - 1}); masked crops need whole cells"
        return grid_size(height, width, self.mask_cell, "the Swin prediction cell", note)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images [+ (B, h, w) or (B, N) bool mask on the prediction grid] -> (B, H0, W0, C0)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not divisible by the patch size {p}")
        tokens = self.swin.patch_embed(x)  # (B, H0, W0, C0), patch-embedding norm applied
        if mask is not None:
            if self.masked_embed is None:
                raise ValueError("this backbone was built without a mask token (teacher); do not pass a mask")
            gh, gw = self.grid_size(x.shape[-2], x.shape[-1])
            b = x.shape[0]
            mask = mask.reshape(b, -1)
            if mask.shape[1] != gh * gw:
                raise ValueError(f"mask has {mask.shape[1]} positions but the prediction grid is {gh}x{gw}")
            sh, sw = tokens.shape[1] // gh, tokens.shape[2] // gw
            mask = mask.reshape(b, gh, gw).repeat_interleave(sh, 1).repeat_interleave(sw, 2)
            tokens = torch.where(mask.unsqueeze(-1), self.masked_embed.to(tokens.dtype), tokens)
        return tokens

    def run_blocks(self, tokens: torch.Tensor, each=None) -> torch.Tensor:
        """All stages on (B, H0, W0, C0) tokens; ``each(stage_index, tokens)`` sees every block output."""
        for i, stage in enumerate(self.swin.layers):
            tokens = stage.downsample(tokens)
            ckpt = getattr(stage, "grad_checkpointing", False) and torch.is_grad_enabled()
            for blk in stage.blocks:
                tokens = checkpoint(swin_block, blk, tokens, use_reentrant=False) if ckpt else swin_block(blk, tokens)
                if each is not None:
                    each(i, tokens)
        return tokens

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> average-pooled final tokens (B, D) and final tokens (B, N, D)."""
        tokens = self.swin.norm(self.run_blocks(self.prepare_tokens(x, mask)))  # (B, h, w, D)
        tokens = tokens.flatten(1, 2)
        return tokens.mean(1), tokens

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> average-pooled final-norm tokens (B, D): the features used by k-NN."""
        return self(x)[0]  # through __call__, so FSDP2 hooks run

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """``cat([avgpool, tokens])`` (B, 1+N_i, D_i) of the last ``n`` blocks, as the official helper.

        The final norm is applied to blocks of the last stage only (official behaviour); earlier
        blocks are returned as they are.
        """
        total = sum(len(stage.blocks) for stage in self.swin.layers)
        last_stage = len(self.swin.layers) - 1
        out: list[torch.Tensor] = []
        seen = [0]

        def collect(stage: int, tokens: torch.Tensor) -> None:
            seen[0] += 1
            if seen[0] > total - n:
                t = (self.swin.norm(tokens) if stage == last_stage else tokens).flatten(1, 2)
                out.append(torch.cat([t.mean(1, keepdim=True), t], dim=1))

        self.run_blocks(self.prepare_tokens(x), each=collect)
        return out

    def last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "attention maps need a ViT class token; a Swin backbone has shifted-window attention and an "
            "average-pooled output instead. Use `ibot viz patterns` or `ibot viz correspond` for Swin."
        )
