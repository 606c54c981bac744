"""Official iBOT checkpoints (bytedance/ibot) as ibot modules: ViT and Swin backbones, heads, centers.

Official layouts:

* full training checkpoint ``checkpoint.pth``: ``student`` (``module.backbone.*``,
  ``module.head.*``), ``teacher`` (``backbone.*``, ``head.*``; ``module.`` with a BN head),
  weight-norm ``weight_g`` / ``weight_v``, a duplicated ``last_layer2`` when the head is shared,
  ``ibot_loss`` centers, and a pickled ``argparse.Namespace`` under ``args``;
* backbone-only files: ``{'state_dict': {...}}`` or a flat dict of backbone keys.

The official ViT's keys equal timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so a backbone maps onto
a timm ``VisionTransformer`` without renaming. Everything is loaded with ``weights_only``.
Which file a user's source names (run folder, export) is :func:`ibot.builders.sources.resolve_source`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ibot.io import CheckpointError, load_safe
from ibot.models.backbone import MaskedViT, create_vit, wrap_backbone
from ibot.models.head import iBOTHead

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
TIMM_BY_WIDTH = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
}


@dataclass
class LoadReport:
    """What a load matched: loaded, missing and unexpected keys."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(
                f"  missing ({len(self.missing)}): {', '.join(self.missing[:12])}"
                + (" ..." if len(self.missing) > 12 else "")
            )
        if self.unexpected:
            lines.append(
                f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected[:12])}"
                + (" ..." if len(self.unexpected) > 12 else "")
            )
        return "\n".join(lines)


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def split_official_state(state: dict) -> tuple[dict, dict]:
    """Official (or flat) state dict -> (backbone dict with timm keys + ``masked_embed``, head dict)."""
    backbone, head = {}, {}
    for k, v in state.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        if k.startswith("head."):
            hk = k[len("head.") :]
            hk = hk.replace("parametrizations.weight.original0", "weight_g")
            hk = hk.replace("parametrizations.weight.original1", "weight_v")
            head[hk] = v
        else:
            backbone[_strip(k)] = v
    return backbone, head


