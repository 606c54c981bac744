"""High-level ``iBOT`` and ``DINO`` modules (stable-pretraining's API, extended for multi-crop).

One training step, as the official code computes it but without its wasted work:

* teacher (EMA, never masked, no drop-path) on all global crops in one backbone pass;
* student on the masked global crops in one pass and on all local crops in one pass;
* the last transformer block computes only the output tokens the losses read (:meth:`iBOT.reads`):
  the class tokens and the masked patch tokens of the student's global crops, the class tokens of
  its local crops, the teacher's class tokens and, unless the official patch center or a BatchNorm
  head reads every token, its masked patch tokens (``MaskedViT.forward(..., rows=)``; keys and
  values still come from every token);
* the head MLP runs once on the rows that matter: student CLS of every view plus the student's
  *masked* patch tokens (local patch tokens are never projected); the teacher projects its CLS
  tokens and either every patch token (``patch_center="all"``, needed for the official patch
  center, the default) or only the masked ones (``"masked"``, the DINOv2 choice);
* vectorised losses (:func:`ibot.losses.ibot_criterion`), centers updated after the loss.

A step is three parts, as DINOv2's ``SSLMetaArch``: :meth:`iBOT.teacher_targets` (no grad),
:meth:`iBOT.student_outputs` and the pure criterion; :meth:`iBOT.update_centers` moves the centers
afterwards (the training step calls it after its finite check). The model holds no epoch: the
teacher temperatures come with each call, the masks with the batch (the data side makes them).

The loss equals the official formulation (heads on all tokens, loop over view pairs) on the
same inputs; ``tests/test_methods.py`` checks it against an independent reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from ibot.data.loader import Batch
from ibot.data.masking import MaskBatch, MaskGenerator, sample_masks
from ibot.losses import Center, TeacherTemperatures, ibot_criterion, sinkhorn_knopp
from ibot.models.backbone import MaskedViT, create_vit, make_teacher_backbone, wrap_backbone
from ibot.models.head import iBOTHead


class ModelOutput:
    """Dict-like access to a dataclass output, as ``transformers.utils.ModelOutput`` (stable-pretraining).

    ``out.loss``, ``out["loss"]``, ``out[0]``, ``"loss_patch" in out``, ``dict(out)`` and ``**out``
    all work; as with ``ModelOutput``, fields that are ``None`` are absent from the mapping (and so
    are fields marked ``metadata={"mapping": False}``, read as attributes only).
    """

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if f.metadata.get("mapping", True) and getattr(self, f.name) is not None]

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
        targets: the step's :class:`TeacherTargets` (attribute only, not in the mapping), what
            :meth:`iBOT.update_centers` reads.
    """

    loss: torch.Tensor
    loss_cls: torch.Tensor | None = None
    loss_patch: torch.Tensor | None = None
    loss_koleo: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_probs: torch.Tensor | None = None
    targets: TeacherTargets | None = field(default=None, metadata={"mapping": False})


DINOOutput = iBOTOutput


@dataclass
class TeacherTargets:
    """What the teacher gives a step (no grad): the targets and the raw statistics of the centers.

    Attributes:
        features: (G*B, D) teacher CLS features (the output's ``embedding``).
        cls_logits: (G*B, K) fp32 raw CLS logits.
        cls_probs: (G*B, K) fp32 CLS targets (centered softmax or Sinkhorn-Knopp).
        patch_logits: (M, K_p) fp32 raw logits of the masked tokens, or None (no patch loss).
        patch_probs: (M, K_p) fp32 targets of the masked tokens, or None.
        patch_mean_logits: (G*B, K_p) fp32 per-image mean logits over every patch token (the
            official patch center, ``patch_center="all"``), or None.
    """

    features: torch.Tensor
    cls_logits: torch.Tensor
    cls_probs: torch.Tensor
    patch_logits: torch.Tensor | None = None
    patch_probs: torch.Tensor | None = None
    patch_mean_logits: torch.Tensor | None = None


