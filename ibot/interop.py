"""Interoperability: load official iBOT checkpoints, load any backbone source, export to timm.

Official layouts (bytedance/ibot):

* full training checkpoint ``checkpoint.pth``: ``student`` (``module.backbone.*``,
  ``module.head.*``), ``teacher`` (``backbone.*``, ``head.*``; ``module.`` with a BN head),
  weight-norm ``weight_g`` / ``weight_v``, a duplicated ``last_layer2`` when the head is shared,
  ``ibot_loss`` centers, and a pickled ``argparse.Namespace`` under ``args``;
* backbone-only files: ``{'state_dict': {...}}`` or a flat dict of backbone keys.

The official ViT's keys equal timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so a backbone maps onto
a timm ``VisionTransformer`` without renaming. Everything is loaded with ``weights_only``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ibot.models.backbone import MaskedViT, create_vit, wrap_backbone
from ibot.models.head import iBOTHead
from ibot.models.swin import is_swin
from ibot.train.checkpoint import CheckpointError, file_mode, load_safe

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


def _head_state_for(head: iBOTHead, target: iBOTHead, which: str) -> tuple[dict, str]:
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


# ---------------------------------------------------------------------- any source -> backbone
def load_backbone(source: str | Path, which: str = "teacher", allow_unsafe: bool = False):
    """A backbone from a run folder, an ibot checkpoint, an exported safetensors file or an official file.

    Returns ``(MaskedViT or MaskedSwin, info dict with img_size / patch_size / in_chans / mean / std, report)``.
    """
    from ibot.data.transforms import norm_stats

    src = Path(source)
    if src.is_dir():
        if (src / "checkpoint.pth").is_file():
            src = src / "checkpoint.pth"
        elif (src / "backbone.safetensors").is_file():
            src = src / "backbone.safetensors"
        else:
            raise CheckpointError(f"{src} has no checkpoint.pth or backbone.safetensors")
    if src.suffix == ".safetensors":
        model, meta = load_export(src)
        info = {k: meta[k] for k in ("img_size", "patch_size", "in_chans", "mean", "std")}
        return wrap_backbone(model, masked_im_modeling=False), info, f"{src}: exported backbone"
    ckpt = load_safe(src, allow_unsafe=allow_unsafe)
    if isinstance(ckpt, dict) and ckpt.get("format") == "ibot-1":
        from ibot.config import build_model, from_dict

        cfg = from_dict(ckpt["config"])
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
        backbone = model.teacher["backbone"] if which == "teacher" else model.student["backbone"]
        mean, std = norm_stats(cfg.model.in_chans)
        info = {
            "img_size": cfg.model.img_size,
            "patch_size": cfg.model.patch_size,
            "in_chans": cfg.model.in_chans,
            "mean": list(mean),
            "std": list(std),
            "config": ckpt["config"],
        }
        return backbone, info, f"{src}: ibot checkpoint ({which})"
    backbone, _, _, report = load_official(src, which, allow_unsafe)
    mean, std = norm_stats(backbone.in_chans)
    info = {
        "img_size": timm_kwargs(backbone.timm_model)["img_size"],
        "patch_size": backbone.patch_size,
        "in_chans": backbone.in_chans,
        "mean": list(mean),
        "std": list(std),
    }
    return backbone, info, str(report)


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


def load_head(source: str | Path, which: str = "teacher", allow_unsafe: bool = False) -> iBOTHead:
    """The projection head of a run folder, an ibot checkpoint or an official full checkpoint."""
    src = Path(source)
    src = src / "checkpoint.pth" if src.is_dir() else src
    ckpt = load_safe(src, allow_unsafe=allow_unsafe)
    if isinstance(ckpt, dict) and ckpt.get("format") == "ibot-1":
        from ibot.config import build_model, from_dict

        model = build_model(from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model.teacher["head"] if which == "teacher" else model.student["head"]
    _, head, _, _ = load_official(src, which, allow_unsafe)
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
    src = Path(source)
    if src.is_dir():
        src = src / "checkpoint.pth" if (src / "checkpoint.pth").is_file() else src / "backbone.safetensors"
    ckpt = load_safe(src, allow_unsafe=allow_unsafe)
    if isinstance(ckpt, dict) and ckpt.get("format") == "ibot-1":
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
            hsd, note = _head_state_for(head, target["head"], which)
            missing += ["head." + k for k in target["head"].load_state_dict(hsd, strict=False).missing_keys]
            line += f", head{note}"
        line += f"; missing {missing[:5]}{' ...' if len(missing) > 5 else ''})" if missing else "; nothing missing)"
        lines.append(line)
        if which == "teacher" and "center" in centers:
            model.cls_center.center.copy_(centers["center"].reshape(1, -1))
            if "center2" in centers and centers["center2"].numel() == model.patch_center_ema.center.numel():
                model.patch_center_ema.center.copy_(centers["center2"].reshape(1, -1))
    return f"{src}: " + "; ".join(lines)


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
