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

``MaskedViT.forward(x, mask, rows=)`` also skips the work nobody reads: the last block computes its
keys and values from every token but the rest only for the class tokens and the patch rows asked
for (the training step asks for the ones its losses read), with the same values and random draws.

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
        last = len(self.vit.blocks) - 1
        for i, blk in enumerate(self.vit.blocks):
            if on:
                blk.forward = types.MethodType(_efficient_block_forward, blk)
            elif i == last:  # the last block also takes ``read=`` (:meth:`forward` with ``rows``)
                blk.forward = types.MethodType(_read_rows_block_forward, blk)
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

    def run_blocks(self, tokens: torch.Tensor, read: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer blocks, with activation checkpointing when the timm model has it enabled
        (each block through its module call: its per-block compile, efficient drop path and FSDP2
        hooks apply).

        ``tokens`` (B, T, D). ``read`` None: the output tokens (B, T, D). ``read`` (Q,) long indices
        into the flattened (B*T) tokens: the last block computes only those rows (keys and values
        from every token) and the (Q, D) rows are returned (:func:`_read_rows_block`).
        """
        ckpt = getattr(self.vit, "grad_checkpointing", False) and torch.is_grad_enabled()
        if read is None and not ckpt:
            return self.vit.blocks(tokens)
        blocks = list(self.vit.blocks)
        if read is not None and not blocks:
            return tokens.flatten(0, 1)[read]
        for i, blk in enumerate(blocks):
            kw = {}
            if read is not None and i == len(blocks) - 1:
                if not _takes_read(blk):  # a forward installed by someone else: the whole block, then the rows
                    out = _checkpoint_call(blk, tokens) if ckpt else blk(tokens)
                    return out.flatten(0, 1)[read]
                kw = {"read": read}
            tokens = _checkpoint_call(blk, tokens, **kw) if ckpt else blk(tokens, **kw)
        return tokens

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm class token and patch tokens of (B, C, H, W) images [+ (B, h, w) or (B, N) bool mask].

        Args:
            x: (B, C, H, W) images.
            mask: (B, h, w) or (B, N) bool, True where the mask token replaces the patch (students).
            rows: which patch tokens are read. None: all of them. A (R,) long tensor of flat indices
                into the (B*N) patch tokens, image-major (``b * N + j``, as
                :attr:`ibot.data.masking.MaskBatch.index`; repeats allowed): only the class tokens and
                these rows leave the last block. An empty tensor (R = 0): the class tokens only
                (local crops, DINO).

        Returns:
            ``rows`` None: class tokens (B, D) and patch tokens (B, N, D). ``rows`` given: class tokens
            (B, D) and the R rows (R, D), in the order of ``rows``.

        With ``rows`` the last block computes keys and values from every token (they feed the
        attention of the read rows) but its queries, attention output, projection, residuals, MLP and
        the final norm only for the B + R read rows (:func:`_read_rows_block`): same values as the
        full forward's rows (stochastic depth included: same random draws), fewer FLOPs. It falls
        back to the full block, then the rows, where that cannot be done exactly (a block other than
        timm's ``Block`` with ``Attention``, dropout active in training, a forward installed by
        someone else).
        """
        tokens = self.prepare_tokens(x, mask)
        if rows is None:
            tokens = self.vit.norm(self.run_blocks(tokens))
            return tokens[:, 0], tokens[:, 1:]
        if rows.ndim != 1 or rows.dtype != torch.long:
            raise ValueError(f"rows must be a 1-D long tensor of flat patch indices, got {rows.dtype} {rows.shape}")
        b, t = tokens.shape[:2]
        rows = rows.to(tokens.device)
        # the class token of each image, then patch b * N + j at token b * (N + 1) + 1 + j
        read = torch.cat([torch.arange(b, device=tokens.device) * t, rows + rows // (t - 1) + 1])
        out = self.vit.norm(self.run_blocks(tokens, read))
        return out[:b], out[b:]

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


def _efficient_block_forward(blk: nn.Module, x: torch.Tensor, *args, read: torch.Tensor | None = None, **kwargs):
    """A block's forward with :attr:`MaskedViT.efficient_drop_path`: the kept-samples branches in
    training, the block's own forward otherwise; with ``read``, :func:`_read_rows_block`."""
    if read is not None:
        return _read_rows_block(blk, x, read, efficient=blk.training)
    if blk.training:
        return _subset_drop_path_block(blk, x)
    return type(blk).forward(blk, x, *args, **kwargs)


def _read_rows_block_forward(blk: nn.Module, x: torch.Tensor, *args, read: torch.Tensor | None = None, **kwargs):
    """The last block's forward: the block's own, or :func:`_read_rows_block` with ``read``."""
    if read is not None:
        return _read_rows_block(blk, x, read, efficient=False)
    return type(blk).forward(blk, x, *args, **kwargs)


def _takes_read(blk: nn.Module) -> bool:
    fn = getattr(blk.__dict__.get("forward"), "__func__", None)
    return fn is _read_rows_block_forward or fn is _efficient_block_forward


def _checkpoint_call(blk: nn.Module, *args, **kwargs):
    """``blk(*args, **kwargs)`` under non-reentrant activation checkpointing (the RNG state is
    restored for the recomputation: same drop-path draws)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(blk, *args, use_reentrant=False, **kwargs)


def _rows_exact(blk: nn.Module) -> bool:
    """Whether :func:`_read_rows_block` can compute ``blk``'s rows exactly: timm's ``Block`` with
    timm's ``Attention`` (subclasses that keep their forwards, as FSDP2's, included), drop path by
    timm's ``DropPath`` (or none), and no dropout active (its per-element draws cover every token)."""
    from timm.layers import DropPath
    from timm.models.vision_transformer import Attention, Block

    if type(blk).forward is not Block.forward or type(blk.attn).forward is not Attention.forward:
        return False
    if not all(isinstance(dp, (DropPath, nn.Identity)) for dp in (blk.drop_path1, blk.drop_path2)):
        return False
    return not (blk.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in blk.modules()))


def _attention_rows(attn: nn.Module, y: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` of normed tokens ``y`` (B, T, D) up to its output projection, for the (Q,)
    flat rows ``read``: (Q, attn_dim). Queries, keys and values come from the fused ``qkv`` of every
    token, as timm computes them (the attention of the unread queries is the part left to spare)."""
    b, t, _ = y.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(y).reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return o.transpose(1, 2).reshape(b * t, heads * head_dim)[read]


def _attention_out(attn: nn.Module, o: torch.Tensor, y_rows: torch.Tensor) -> torch.Tensor:
    """The rest of timm ``Attention`` on (Q, attn_dim) rows: norm, gate (from the normed inputs
    ``y_rows``), output projection, projection dropout (inactive: :func:`_rows_exact`)."""
    o = attn.norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(y_rows).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _drop_path_rows(dp: nn.Module, res: torch.Tensor, img: torch.Tensor, b: int) -> torch.Tensor:
    """timm ``DropPath`` of a (B, T, D) branch, applied to its (Q, D) rows of images ``img``: the same
    (B, 1, 1) per-sample draw as timm (so the same random stream), indexed per row."""
    p = float(getattr(dp, "drop_prob", 0.0))
    if p == 0.0 or not dp.training:
        return res
    keep_prob = 1 - p
    random_tensor = res.new_empty((b, 1, 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and dp.scale_by_keep:
        random_tensor.div_(keep_prob)
    return res * random_tensor.view(b, 1)[img]


def _kept_rows(b: int, p: float, img: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The kept samples of one branch of :func:`_subset_drop_path_block` (its ``randperm`` draw): their
    (kept,) indices, each sample's place among them (B,) (0 if dropped), whether each row's image is
    kept (Q,), and the residual scale B / kept."""
    keep = max(1, int(b * (1 - p)))
    idx = torch.randperm(b, device=device)[:keep]
    place = torch.zeros(b, dtype=torch.long, device=device).index_copy_(0, idx, torch.arange(keep, device=device))
    kept = torch.zeros(b, dtype=torch.bool, device=device).index_fill_(0, idx, True)
    return idx, place, kept[img], b / keep


def _read_rows_block(blk: nn.Module, x: torch.Tensor, read: torch.Tensor, efficient: bool = False) -> torch.Tensor:
    """A timm ``Block`` on tokens ``x`` (B, T, D), computed only for the (Q,) flat rows ``read`` of
    the (B*T) tokens: returns the (Q, D) rows of ``blk(x)``.

    Keys and values (the fused ``qkv``) come from every token; the attention output of the read
    queries, its projection, LayerScale, drop path and residual, then ``norm2``, the MLP and its
    residual run on the Q rows only. Stochastic depth draws what the full block draws, in the same
    order: timm's per-sample (B, 1, 1) Bernoulli tensor per branch, indexed per row, or with
    ``efficient`` (:attr:`MaskedViT.efficient_drop_path` in training) :func:`_subset_drop_path_block`'s
    ``randperm`` per branch, the branch added (scaled B / kept) to the rows of kept samples only.

    Queries are computed for every token (the fused ``qkv`` and the attention as timm runs them), and
    the attention output taken at the read rows: the rows equal the full block's bit for bit in the
    forward on the CPU, the shapes do not depend on the data (no host sync, no recompilation by
    ``torch.compile(fullgraph=True)`` beyond the number of rows), and the alternative, queries of
    the read rows only padded per image to the largest count, measured no faster on the harness's
    config T (its extra saving, about 0.02 s of a 5 s step, was below the noise).

    Where this is not exact (:func:`_rows_exact` false) the whole block runs and its rows are taken.
    """
    if not _rows_exact(blk):
        full = _subset_drop_path_block(blk, x) if efficient else type(blk).forward(blk, x)
        return full.flatten(0, 1)[read]
    b, t, d = x.shape
    img = torch.div(read, t, rounding_mode="floor")
    xr = x.reshape(b * t, d)[read]
    attn = blk.attn
    p1 = float(getattr(blk.drop_path1, "drop_prob", 0.0))
    if efficient and p1 > 0.0:
        idx, place, kept, scale = _kept_rows(b, p1, img, x.device)
        sub = place[img] * t + read % t  # each row in the kept samples' tokens (a dropped row: any, then unused)
        y = blk.norm1(x[idx])
        res = blk.ls1(_attention_out(attn, _attention_rows(attn, y, sub), y.reshape(-1, d)[sub]))
        xr = torch.where(kept.unsqueeze(1), torch.add(xr, res.to(xr.dtype), alpha=scale), xr)
    else:
        y = blk.norm1(x)
        res = blk.ls1(_attention_out(attn, _attention_rows(attn, y, read), y.reshape(b * t, d)[read]))
        if not efficient:
            res = _drop_path_rows(blk.drop_path1, res, img, b)
        xr = xr + res
    p2 = float(getattr(blk.drop_path2, "drop_prob", 0.0))
    if efficient and p2 > 0.0:
        _, _, kept, scale = _kept_rows(b, p2, img, x.device)
        res = blk.ls2(blk.mlp(blk.norm2(xr)))
        return torch.where(kept.unsqueeze(1), torch.add(xr, res.to(xr.dtype), alpha=scale), xr)
    res = blk.ls2(blk.mlp(blk.norm2(xr)))
    if not efficient:
        res = _drop_path_rows(blk.drop_path2, res, img, b)
    return xr + res


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
