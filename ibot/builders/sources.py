"""One place that turns a user's source into what a command needs.

A source is a run folder (its ``checkpoint.pth``), an ibot checkpoint, an official iBOT / DINO
checkpoint (full or backbone-only), an ``ibot export`` folder or its ``backbone.safetensors``, or
timm-format weights (``.safetensors`` or a ``.pth`` state dict). :func:`resolve_source` names the
file; :func:`load_backbone`, :func:`load_head` and :func:`init_model_from` load it; an ibot
checkpoint becomes a model in :func:`model_from_checkpoint` only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ibot.builders.model import build_model
from ibot.config import from_dict, saved_config, to_dict
from ibot.data.transforms import norm_stats
from ibot.export import load_export, timm_kwargs
from ibot.io import CheckpointError, load_safe
from ibot.models.backbone import wrap_backbone
from ibot.models.head import iBOTHead
from ibot.official import head_state_for, load_official

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"  # a run folder's newest training checkpoint
EXPORT = "backbone.safetensors"  # an `ibot export` folder's weights


def resolve_source(source: str | Path, *, checkpoint_only: bool = False) -> Path:
    """The file a user's source names: a run folder's ``checkpoint.pth``, an export folder's
    ``backbone.safetensors``, any other path as given (existence is checked by the loader).

    ``checkpoint_only`` (resuming): a folder always names its ``checkpoint.pth``, present or not
    (the caller falls back to ``checkpoint.prev.pth`` or reports it missing).
    """
    src = Path(source)
    if not src.is_dir():
        return src
    if checkpoint_only or (src / CHECKPOINT).is_file():
        return src / CHECKPOINT
    if (src / EXPORT).is_file():
        return src / EXPORT
    raise CheckpointError(f"{src} has no {CHECKPOINT} or {EXPORT}")


def is_ibot_checkpoint(ckpt) -> bool:
    """Whether a loaded file is an ibot training checkpoint (``format`` ``ibot-1``)."""
    return isinstance(ckpt, dict) and ckpt.get("format") == "ibot-1"


def checkpoint_config(ckpt: dict):
    """The config of a loaded ibot checkpoint, for evaluation / export / pictures: keys this version
    does not know (a checkpoint of a newer ibot) are ignored with a one-line warning naming them."""
    kept, unknown = saved_config(ckpt["config"])
    if unknown:
        log.warning("warning: ignoring checkpoint config keys this ibot version does not know: %s", ", ".join(unknown))
    return from_dict(kept)


def model_from_checkpoint(ckpt: dict):
    """``(model, config)`` of a loaded ibot checkpoint: the config's :func:`build_model` with its weights."""
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model, cfg


def load_backbone(source: str | Path, which: str = "teacher", allow_unsafe: bool = False):
    """A backbone from a run folder, an ibot checkpoint, an exported safetensors file or an official file.

    Returns ``(MaskedViT or MaskedSwin, info dict with img_size / patch_size / in_chans / mean / std, report)``.
    """
    src = resolve_source(source)
    if src.suffix == ".safetensors":
        model, meta = load_export(src)
        info = {k: meta[k] for k in ("img_size", "patch_size", "in_chans", "mean", "std")}
        return wrap_backbone(model, masked_im_modeling=False), info, f"{src}: exported backbone"
    ckpt = load_safe(src, allow_unsafe=allow_unsafe)
    if is_ibot_checkpoint(ckpt):
        model, cfg = model_from_checkpoint(ckpt)
        backbone = model.teacher["backbone"] if which == "teacher" else model.student["backbone"]
        mean, std = norm_stats(cfg.model.in_chans)
        info = {
            "img_size": cfg.model.img_size,
            "patch_size": cfg.model.patch_size,
            "in_chans": cfg.model.in_chans,
            "mean": list(mean),
            "std": list(std),
            "config": to_dict(cfg),
        }
        return backbone, info, f"{src}: ibot checkpoint ({which})"
    backbone, _, _, report = load_official(src, which, allow_unsafe, ckpt=ckpt)
    mean, std = norm_stats(backbone.in_chans)
    info = {
        "img_size": timm_kwargs(backbone.timm_model)["img_size"],
        "patch_size": backbone.patch_size,
        "in_chans": backbone.in_chans,
        "mean": list(mean),
        "std": list(std),
    }
    return backbone, info, str(report)


