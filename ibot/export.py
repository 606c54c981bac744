"""Export a ViT or Swin backbone to a folder plain timm loads (``local-dir:``), and load such a folder back.

An export is ``backbone.safetensors`` (timm keys), ``config.json`` (timm's format: architecture,
model arguments, ibot's evaluation preprocessing) and ``backbone.json`` (ibot's metadata). Loading
one (:func:`load_export`) treats the files as untrusted: a plain timm architecture name, geometry
arguments only, and tensor names and shapes checked before any allocation.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

from ibot.io import CheckpointError, file_mode
from ibot.models.backbone import create_vit
from ibot.models.swin import is_swin
from ibot.official import TIMM_BY_WIDTH

# the timm arguments an export may carry (never pretrained / checkpoint_path / pretrained_cfg_overlay)
EXPORT_KWARGS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans", "depths", "window_size")


def _export_meta(src: Path) -> dict:
    """``backbone.json`` of an export, checked: a plain timm arch name and only geometry arguments."""
    import timm

    path = src.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"{src} has no {path.name} next to it (written by `ibot export`); export it again")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); export the backbone again") from err
    need = ("arch", "timm_kwargs", "img_size", "patch_size", "in_chans", "mean", "std")
    missing = [k for k in need if k not in meta] if isinstance(meta, dict) else list(need)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; export the backbone again")
    arch, kw = meta["arch"], meta["timm_kwargs"]
    # timm also resolves "hf-hub:..." and "local-dir:..." names: an untrusted file must not pick what is fetched
    if not (isinstance(arch, str) and re.fullmatch(r"[a-z0-9_]+", arch) and timm.is_model(arch)):
        raise CheckpointError(f"{path}: arch {arch!r} is not a plain timm model name; refusing to build it")
    if not isinstance(kw, dict) or set(kw) - {*EXPORT_KWARGS, "strict_img_size"}:
        extra = sorted(set(kw) - {*EXPORT_KWARGS, "strict_img_size"}) if isinstance(kw, dict) else kw
        raise CheckpointError(f"{path}: timm_kwargs has arguments an export does not carry ({extra}); refusing")

    def plain(v) -> bool:
        return isinstance(v, bool | int) or (isinstance(v, list) and all(plain(x) for x in v))

    if not all(plain(v) for v in kw.values()) or not isinstance(meta.get("norm_eps", 1e-6), float):
        raise CheckpointError(f"{path}: timm_kwargs / norm_eps must be integers, lists of integers or flags")
    return meta


def load_export(src: str | Path) -> tuple[torch.nn.Module, dict]:
    """A timm backbone and its metadata from ``backbone.safetensors`` + ``backbone.json`` (untrusted files).

    The tensor names and shapes in the safetensors header must be those of the model that
    ``backbone.json`` describes (checked on the meta device, before any allocation).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = Path(src)
    meta = _export_meta(src)
    kw = dict(meta["timm_kwargs"])
    if "norm_eps" in meta:
        kw["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=meta["norm_eps"])
    try:
        with safe_open(str(src), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any malformed file
        raise CheckpointError(f"{src} is not a readable safetensors file ({str(err)[:160]})") from err
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in create_vit(meta["arch"], **kw).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise CheckpointError(f"{src.with_suffix('.json')}: timm cannot build this backbone ({err})") from err
    if shapes != expected:
        bad = sorted(set(shapes) ^ set(expected)) or [k for k in shapes if shapes[k] != expected[k]]
        raise CheckpointError(f"{src} does not match its {src.with_suffix('.json').name} ({', '.join(bad[:4])})")
    model = create_vit(meta["arch"], **kw)
    model.load_state_dict(load_file(str(src)))
    return model, meta


def timm_kwargs(vit: torch.nn.Module) -> dict:
    """The ``timm.create_model`` arguments that rebuild this ViT or Swin's geometry."""
    if is_swin(vit):
        windows = getattr(vit, "_ref_window_sizes", None) or [blk.window_size for blk in vit.layers[0].blocks[:1]]
        return {
            "embed_dim": int(vit.embed_dim),
            "depths": [len(stage.blocks) for stage in vit.layers],
            "num_heads": [stage.blocks[0].attn.num_heads for stage in vit.layers],
            "window_size": [list(w) for w in windows] if len(windows) > 1 else list(windows[0]),
            "patch_size": vit.patch_embed.patch_size[0],
            "img_size": vit.patch_embed.img_size[0],
            "in_chans": vit.patch_embed.proj.in_channels,
            "strict_img_size": False,
        }
    n = vit.pos_embed.shape[1] - 1
    patch = vit.patch_embed.patch_size[0]
    return {
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": vit.blocks[0].attn.num_heads,
        "patch_size": patch,
        "img_size": math.isqrt(n) * patch,
        "in_chans": vit.patch_embed.proj.in_channels,
    }


def eval_crop_pct(size: int) -> float:
    """timm's ``crop_pct`` for ibot's evaluation transform at ``size`` px (resize to size * 256/224, crop).

    Chosen so that timm's ``floor(size / crop_pct)`` equals ibot's resize side exactly.
    """
    resize = int(round(size * 256 / 224)) if size >= 64 else size
    pct = round(size / resize, 4)
    while math.floor(size / pct) != resize:  # rounding moved it across an integer: nudge it
        pct = round(pct + (1e-4 if math.floor(size / pct) > resize else -1e-4), 4)
    return pct


def export_arch(vit: torch.nn.Module, info: dict) -> str:
    """The timm architecture name an export records: the run's own when it names this backbone's family."""
    arch = (info.get("config") or {}).get("model", {}).get("arch")
    if is_swin(vit):
        return arch if arch and arch.startswith("swin") else "swin_tiny_patch4_window7_224"
    if arch and not arch.startswith("swin"):
        return arch
    return TIMM_BY_WIDTH.get(timm_kwargs(vit)["embed_dim"], "vit_small_patch16_224")


def timm_config(vit: torch.nn.Module, arch: str, mean, std) -> dict:
    """The ``config.json`` timm's ``local-dir:`` / Hugging Face loader reads (architecture, model_args,
    a complete ``pretrained_cfg`` with ibot's evaluation preprocessing, no classifier)."""
    kw = timm_kwargs(vit)
    size = kw["img_size"]
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(vit.num_features),
        "global_pool": "avg" if is_swin(vit) else "token",
        "model_args": {**kw, "dynamic_img_size": True},  # any input size (position embeddings resampled)
        "pretrained_cfg": {
            "input_size": [kw["in_chans"], size, size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": eval_crop_pct(size),
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def export_backbone(backbone: torch.nn.Module, out_dir: str | Path, info: dict, arch: str | None = None) -> Path:
    """Write a folder timm loads by itself: ``backbone.safetensors`` (timm keys), ``config.json``
    (timm's format) and ``backbone.json`` (ibot's metadata).

    Load it with plain timm (the weights, the architecture and the preprocessing)::

        model = timm.create_model("local-dir:OUT", pretrained=True).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

    The model is built with ``dynamic_img_size=True`` (any input size) and ``num_classes=0``
    (``model(x)`` gives the features: the final-norm class token, or for Swin the token average).
    A Swin export also records ``norm_eps`` (1e-6, the official value) in ``backbone.json``: timm's
    Swin uses 1e-5 unless given ``norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)``.
    """
    from safetensors.torch import save_file

    from ibot.models.pooled import PooledBackbone

    if isinstance(backbone, PooledBackbone):
        name = type(backbone.timm_model).__name__
        raise NotImplementedError(
            f"ibot export writes ViT and Swin backbones; for this {name}, save backbone.timm_model.state_dict() "
            "and load it into timm.create_model(arch, num_classes=0)"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder (it gets backbone.safetensors + backbone.json)")
    out.mkdir(parents=True, exist_ok=True)
    vit = backbone.timm_model
    kw = timm_kwargs(vit)
    arch = arch or export_arch(vit, info)
    mean, std = info.get("mean") or [0.5] * kw["in_chans"], info.get("std") or [0.5] * kw["in_chans"]
    state = {k: v.detach().contiguous().clone() for k, v in vit.state_dict().items()}
    save_file(state, str(out / "backbone.safetensors"))
    meta = {
        "arch": arch,
        "timm_kwargs": kw,
        "img_size": kw["img_size"],
        "patch_size": kw["patch_size"],
        "in_chans": kw["in_chans"],
        "mean": list(mean),
        "std": list(std),
        "features": (
            "average of the final-norm tokens: timm model(x) with num_classes=0 (global_pool='avg')"
            if is_swin(vit)
            else "final-norm class token: timm model(x) with num_classes=0 (global_pool='token')"
        ),
        "format": "ibot-export-1",
    }
    if is_swin(vit):  # the official Swin's LayerNorm eps; timm's Swin default is 1e-5
        meta["norm_eps"] = vit.norm.eps
        meta["load"] = (
            "timm.create_model(arch, num_classes=0, norm_layer=functools.partial(torch.nn.LayerNorm, "
            "eps=norm_eps), **timm_kwargs)"
        )
    (out / "backbone.json").write_text(json.dumps(meta, indent=2))
    (out / "config.json").write_text(json.dumps(timm_config(vit, arch, mean, std), indent=2))
    for name in ("backbone.safetensors", "backbone.json", "config.json"):
        (out / name).chmod(file_mode())  # safetensors writes 0600; exports are meant to be shared
    return out / "backbone.safetensors"


@torch.no_grad()
def check_export(backbone: torch.nn.Module, out_dir: str | Path, device: torch.device | str = "cpu") -> float:
    """Load ``out_dir``'s export with plain ``timm.create_model`` on ``device`` and compare its
    features (``num_classes=0``) with ``backbone.forward_cls`` on two fixed random images, in fp32.

    Returns the largest absolute difference; raises :class:`CheckpointError` above 1e-4.
    """
    import timm
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta = json.loads((out / "backbone.json").read_text())
    kw = dict(meta["timm_kwargs"])
    if "norm_eps" in meta:
        kw["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=meta["norm_eps"])
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=0, **kw)
    model.load_state_dict(load_file(str(out / "backbone.safetensors"), device=str(device)))
    model = model.to(device).eval()
    size = meta["img_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    x = torch.randn(2, meta["in_chans"], size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ref = backbone.to(device).eval().forward_cls(x).float()
    diff = float((model(x).float() - ref).abs().max())
    if diff > 1e-4:
        raise CheckpointError(
            f"the export in {out} does not reproduce the backbone's features (max |diff| {diff:.2e}); "
            "report this with the source checkpoint"
        )
    return diff