def backbone_geometry(backbone: dict) -> dict:
    """timm kwargs (embed_dim, depth, num_heads, patch_size, img_size, in_chans) from a state dict."""
    if "cls_token" not in backbone or "patch_embed.proj.weight" not in backbone:
        raise CheckpointError("no ViT backbone keys (cls_token, patch_embed.proj.weight) in this file")
    dim = backbone["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in backbone if k.startswith("blocks."))
    proj = backbone["patch_embed.proj.weight"]
    patch = proj.shape[-1]
    n = backbone["pos_embed"].shape[1] - 1
    return {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": HEADS_BY_WIDTH.get(dim, max(1, dim // 64)),
        "patch_size": patch,
        "img_size": math.isqrt(n) * patch,
        "in_chans": proj.shape[1],
    }


def _load_into(module: torch.nn.Module, state: dict, source: str, prefix: str = "") -> LoadReport:
    own = module.state_dict()
    report = LoadReport(source)
    matched = {}
    for k, v in state.items():
        if k in own:
            if own[k].shape != v.shape:
                raise CheckpointError(
                    f"{source}: {prefix}{k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
                )
            matched[k] = v
        else:
            report.unexpected.append(prefix + k)
    report.missing = [prefix + k for k in own if k not in matched]
    report.loaded = [prefix + k for k in matched]
    module.load_state_dict(matched, strict=False)
    return report


def load_official(
    path: str | Path,
    which: str = "teacher",
    allow_unsafe: bool = False,
    num_heads: int | None = None,
    ckpt: dict | None = None,
):
    """Load an official checkpoint (full or backbone-only) into ibot modules.

    Args:
        path: ``checkpoint.pth`` (full), or a backbone file (``{'state_dict': ...}`` or flat).
        which: "teacher" or "student" for full checkpoints.
        num_heads: attention heads when the width is not a standard ViT size.
        ckpt: the file's content when the caller has already loaded it (``path`` then names it).

    Returns:
        ``(backbone MaskedViT or MaskedSwin, head iBOTHead or None, centers dict, report)``.
    """
    if ckpt is None:
        ckpt = load_safe(path, allow_unsafe=allow_unsafe)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    if which in ckpt and isinstance(ckpt[which], dict):
        state = ckpt[which]
    elif "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        state = ckpt["state_dict"]
    elif "model" in ckpt and isinstance(ckpt["model"], dict):  # DeiT / timm-train style {"model": state}
        state = ckpt["model"]
    elif any(k in ckpt for k in ("teacher", "student")):
        raise CheckpointError(f"{path} has no {which!r} entry (it has {sorted(ckpt)})")
    else:
        state = ckpt
    backbone_sd, head_sd = split_official_state({k: v for k, v in state.items() if torch.is_tensor(v)})
    if any(k.endswith("relative_position_bias_table") for k in backbone_sd):
        backbone, report, dim = _load_official_swin(backbone_sd, str(path))
    else:
        geo = backbone_geometry(backbone_sd)
        if num_heads:
            geo["num_heads"] = num_heads
        arch = TIMM_BY_WIDTH.get(geo["embed_dim"], "vit_small_patch16_224")
        vit = create_vit(arch, **geo)
        backbone = MaskedViT(vit, masked_im_modeling="masked_embed" in backbone_sd)
        vit_sd = {("vit." + k if k != "masked_embed" else k): v for k, v in backbone_sd.items()}
        report = _load_into(backbone, vit_sd, str(path))
        dim = geo["embed_dim"]
    if not report.loaded:
        raise CheckpointError(f"{path}: no backbone tensor matched; is it an iBOT/DINO ViT checkpoint?")
    head = None
    if head_sd and not any(k.startswith("last_layer") for k in head_sd):  # a classifier, not an iBOT head
        report.unexpected += ["head." + k for k in head_sd]
    elif head_sd:
        head = _build_head(head_sd, dim)
        hr = _load_into(head, head_sd, str(path), prefix="head.")
        report.loaded += hr.loaded
        report.missing += hr.missing
        report.unexpected += [k for k in hr.unexpected if not k.startswith("head.last_layer2")]
    centers = ckpt.get("ibot_loss", {}) if isinstance(ckpt.get("ibot_loss"), dict) else {}
    return backbone, head, centers, report


def swin_geometry(backbone: dict) -> dict:
    """timm Swin kwargs (embed_dim, depths, num_heads, window_size, patch_size, in_chans) from official keys."""
    proj = backbone["patch_embed.proj.weight"]
    n_stages = 1 + max(int(k.split(".")[1]) for k in backbone if k.startswith("layers."))
    depths = [
        1 + max(int(k.split(".")[3]) for k in backbone if k.startswith(f"layers.{i}.blocks.")) for i in range(n_stages)
    ]
    tables = [backbone[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(n_stages)]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2  # (2w - 1)^2 relative positions
    return {
        "embed_dim": proj.shape[0],
        "depths": tuple(depths),
        "num_heads": tuple(t.shape[1] for t in tables),
        "window_size": window,
        "patch_size": proj.shape[-1],
        "in_chans": proj.shape[1],
    }


def _load_official_swin(backbone_sd: dict, source: str):
    """Official iBOT Swin keys (downsample at the end of a stage) -> :class:`MaskedSwin` with timm keys."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    geo = swin_geometry(backbone_sd)
    swin = create_vit("swin_tiny_patch4_window7_224", img_size=224, **geo)
    backbone = wrap_backbone(swin, masked_im_modeling="masked_embed" in backbone_sd)
    masked = {k: v for k, v in backbone_sd.items() if k == "masked_embed"}
    timm_sd = checkpoint_filter_fn({k: v for k, v in backbone_sd.items() if k != "masked_embed"}, swin)
    report = _load_into(backbone, {**masked, **{"swin." + k: v for k, v in timm_sd.items()}}, source)
    if not report.loaded:
        raise CheckpointError(f"{source}: no Swin backbone tensor matched")
    return backbone, report, geo["embed_dim"] * 2 ** (len(geo["depths"]) - 1)


def _build_head(head_sd: dict, in_dim: int) -> iBOTHead:
    linears = sorted(
        {
            int(k.split(".")[1])
            for k in head_sd
            if k.startswith("mlp.") and k.endswith(".weight") and head_sd[k].ndim == 2
        }
    )
    nlayers = len(linears)
    hidden = head_sd[f"mlp.{linears[0]}.weight"].shape[0] if nlayers > 1 else 2048
    bottleneck = head_sd[f"mlp.{linears[-1]}.weight"].shape[0]
    norm = "bn" if any(k.endswith("running_mean") for k in head_sd) else None
    out_dim = head_sd["last_layer.weight_v"].shape[0]
    shared = "last_layer2.weight_v" not in head_sd or torch.equal(
        head_sd["last_layer2.weight_v"], head_sd["last_layer.weight_v"]
    )
    patch_out = out_dim if shared else head_sd["last_layer2.weight_v"].shape[0]
    head = iBOTHead(
        in_dim,
        out_dim,
        patch_out,
        shared_head=shared,
        norm=norm,
        nlayers=nlayers,
        hidden_dim=hidden,
        bottleneck_dim=bottleneck,
        norm_last_layer=False,
    )
    return head


def head_state_for(head: iBOTHead, target: iBOTHead, which: str) -> tuple[dict, str]:
    """A loaded head's state in the layout of ``target``, and a note on what was adapted.

    The official defaults train an unshared student head with a *shared* teacher head (its
    ``last_layer2`` is ``last_layer``): into an unshared target the teacher's prototypes become both
    layers. A shape that cannot be adapted is an error, never a silent random init.
    """
    hsd, own = head.state_dict(), target.state_dict()
    note = ""
    if "last_layer2.weight_v" in own and "last_layer2.weight_v" not in hsd:
        if own["last_layer2.weight_v"].shape != hsd["last_layer.weight_v"].shape:
            raise CheckpointError(
                f"the {which} head of this checkpoint is shared ({hsd['last_layer.weight_v'].shape[0]} prototypes) but "
                f"the model's patch prototypes number {own['last_layer2.weight_v'].shape[0]}; "
                "set model.patch_out_dim equal to model.out_dim (or model.shared_head=true)"
            )
        hsd.update({k.replace("last_layer.", "last_layer2."): v for k, v in hsd.items() if k.startswith("last_layer.")})
        note = " (shared prototypes copied into last_layer2)"
    for k, v in hsd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"the {which} head's {k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the "
                "model; set model.out_dim / model.patch_out_dim / model.bottleneck_dim / model.hidden_dim to match"
            )
    dropped = sorted(k for k in hsd if k not in own)
    if dropped:
        note += f" (not loaded: {', '.join(dropped)})"
    return {k: v for k, v in hsd.items() if k in own}, note