def load_head(source: str | Path, which: str = "teacher", allow_unsafe: bool = False) -> iBOTHead:
    """The projection head of a run folder, an ibot checkpoint or an official full checkpoint."""
    src = resolve_source(source)
    ckpt = load_safe(src, allow_unsafe=allow_unsafe)
    if is_ibot_checkpoint(ckpt):
        model, _ = model_from_checkpoint(ckpt)
        return model.teacher["head"] if which == "teacher" else model.student["head"]
    _, head, _, _ = load_official(src, which, allow_unsafe, ckpt=ckpt)
    if head is None:
        raise CheckpointError(f"{src} has no projection head; patterns need a full (training) checkpoint")
    return head


def _fit_backbone_state(sd: dict, target: torch.nn.Module, source: str) -> dict:
    """``sd`` restricted to ``target``'s keys, position embeddings resized to its grid (official
    bicubic formula); any other shape mismatch is an error naming the tensor."""
    from ibot.models.backbone import interpolate_pos_embed

    own = target.state_dict()
    out = {}
    for k, v in sd.items():
        if k not in own:
            continue
        if k.endswith("pos_embed") and v.shape != own[k].shape and v.ndim == 3 and v.shape[-1] == own[k].shape[-1]:
            side = math.isqrt(own[k].shape[1] - 1)
            v = interpolate_pos_embed(v, side, side)
        if v.shape != own[k].shape:
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)} but the model's is {tuple(own[k].shape)}; "
                "set the model.* keys (arch, embed_dim, depth, patch_size, in_chans) to the file's geometry"
            )
        out[k] = v
    return out


def init_model_from(model, source: str | Path, allow_unsafe: bool = False) -> str:
    """Initialise an :class:`ibot.iBOT` from an ibot checkpoint, an official full/backbone checkpoint,
    or a timm-format backbone (``.safetensors`` or ``.pth`` state dict with timm keys, or an
    ``ibot export`` folder).

    Official files: the student backbone and head from ``student`` (the teacher from ``teacher``);
    a backbone-only file initialises both backbones (position embeddings resized to the model's
    grid). Returns a readable report.
    """
    src = resolve_source(source)
    ckpt = load_safe(src, allow_unsafe=allow_unsafe)
    if is_ibot_checkpoint(ckpt):
        model.load_state_dict(ckpt["model"])
        return f"{src}: ibot checkpoint (student, teacher, centers)"
    lines = []
    for which in ("student", "teacher"):
        key = which if isinstance(ckpt, dict) and which in ckpt else None
        if key is None and isinstance(ckpt, dict) and ("teacher" in ckpt or "student" in ckpt):
            key = "teacher" if "teacher" in ckpt else "student"
        backbone, head, centers, report = load_official(src, key or "teacher", allow_unsafe, ckpt=ckpt)
        target = model.student if which == "student" else model.teacher
        sd = _fit_backbone_state(backbone.state_dict(), target["backbone"], str(src))
        r = target["backbone"].load_state_dict(sd, strict=False)
        line = f"{which}: from {key or 'backbone file'} ({len(sd)} backbone tensors"
        missing = [k for k in r.missing_keys if k != "masked_embed"]  # the teacher has no mask token
        if head is not None:
            hsd, note = head_state_for(head, target["head"], which)
            missing += ["head." + k for k in target["head"].load_state_dict(hsd, strict=False).missing_keys]
            line += f", head{note}"
        line += f"; missing {missing[:5]}{' ...' if len(missing) > 5 else ''})" if missing else "; nothing missing)"
        lines.append(line)
        if which == "teacher" and "center" in centers:
            model.cls_center.center.copy_(centers["center"].reshape(1, -1))
            if "center2" in centers and centers["center2"].numel() == model.patch_center_ema.center.numel():
                model.patch_center_ema.center.copy_(centers["center2"].reshape(1, -1))
    return f"{src}: " + "; ".join(lines)