@dataclass
class StudentOutputs:
    """What the student gives a step (with grad).

    Attributes:
        cls_logits: (V*B, K) CLS logits of every view, the G global views first, crop-major.
        patch_logits: (M, K_p) logits of the masked tokens of the global views, or None.
        global_features: (G*B, D) CLS features of the (masked) global views (KoLeo).
    """

    cls_logits: torch.Tensor
    patch_logits: torch.Tensor | None
    global_features: torch.Tensor


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
        masked_im_modeling: mask the student's global crops (official ``--use_masked_im_modeling``,
            default true). With ``patch_loss_weight=0`` it is the official ``--lambda2 0`` (the CLS
            loss sees masked student crops); ``False`` (needs ``patch_loss_weight=0``) is DINO.
        mask_generator: the :class:`ibot.data.masking.MaskGenerator` of the masks this module samples
            when a call brings none (``ibot.builders.model.build_model`` passes the collate's); None
            builds one from ``mask_shape``, ``mask_ratio`` ... Masks that come with the call (from
            the collate) are always used as they are.
        skip_unread_tokens: the last block of a ViT backbone computes only the tokens the losses
            read (:meth:`reads`); same loss and gradients as ``False`` (every token through every
            block), fewer FLOPs. Also an attribute, to switch at any time.
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
        masked_im_modeling: bool = True,
        mask_generator: MaskGenerator | None = None,
        skip_unread_tokens: bool = True,
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
        self.masked_im_modeling = bool(masked_im_modeling)
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
        self.ema_decay = (ema_decay_start, ema_decay_end)
        self.lambda1, self.lambda2, self.koleo_weight = cls_loss_weight, patch_loss_weight, koleo_loss_weight
        self.centering, self.sinkhorn_iterations, self.patch_center = centering, sinkhorn_iterations, patch_center
        self.cls_center = Center(n_cls_prototypes, center_momentum)
        self.patch_center_ema = Center(n_patch_prototypes, center_momentum)
        if mask_generator is None:
            mask_generator = MaskGenerator(mask_shape, mask_ratio, mask_ratio_var, mask_start_epoch, mask_probability)
        self.mask_generator = mask_generator  # only for calls that bring no masks
        # the run's one teacher-temperature schedule (Schedules reads it; the patch warm-up starts with the masks)
        self.teacher_temps = TeacherTemperatures(
            temperature_teacher_warmup,
            temperature_teacher,
            temperature_teacher_patch_warmup,
            temperature_teacher_patch,
            warmup_epochs_temperature_teacher,
            mask_generator.start_epoch,
        )
        self.skip_unread_tokens = bool(skip_unread_tokens)
        self._ema_pairs = self._pair_parameters()

    # ------------------------------------------------------------------ schedules and EMA
    def teacher_temperatures(self, epoch: int) -> tuple[float, float]:
        """(CLS, patch) teacher temperatures at ``epoch`` of the official per-epoch schedules (a pure
        function of ``epoch``; the patch warm-up starts at the mask start)."""
        return self.teacher_temps(epoch)

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
        # in place, no student-sized temporary: t += s * w (w a 0-d device tensor, broadcast)
        torch._foreach_addcmul_(t, s, [w] * len(s))

    @torch.no_grad()
    def update_centers(self, targets: TeacherTargets | None, apply: torch.Tensor | None = None) -> None:
        """Move both EMA centers toward the raw teacher logits of a step (after its loss).

        ``targets``: the step's :class:`TeacherTargets` (``out.targets``). The training step calls it
        after the finite check: ``apply`` (0-d bool on the device) False leaves the centers
        unchanged, so a skipped step cannot poison them. No-op with Sinkhorn-Knopp centering.
        """
        if self.centering != "center" or targets is None:
            return
        self.cls_center.update(targets.cls_logits.sum(0), targets.cls_logits.shape[0], apply)
        if targets.patch_mean_logits is not None:  # official: every token, per-image means
            self.patch_center_ema.update(targets.patch_mean_logits.sum(0), targets.patch_mean_logits.shape[0], apply)
        elif targets.patch_logits is not None:  # DINOv2: the masked tokens
            self.patch_center_ema.update(targets.patch_logits.sum(0), targets.patch_logits.shape[0], apply)

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

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        global_views: Sequence[torch.Tensor] | None = None,
        local_views: Sequence[torch.Tensor] | None = None,
        masks: MaskBatch | torch.Tensor | Sequence[torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
        temps: torch.Tensor | Sequence[float] | None = None,
        *,
        epoch: int | None = None,
        batch: Batch | None = None,
        update_centers: bool = True,
    ) -> iBOTOutput:
        """Training loss of views (stable-pretraining's API) or of a collate's :class:`Batch`.

        Args:
            global_views: G tensors (B, C, H, W), the unmasked global crops.
            local_views: L tensors (B, C, h, w), or None.
            masks: per global view (B, h', w') bool masks (list of G), a (G*B, N) tensor, or a
                :class:`MaskBatch`. None samples them with ``self.mask_generator``.
            images: (B, C, H, W): stable-pretraining's evaluation call, the teacher's CLS features
                as ``embedding`` with a zero loss. Evaluation code should call the backbone
                (``model.backbone.forward_cls(images)``), which this delegates to.
            temps: (CLS, patch) teacher temperatures of this step (floats, or a (2,) tensor: a
                compiled forward takes a tensor, so a new value does not recompile). The loop owns
                them: :class:`ibot.train.schedules.Schedules` gives ``values.teacher_temps``.
            epoch: without ``temps``, the temperatures are :meth:`teacher_temperatures` of this
                epoch (default 0, the start of the official warm-up); sampled masks (``masks``
                None) start at ``mask_start_epoch`` of this epoch (default 0).
            batch: a :class:`ibot.data.loader.Batch` from the collate, instead of the views (what
                the trainer passes); its masks are used as they are.
            update_centers: move the centers after the loss (plain use). The training step passes
                False and calls :meth:`update_centers` after its finite check.
        """
        if batch is None and images is not None:
            with torch.no_grad():  # stable-pretraining's evaluation mode: a delegate to the backbone
                cls = self.backbone.forward_cls(images)
            return iBOTOutput(loss=cls.new_zeros(()), embedding=cls)
        e = 0 if epoch is None else int(epoch)
        if batch is None:
            batch = self._views_batch(global_views, local_views, masks, e)
        out = self.step(batch, self.teacher_temperatures(e) if temps is None else temps)
        if update_centers:
            self.update_centers(out.targets)
        return out

    def _views_batch(self, global_views, local_views, masks, epoch: int) -> Batch:
        g_imgs, n_global = _cat_views(global_views)
        if g_imgs is None:
            raise ValueError(f"{type(self).__name__}.forward needs global_views or images")
        l_imgs, n_local = _cat_views(local_views)
        if n_global + n_local < 2:
            raise ValueError("need at least two views (e.g. 2 global views, or 1 global + local views)")
        mb = self._mask_batch(masks, g_imgs, n_global, epoch) if self.masked_im_modeling else None
        labels = torch.full((g_imgs.shape[0] // n_global,), -1, dtype=torch.long)
        return Batch(g_imgs, l_imgs, mb, labels, n_global, n_local)

    def _mask_batch(self, masks, g_imgs: torch.Tensor, n_global: int, epoch: int) -> MaskBatch:
        grid = self.student["backbone"].grid_size(g_imgs.shape[-2], g_imgs.shape[-1])
        if masks is None:
            mb = MaskBatch.from_masks(sample_masks(self.mask_generator, g_imgs.shape[0], grid, epoch=epoch), n_global)
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

    def step(self, batch: Batch, temps: torch.Tensor | Sequence[float]) -> iBOTOutput:
        """The training loss of a :class:`Batch` at teacher temperatures ``temps`` = (CLS, patch).

        Teacher targets, student outputs, the criterion; the centers are not moved here
        (:meth:`update_centers` with ``out.targets``, after the loss).
        """
        mb = batch.masks if self.masked_im_modeling else None
        if self.masked_im_modeling and mb is None:
            raise ValueError("this batch has no masks; build the collate with a mask generator")
        g, b, v = batch.n_global, batch.batch_size, batch.n_global + batch.n_local
        targets = self.teacher_targets(batch.global_crops, mb, temps)
        student = self.student_outputs(batch.global_crops, batch.local_crops, mb)
        terms = ibot_criterion(
            student.cls_logits.reshape(v, b, -1),
            targets.cls_probs.reshape(g, b, -1),
            student.patch_logits,
            targets.patch_probs,
            None if student.patch_logits is None else mb.weight,
            student_temp=self.student_temp,
            cls_weight=self.lambda1,
            patch_weight=self.lambda2,
            koleo_features=student.global_features.split(b) if self.koleo_weight > 0 else None,
            koleo_weight=self.koleo_weight,
        )
        det = lambda x: None if x is None else x.detach()  # noqa: E731
        return iBOTOutput(
            loss=terms["loss"],
            loss_cls=det(terms["loss_cls"]),
            loss_patch=det(terms["loss_patch"]),
            loss_koleo=det(terms["loss_koleo"]),
            embedding=targets.features,
            teacher_logits=targets.cls_logits.reshape(g, b, -1),
            student_logits=student.cls_logits.reshape(v, b, -1),
            teacher_probs=targets.cls_probs.reshape(g, b, -1),
            targets=targets,
        )

    def _patch_loss(self, masks: MaskBatch | None) -> bool:
        return masks is not None and self.use_patch_loss  # masked student crops may feed the CLS loss alone

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: torch.Tensor, masks: MaskBatch | None, temps: torch.Tensor | Sequence[float]
    ) -> TeacherTargets:
        """The teacher (EMA, unmasked global crops, no grad) and its targets at ``temps`` = (CLS, patch).

        The head runs once on the CLS tokens and the patch rows needed: every patch token for the
        official patch center (each image's mean logit is its mean bottleneck feature projected, as
        the prototype layer is linear and bias-free: the (G*B*N, K_p) logits are never built) or for a
        BatchNorm head (official statistics over every token), else the masked ones only.
        """
        cls_temp, patch_temp = temps[0], temps[1]
        t_head: iBOTHead = self.teacher["head"]
        n_cls = global_crops.shape[0]
        patch = self._patch_loss(masks)
        official_center = self.centering == "center" and self.patch_center == "all"
        bn = self.student["head"].batch_norm
        all_patches = bn or official_center
        rows = self.reads("teacher", masks)
        features, tokens = self.teacher["backbone"](global_crops, **({} if rows is None else {"rows": rows}))
        patch_rows = None
        if rows is not None:  # the backbone gave the masked rows only (none without the patch loss)
            patch_rows = tokens if patch else None
        elif (bn or patch) and tokens is not None:  # a pooled (CNN) backbone has no patch tokens
            flat = tokens.reshape(-1, tokens.shape[-1])
            patch_rows = flat if all_patches else flat[masks.index]
        z = t_head.project(features if patch_rows is None else torch.cat([features, patch_rows]))
        cls_logits = t_head.last_layer(z[:n_cls]).float()
        patch_logits = patch_mean = None
        if patch:
            z_patch = z[n_cls:]
            if all_patches:
                if official_center:
                    z_mean = z_patch.reshape(n_cls, tokens.shape[1], -1).float().mean(1)
                    patch_mean = t_head.patch_prototypes(z_mean.to(z_patch.dtype)).float()
                z_patch = z_patch[masks.index]
            patch_logits = t_head.patch_prototypes(z_patch).float()
        if self.centering == "center":
            cls_probs = self.cls_center.softmax(cls_logits, cls_temp)
            patch_probs = self.patch_center_ema.softmax(patch_logits, patch_temp) if patch else None
        else:
            cls_probs = sinkhorn_knopp(cls_logits, cls_temp, self.sinkhorn_iterations)
            patch_probs = sinkhorn_knopp(patch_logits, patch_temp, self.sinkhorn_iterations) if patch else None
        return TeacherTargets(features, cls_logits, cls_probs, patch_logits, patch_probs, patch_mean)

    def student_outputs(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: MaskBatch | None
    ) -> StudentOutputs:
        """The student on the masked global crops (one pass) and the local crops (one pass).

        The head runs on the CLS tokens of every view and the masked patch tokens only (local patch
        tokens are never projected); a BatchNorm head runs once per crop group over all its tokens,
        as the official head, then keeps the rows the loss reads.
        """
        s_head: iBOTHead = self.student["head"]
        n_cls = global_crops.shape[0]
        patch = self._patch_loss(masks)
        backbone = self.student["backbone"]
        rows = self.reads("student", masks)
        if rows is not None:  # the backbone computes the rows read only: CLS + masked tokens, local CLS
            cls_g, masked = backbone(global_crops, mask=None if masks is None else masks.masks, rows=rows)
            cls_l = None if local_crops is None else backbone(local_crops, rows=rows[:0])[0]
            z = s_head.project(torch.cat([cls_g] + ([] if cls_l is None else [cls_l]) + ([masked] if patch else [])))
            return self._student_logits(s_head, z, n_cls + (0 if cls_l is None else cls_l.shape[0]), patch, cls_g)
        cls_g, patch_g = backbone(global_crops, mask=None if masks is None else masks.masks)
        flat = None if patch_g is None else patch_g.reshape(-1, patch_g.shape[-1])
        local = None if local_crops is None else backbone(local_crops)
        n_rows = n_cls + (0 if local is None else local[0].shape[0])
        if s_head.batch_norm:
            z_g = s_head.project(cls_g if flat is None else torch.cat([cls_g, flat]))
            parts = [z_g[:n_cls]]
            if local is not None:
                l_rows = local[0] if local[1] is None else torch.cat([local[0], local[1].flatten(0, 1)])
                parts.append(s_head.project(l_rows)[: local[0].shape[0]])
            if patch:
                parts.append(z_g[n_cls:][masks.index])
            z = torch.cat(parts)
        else:
            rows = [cls_g] + ([] if local is None else [local[0]]) + ([flat[masks.index]] if patch else [])
            z = s_head.project(torch.cat(rows))
        return self._student_logits(s_head, z, n_rows, patch, cls_g)

    @staticmethod
    def _student_logits(
        s_head: iBOTHead, z: torch.Tensor, n_rows: int, patch: bool, cls_g: torch.Tensor
    ) -> StudentOutputs:
        """Prototype logits of the projected rows ``z``: ``n_rows`` CLS rows, then the masked tokens."""
        if s_head.shared_head:
            logits = s_head.last_layer(z)
            return StudentOutputs(logits[:n_rows], logits[n_rows:] if patch else None, cls_g)
        patch_logits = s_head.last_layer2(z[n_rows:]) if patch else None
        return StudentOutputs(s_head.last_layer(z[:n_rows]), patch_logits, cls_g)

    def reads(self, branch: str, masks: MaskBatch | None) -> torch.Tensor | None:
        """The patch rows the losses read from ``branch``'s ("student" / "teacher") global crops, as
        ``MaskedViT.forward(rows=)`` takes them, or None when its backbone must give every token.

        The masked tokens (``masks.index``) with the patch loss, else none (an empty tensor: the class
        tokens only; the student's local crops read their class tokens only). None: with
        :attr:`skip_unread_tokens` off, for a backbone other than a ViT (a Swin's class token pools
        every final token, a CNN has no tokens), for a BatchNorm head (official statistics over every
        token), and for the teacher with the official patch center (``patch_center="all"`` with
        ``centering="center"``: its mean over every patch token).
        """
        if not self.skip_unread_tokens or not isinstance(getattr(self, branch)["backbone"], MaskedViT):
            return None
        if self.student["head"].batch_norm:
            return None
        patch = self._patch_loss(masks)
        if branch == "teacher" and patch and self.centering == "center" and self.patch_center == "all":
            return None
        if patch:
            return masks.index
        return torch.empty(0, dtype=torch.long) if masks is None else masks.index[:0]

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
        skip_unread_tokens: bool = True,
    ) -> None:
        super().__init__(
            encoder_name,
            projector_hidden_dim,
            projector_bottleneck_dim,
            n_prototypes,
            n_prototypes,
            mask_ratio=0.0,
            patch_loss_weight=0.0,
            masked_im_modeling=False,
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
            skip_unread_tokens=skip_unread_tokens,
        )
        self.n_prototypes = n_prototypes
