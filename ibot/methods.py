"""High-level ``iBOT`` and ``DINO`` modules (stable-pretraining's API, extended for multi-crop).

One training step, as the official code computes it but without its wasted work:

* teacher (EMA, never masked, no drop-path) on all global crops in one backbone pass;
* student on the masked global crops in one pass and on all local crops in one pass;
* the head MLP runs once on the rows that matter: student CLS of every view plus the student's
  *masked* patch tokens (local patch tokens are never projected); the teacher projects its CLS
  tokens and either every patch token (``patch_center="all"``, needed for the official patch
  center, the default) or only the masked ones (``"masked"``, the DINOv2 choice);
* vectorised losses (:mod:`ibot.losses`), centers updated after the loss.

The loss equals the official formulation (heads on all tokens, loop over view pairs) on the
same inputs; ``tests/test_methods.py`` checks it against an independent reference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from ibot.data.masking import MaskBatch, MaskGenerator, random_masks_torch
from ibot.losses import Center, cls_distillation_loss, koleo_loss, masked_patch_loss, sinkhorn_knopp
from ibot.losses.teacher import teacher_temperature
from ibot.models.backbone import create_vit, make_teacher_backbone, wrap_backbone
from ibot.models.head import iBOTHead


class ModelOutput:
    """Dict-like access to a dataclass output, as ``transformers.utils.ModelOutput`` (stable-pretraining).

    ``out.loss``, ``out["loss"]``, ``out[0]``, ``"loss_patch" in out``, ``dict(out)`` and ``**out``
    all work; as with ``ModelOutput``, fields that are ``None`` are absent from the mapping.
    """

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            if getattr(self, key, None) is None:
                raise KeyError(f"{key!r} (present: {self.keys()})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def get(self, key: str, default=None):
        return getattr(self, key, None) if key in self.keys() else default

    def values(self) -> list:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, object]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())


@dataclass
class iBOTOutput(ModelOutput):  # noqa: N801
    """Output of :class:`iBOT` (and :class:`DINO`); dict-like (:class:`ModelOutput`).

    Attributes:
        loss: total loss (0 in evaluation mode).
        loss_cls: weighted CLS distillation term (detached).
        loss_patch: weighted masked-patch term (detached).
        loss_koleo: weighted KoLeo term (detached).
        embedding: teacher CLS features, (B, D) for ``images``, (G*B, D) in training.
        teacher_logits: teacher CLS logits (G, B, K) (detached), training only.
        student_logits: student CLS logits (V, B, K), training only.
        teacher_probs: the CLS targets the loss used (G, B, K), fp32, training only (with
            centering, made with the center before this step's update).
    """

    loss: torch.Tensor
    loss_cls: torch.Tensor | None = None
    loss_patch: torch.Tensor | None = None
    loss_koleo: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_probs: torch.Tensor | None = None


DINOOutput = iBOTOutput


def _cat_views(views: torch.Tensor | Sequence[torch.Tensor] | None) -> tuple[torch.Tensor | None, int]:
    """List of (B, C, H, W) views -> ((n*B, C, H, W), n). A tensor is taken as already crop-major."""
    if views is None:
        return None, 0
    if isinstance(views, torch.Tensor):
        raise TypeError("pass views as a list of (B, C, H, W) tensors")
    views = list(views)
    if not views:
        return None, 0
    shape = views[0].shape
    for v in views:
        if v.shape != shape:
            raise ValueError(f"all views of a group must have the same shape; got {tuple(shape)} and {tuple(v.shape)}")
    return torch.cat(views), len(views)


class iBOT(nn.Module):  # noqa: N801
    """iBOT: DINO on the class token + masked-patch self-distillation with an online tokenizer.

    The first 15 parameters are stable-pretraining's ``iBOT`` API with its names and defaults;
    the keyword-only ones add the official recipe's options.

    Args:
        encoder_name: timm ViT or Swin name, or a built timm ``VisionTransformer`` / ``SwinTransformer``.
        projector_hidden_dim, projector_bottleneck_dim: head MLP sizes.
        n_cls_prototypes, n_patch_prototypes: prototypes K and K_p.
        mask_ratio: masking ratio, or a list of ratios (official ``pred_ratio`` pairs).
        patch_loss_weight: ``lambda2``.
        temperature_student: student temperature.
        temperature_teacher_warmup, temperature_teacher: CLS teacher temperature schedule.
        warmup_epochs_temperature_teacher: its (and the patch schedule's) warm-up epochs.
        ema_decay_start, ema_decay_end: cosine teacher momentum schedule (kept for the API; the
            momentum is passed to :meth:`update_teacher` by the loop, from :class:`ibot.train.schedules.Schedules`).
        image_size: global crop size the position embeddings are made for.
        pretrained: load timm's pretrained weights (needs the network).
        encoder_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``in_chans`` ...).
        drop_path_rate: student stochastic depth (the teacher has none).
        mask_ratio_var: official ``pred_ratio_var`` (float or list matching ``mask_ratio``).
        mask_shape: "block" (official) or "rand".
        mask_start_epoch: official ``pred_start_epoch``.
        mask_probability: fraction of images masked at all (DINOv2); 1.0 = official.
        shared_head: CLS and patch tokens share prototypes (needs K == K_p).
        head_norm, head_act, head_layers, norm_last_layer: head options.
        cls_loss_weight: ``lambda1``.
        temperature_teacher_patch_warmup, temperature_teacher_patch: patch teacher temperatures.
        centering: "center" (official EMA centering) or "sinkhorn" (Sinkhorn-Knopp).
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        center_momentum: momentum of both centers.
        patch_center: "all" (official: center of every patch token) or "masked" (DINOv2).
        koleo_loss_weight: weight of the KoLeo regulariser on student global CLS features.
        masked_im_modeling: mask the student's global crops (official ``--use_masked_im_modeling``).
            None: only when there is a patch loss. ``True`` with ``patch_loss_weight=0`` is the official
            ``--lambda2 0`` (the CLS loss sees masked student crops); ``False`` is DINO.
    """

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_cls_prototypes: int = 65536,
        n_patch_prototypes: int = 8192,
        mask_ratio: float | Sequence[float] = 0.3,
        patch_loss_weight: float = 1.0,
        temperature_student: float = 0.1,
        temperature_teacher_warmup: float = 0.04,
        temperature_teacher: float = 0.07,
        warmup_epochs_temperature_teacher: int = 30,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        image_size: int = 224,
        pretrained: bool = False,
        *,
        encoder_kwargs: dict | None = None,
        drop_path_rate: float = 0.1,
        mask_ratio_var: float | Sequence[float] = 0.0,
        mask_shape: str = "block",
        mask_start_epoch: int = 0,
        mask_probability: float = 1.0,
        shared_head: bool = False,
        head_norm: str | None = None,
        head_act: str = "gelu",
        head_layers: int = 3,
        norm_last_layer: bool = True,
        cls_loss_weight: float = 1.0,
        temperature_teacher_patch_warmup: float = 0.04,
        temperature_teacher_patch: float = 0.07,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
        center_momentum: float = 0.9,
        patch_center: str = "all",
        koleo_loss_weight: float = 0.0,
        masked_im_modeling: bool | None = None,
    ) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        if patch_center not in ("all", "masked"):
            raise ValueError(f"patch_center must be 'all' or 'masked', got {patch_center!r}")
        if shared_head and n_cls_prototypes != n_patch_prototypes:
            raise ValueError(
                f"shared_head needs n_cls_prototypes == n_patch_prototypes ({n_cls_prototypes} != {n_patch_prototypes})"
            )
        self.use_patch_loss = patch_loss_weight > 0
        self.masked_im_modeling = self.use_patch_loss if masked_im_modeling is None else bool(masked_im_modeling)
        if self.use_patch_loss and not self.masked_im_modeling:
            raise ValueError(
                "the patch loss needs masked student crops: masked_im_modeling=False needs patch_loss_weight=0"
            )
        if isinstance(encoder_name, str):
            kw = {"img_size": image_size, **(encoder_kwargs or {})}
            vit = create_vit(encoder_name, drop_path_rate=drop_path_rate, pretrained=pretrained, **kw)
        else:
            vit = encoder_name
        backbone = wrap_backbone(vit, masked_im_modeling=self.masked_im_modeling)

        def make_head(norm_last: bool) -> iBOTHead:
            return iBOTHead(
                backbone.embed_dim,
                n_cls_prototypes,
                n_patch_prototypes,
                shared_head=shared_head,
                norm=head_norm,
                act=head_act,
                nlayers=head_layers,
                hidden_dim=projector_hidden_dim,
                bottleneck_dim=projector_bottleneck_dim,
                norm_last_layer=norm_last,
            )

        head = make_head(norm_last_layer)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        teacher_head = make_head(True)  # the official teacher head always freezes the gain
        teacher_head.load_state_dict(head.state_dict())
        for p in teacher_head.parameters():
            p.requires_grad_(False)
        self.teacher = nn.ModuleDict({"backbone": make_teacher_backbone(backbone), "head": teacher_head})
        self.teacher["backbone"].eval()

        self.embed_dim = backbone.embed_dim
        self.image_size = image_size
        self.student_temp = temperature_student
        self.cls_temps = (temperature_teacher_warmup, temperature_teacher, warmup_epochs_temperature_teacher)
        self.patch_temps = (
            temperature_teacher_patch_warmup,
            temperature_teacher_patch,
            warmup_epochs_temperature_teacher,
        )
        self.ema_decay = (ema_decay_start, ema_decay_end)
        self.lambda1, self.lambda2, self.koleo_weight = cls_loss_weight, patch_loss_weight, koleo_loss_weight
        self.centering, self.sinkhorn_iterations, self.patch_center = centering, sinkhorn_iterations, patch_center
        self.cls_center = Center(n_cls_prototypes, center_momentum)
        self.patch_center_ema = Center(n_patch_prototypes, center_momentum)
        self.mask_generator = MaskGenerator(mask_shape, mask_ratio, mask_ratio_var, mask_start_epoch, mask_probability)
        self.epoch = 0
        # False: centers move inside forward (plain use). True: forward only records this step's
        # center statistics and :meth:`apply_center_update` applies them (after the finite check)
        self.defer_center_update = False
        self._pending_centers: list = []
        self._ema_pairs = self._pair_parameters()

    # ------------------------------------------------------------------ schedules and EMA
    def set_epoch(self, epoch: int) -> None:
        """Epoch of the per-epoch schedules (teacher temperatures, mask start)."""
        self.epoch = int(epoch)
        self.mask_generator.set_epoch(epoch)

    def teacher_temperatures(self, epoch: int | None = None) -> tuple[float, float]:
        """(CLS, patch) teacher temperatures at ``epoch`` (official per-epoch schedules)."""
        e = self.epoch if epoch is None else epoch
        cls_t = teacher_temperature(e, *self.cls_temps)
        patch_t = teacher_temperature(e, *self.patch_temps, start_epoch=self.mask_generator.start_epoch)
        return cls_t, patch_t

    def _pair_parameters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        teacher = dict(self.teacher.named_parameters())
        pairs = [(teacher[n], p) for n, p in self.student.named_parameters() if n in teacher]
        if len(pairs) != len(teacher):
            raise RuntimeError("teacher and student parameters do not match")
        return pairs

    @torch.no_grad()
    def update_teacher(self, momentum: float, apply: torch.Tensor | None = None) -> None:
        """EMA ``teacher = m * teacher + (1 - m) * student`` over all common parameters.

        ``apply`` (0-d bool on the device): where False the teacher is left exactly as it is
        (momentum 1, student weight 0), decided on the device without a host synchronisation.
        """
        t = [a for a, _ in self._ema_pairs]
        s = [b.detach() for _, b in self._ema_pairs]
        if apply is None:
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1.0 - momentum)
            return
        m = torch.where(apply, momentum, 1.0).to(t[0].dtype)
        w = torch.where(apply, 1.0 - momentum, 0.0).to(t[0].dtype)
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, torch._foreach_mul(s, w))

    @torch.no_grad()
    def apply_center_update(self, apply: torch.Tensor | None = None) -> None:
        """Move both centers with the statistics the last forward recorded (DINOv2's pattern).

        Called by the training step after the finite check: ``apply`` (0-d bool on the device)
        False leaves the centers unchanged, so a skipped step cannot poison them.
        """
        pending, self._pending_centers = self._pending_centers, []
        for center, row_sum, n_rows in pending:
            center.update(row_sum, n_rows, apply)

    def train(self, mode: bool = True) -> iBOT:
        super().train(mode)
        # The teacher backbone never uses train-mode behaviour (it has no drop-path). Its head follows the
        # module's mode, as in the official code (whose teacher is never put in eval mode): with
        # ``head_norm="bn"`` it normalises with the batch statistics of its own tokens.
        self.teacher["backbone"].eval()
        if mode and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.teacher["backbone"].modules()):
            self.teacher["backbone"].train()  # official DINO: a CNN teacher normalises with batch statistics
        return self

    def _apply(self, fn, recurse=True):  # keep EMA pairs pointing at the moved tensors
        out = super()._apply(fn, recurse)
        self._ema_pairs = self._pair_parameters()
        return out

    # ------------------------------------------------------------------ masks
    def sample_masks(
        self, n_images: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n_images, h, w) bool masks from the module's masking settings, on the CPU."""
        h, w = grid
        if self.mask_generator.shape == "rand":
            ratios = self.mask_generator.sample_ratios(n_images, generator)
            return random_masks_torch(n_images, h * w, ratios, generator).reshape(n_images, h, w)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        return self.mask_generator(n_images, h, w, random.Random(seed))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        global_views: Sequence[torch.Tensor] | None = None,
        local_views: Sequence[torch.Tensor] | None = None,
        masks: MaskBatch | torch.Tensor | Sequence[torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
        epoch: int | None = None,
        batch=None,
        temps: torch.Tensor | None = None,
    ) -> iBOTOutput:
        """Training step loss, or teacher CLS embeddings for ``images``.

        Args:
            global_views: G tensors (B, C, H, W), the unmasked global crops.
            local_views: L tensors (B, C, h, w), or None.
            masks: per global view (B, h', w') bool masks (list of G), a (G*B, N) tensor, or a
                :class:`MaskBatch` from the collate. None samples them from the module's settings.
            images: (B, C, H, W) for evaluation: returns the teacher's CLS embedding.
            epoch: epoch of the temperature schedules (default: the last :meth:`set_epoch`).
            batch: a :class:`ibot.data.loader.Batch` from the collate (what the trainer passes).
            temps: optional (2,) tensor of the (CLS, patch) teacher temperatures, used instead of
                the epoch's schedule (a compiled forward takes them as a tensor: no recompiles).
        """
        if batch is not None:
            b = batch.global_crops.shape[0] // batch.n_global
            mb = batch.masks if self.masked_im_modeling else None
            if self.masked_im_modeling and mb is None:
                raise ValueError("this batch has no masks; build the collate with a mask generator")
            return self.step(batch.global_crops, batch.local_crops, mb, batch.n_global, batch.n_local, b, epoch, temps)
        if images is not None:
            with torch.no_grad():
                cls = self.teacher["backbone"].forward_cls(images)
            return iBOTOutput(loss=torch.zeros((), device=cls.device, dtype=cls.dtype), embedding=cls)
        g_imgs, n_global = _cat_views(global_views)
        if g_imgs is None:
            raise ValueError(f"{type(self).__name__}.forward needs global_views or images")
        l_imgs, n_local = _cat_views(local_views)
        if n_global + n_local < 2:
            raise ValueError("need at least two views (e.g. 2 global views, or 1 global + local views)")
        b = g_imgs.shape[0] // n_global
        mb = self._mask_batch(masks, g_imgs, n_global) if self.masked_im_modeling else None
        return self.step(g_imgs, l_imgs, mb, n_global, n_local, b, epoch)

    def _mask_batch(self, masks, g_imgs: torch.Tensor, n_global: int) -> MaskBatch:
        grid = self.student["backbone"].grid_size(g_imgs.shape[-2], g_imgs.shape[-1])
        if masks is None:
            masks = self.sample_masks(g_imgs.shape[0], grid)
            mb = MaskBatch.from_masks(masks, n_global)
        elif isinstance(masks, MaskBatch):
            mb = masks
        else:
            if isinstance(masks, (list, tuple)):
                masks = list(masks)[:n_global]  # official loaders also give local-crop masks
            mb = MaskBatch.from_masks(masks, n_global)
        if mb.masks.shape != (g_imgs.shape[0], grid[0] * grid[1]):
            raise ValueError(
                f"masks have shape {tuple(mb.masks.shape)}, expected ({g_imgs.shape[0]}, {grid[0] * grid[1]}) "
                f"for {n_global} global views of {g_imgs.shape[0] // n_global} images on a {grid[0]}x{grid[1]} grid"
            )
        return mb.to(g_imgs.device)

    def step(
        self,
        g_imgs: torch.Tensor,
        l_imgs: torch.Tensor | None,
        mb: MaskBatch | None,
        n_global: int,
        n_local: int,
        b: int,
        epoch: int | None = None,
        temps: torch.Tensor | None = None,
    ) -> iBOTOutput:
        """The training loss on crop-major stacked views (what the trainer calls)."""
        cls_temp, patch_temp = self.teacher_temperatures(epoch) if temps is None else (temps[0], temps[1])
        t_head: iBOTHead = self.teacher["head"]
        s_head: iBOTHead = self.student["head"]
        n_cls = g_imgs.shape[0]
        patch = mb is not None and self.use_patch_loss  # masked student crops may feed the CLS loss alone
        # A BatchNorm head normalises with the statistics of every token of a crop group, as the official
        # head (which always runs on all tokens); otherwise it runs only on the rows the loss reads.
        bn = s_head.batch_norm

        # teacher: unmasked global crops, no grad
        with torch.no_grad():
            t_cls_tok, t_patch_tok = self.teacher["backbone"](g_imgs)
            all_patches = bn or (self.centering == "center" and self.patch_center == "all")
            patch_rows = None
            if (bn or patch) and t_patch_tok is not None:  # a pooled (CNN) backbone has no patch tokens
                flat = t_patch_tok.reshape(-1, t_patch_tok.shape[-1])
                patch_rows = flat if all_patches else flat[mb.index]
            rows = t_cls_tok if patch_rows is None else torch.cat([t_cls_tok, patch_rows])
            z = t_head.project(rows)
            t_cls = t_head.last_layer(z[:n_cls]).float()
            if patch:
                z_patch = z[n_cls:]
                if all_patches:
                    if self.centering == "center" and self.patch_center == "all":
                        # the official patch center needs each image's mean logit over all its
                        # tokens; the prototype layer is linear and bias-free, so it is the image's
                        # mean bottleneck feature projected: the (G*B*N, K) logits are never built,
                        # only the M masked rows the loss reads are projected
                        n_tok = t_patch_tok.shape[1]
                        z_mean = z_patch.reshape(n_cls, n_tok, -1).float().mean(1)
                        patch_mean_logits = t_head.patch_prototypes(z_mean.to(z_patch.dtype)).float()
                    z_patch = z_patch[mb.index]
                t_patch_m = t_head.patch_prototypes(z_patch).float()
            if self.centering == "center":
                t_cls_probs = self.cls_center.softmax(t_cls, cls_temp)
                t_patch_probs = self.patch_center_ema.softmax(t_patch_m, patch_temp) if patch else None
            else:
                t_cls_probs = sinkhorn_knopp(t_cls, cls_temp, self.sinkhorn_iterations)
                t_patch_probs = sinkhorn_knopp(t_patch_m, patch_temp, self.sinkhorn_iterations) if patch else None

        # student: masked global crops (one pass), local crops (one pass)
        s_cls_g, s_patch_g = self.student["backbone"](g_imgs, mask=None if mb is None else mb.masks)
        s_flat = None if s_patch_g is None else s_patch_g.reshape(-1, s_patch_g.shape[-1])
        local = None if l_imgs is None else self.student["backbone"](l_imgs)
        n_rows = n_cls + (0 if local is None else local[0].shape[0])
        if bn:  # one head pass per crop group over all of its tokens, then the rows the loss reads
            z_g = s_head.project(s_cls_g if s_flat is None else torch.cat([s_cls_g, s_flat]))
            parts = [z_g[:n_cls]]
            if local is not None:
                l_rows = local[0] if local[1] is None else torch.cat([local[0], local[1].flatten(0, 1)])
                z_l = s_head.project(l_rows)
                parts.append(z_l[: local[0].shape[0]])
            if patch:
                parts.append(z_g[n_cls:][mb.index])
            z = torch.cat(parts)
        else:
            rows = [s_cls_g] + ([] if local is None else [local[0]]) + ([s_flat[mb.index]] if patch else [])
            z = s_head.project(torch.cat(rows))
        if s_head.shared_head:
            logits = s_head.last_layer(z)
            s_cls, s_patch_m = logits[:n_rows], logits[n_rows:]
        else:
            s_cls = s_head.last_layer(z[:n_rows])
            s_patch_m = s_head.last_layer2(z[n_rows:]) if patch else None

        v = n_global + n_local
        loss_cls = self.lambda1 * cls_distillation_loss(
            s_cls.reshape(v, b, -1), t_cls_probs.reshape(n_global, b, -1), self.student_temp
        )
        loss = loss_cls
        loss_patch = loss_koleo = None
        if patch:
            loss_patch = self.lambda2 * masked_patch_loss(s_patch_m, t_patch_probs, mb.weight, self.student_temp)
            loss = loss + loss_patch
        if self.koleo_weight > 0:
            loss_koleo = self.koleo_weight * torch.stack([koleo_loss(c) for c in s_cls_g.split(b)]).mean()
            loss = loss + loss_koleo

        if self.centering == "center":  # after the loss: this step used the previous centers
            with torch.no_grad():
                self._pending_centers = [(self.cls_center, t_cls.sum(0), t_cls.shape[0])]
                if patch:
                    if self.patch_center == "all":
                        self._pending_centers.append((self.patch_center_ema, patch_mean_logits.sum(0), n_cls))
                    else:
                        self._pending_centers.append((self.patch_center_ema, t_patch_m.sum(0), t_patch_m.shape[0]))
            if not self.defer_center_update:
                self.apply_center_update()

        det = lambda x: None if x is None else x.detach()  # noqa: E731
        return iBOTOutput(
            loss=loss,
            loss_cls=det(loss_cls),
            loss_patch=det(loss_patch),
            loss_koleo=det(loss_koleo),
            embedding=t_cls_tok,
            teacher_logits=t_cls.reshape(n_global, b, -1),
            student_logits=s_cls.reshape(v, b, -1),
            teacher_probs=t_cls_probs.reshape(n_global, b, -1),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def backbone(self) -> nn.Module:
        """The teacher backbone (the one evaluated and exported by default)."""
        return self.teacher["backbone"]

    def trainable_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]


class DINO(iBOT):
    """DINO: iBOT without the patch loss (no masking, no mask token), same code path.

    Parameters follow stable-pretraining's ``DINO``; keyword-only ones as :class:`iBOT`.
    """

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        temperature_student: float = 0.1,
        temperature_teacher_warmup: float = 0.04,
        temperature_teacher: float = 0.07,
        warmup_epochs_temperature_teacher: int = 30,
        center_momentum: float = 0.9,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        encoder_kwargs: dict | None = None,
        pretrained: bool = False,
        *,
        image_size: int = 224,
        drop_path_rate: float = 0.1,
        head_norm: str | None = None,
        head_act: str = "gelu",
        head_layers: int = 3,
        norm_last_layer: bool = True,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
        koleo_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            encoder_name,
            projector_hidden_dim,
            projector_bottleneck_dim,
            n_prototypes,
            n_prototypes,
            mask_ratio=0.0,
            patch_loss_weight=0.0,
            temperature_student=temperature_student,
            temperature_teacher_warmup=temperature_teacher_warmup,
            temperature_teacher=temperature_teacher,
            warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
            ema_decay_start=ema_decay_start,
            ema_decay_end=ema_decay_end,
            image_size=image_size,
            pretrained=pretrained,
            encoder_kwargs=encoder_kwargs,
            drop_path_rate=drop_path_rate,
            shared_head=True,
            head_norm=head_norm,
            head_act=head_act,
            head_layers=head_layers,
            norm_last_layer=norm_last_layer,
            centering=centering,
            sinkhorn_iterations=sinkhorn_iterations,
            center_momentum=center_momentum,
            koleo_loss_weight=koleo_loss_weight,
        )
        self.n_prototypes = n_prototypes
