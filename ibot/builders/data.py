"""Build the data pipeline pieces a config describes (shared by the trainer and the Lightning module)."""

from __future__ import annotations

from ibot.config import mask_cell, student_masked
from ibot.data.datasets import DatasetError, build_dataset
from ibot.data.device_augment import CropFlip, DecodedImages, DeviceAugment
from ibot.data.loader import EpochSampler, MultiCropCollate, MultiCropDataset
from ibot.data.masking import MaskGenerator
from ibot.data.transforms import AugmentSpec, BatchMultiCrop, MultiCropTransform


def resolve_pipeline(pipeline: str, in_memory: bool, device_type: str) -> str:
    """``data.pipeline=auto``: tensor for in-memory datasets; folders: gpu on CUDA, pil on the CPU."""
    if pipeline != "auto":
        return pipeline
    if in_memory:
        return "tensor"
    return "gpu" if device_type == "cuda" else "pil"


def dataset_from_config(cfg, train: bool = True):
    d, m = cfg.data, cfg.model
    return build_dataset(
        d.dataset,
        d.path,
        train=train,
        synthetic_size=d.synthetic_size,
        image_size=m.img_size,
        in_chans=m.in_chans,
        seed=cfg.run.seed,
        holdout=d.holdout,
        val_path=d.val_path,
        image_key=d.image_key,
        label_key=d.label_key,
        streaming=d.streaming,
    )


def stream_from_config(cfg, transform, rank: int = 0, world: int = 1):
    """``data.streaming=true``: this rank's :class:`ibot.data.hf_stream.HFStream` of the training rows, with
    ``transform`` (the pipeline's crops); its epoch length from :func:`ibot.data.hf_stream.epoch_steps`."""
    from ibot.data.hf_stream import HFStream, StreamSource, epoch_steps

    d, b = cfg.data, cfg.optim.batch_size
    source = StreamSource(d.path, image_key=d.image_key, label_key=d.label_key)
    holdout = 0.0 if d.val_path else d.holdout  # a separate evaluation set: every row trains
    niter = epoch_steps(source, b, world, holdout, d.steps_per_epoch)
    kw = dict(batch_size=b, niter=niter, seed=cfg.run.seed, rank=rank, world=world, holdout=holdout)
    return HFStream(source, transform, buffer_size=d.shuffle_buffer, **kw)


def mask_generator_from_config(cfg) -> MaskGenerator | None:
    """The run's one mask generator (the collate's, and the model's for calls without masks), or None
    when the student's crops are not masked."""
    if cfg.method != "ibot" or not student_masked(cfg):
        return None
    mk = cfg.mask
    return MaskGenerator(mk.shape, list(mk.ratio), list(mk.ratio_var), mk.start_epoch, mk.probability, mk.min_patches)


def collate_from_config(cfg) -> MultiCropCollate:
    d = cfg.data
    return MultiCropCollate(
        d.global_crops_number,
        d.local_crops_number,
        mask_cell(cfg),  # the mask grid: ViT patches, or Swin's coarse prediction cells
        mask_generator_from_config(cfg),
        seed=cfg.run.seed,
    )


def augment_spec_from_config(cfg) -> AugmentSpec:
    """The multi-crop recipe a config describes, for every pipeline (pil, tensor, gpu).

    ``model.img_size`` is the global crop size, ``model.in_chans`` the channels; the crop counts,
    scales, local size, ``blur_scale``, ``color_jitter_p`` and ``solarization_p`` come from ``data``;
    the knobs the config does not expose (jitter strengths, grayscale, blur probabilities and sigma
    range, normalisation) keep the official defaults of :class:`AugmentSpec`.
    """
    d, m = cfg.data, cfg.model
    return AugmentSpec(
        global_crops_number=d.global_crops_number,
        global_crop_size=m.img_size,
        global_crops_scale=tuple(d.global_crops_scale),
        local_crops_number=d.local_crops_number,
        local_crop_size=d.local_crop_size,
        local_crops_scale=tuple(d.local_crops_scale),
        in_chans=m.in_chans,
        color_jitter_p=d.color_jitter_p,
        blur_scale=d.blur_scale,
        solarization_p=d.solarization_p,
    )


def pil_transform_from_config(cfg) -> MultiCropTransform:
    """``data.pipeline=pil``: the torchvision recipe on PIL images, in the workers."""
    return MultiCropTransform(augment_spec_from_config(cfg))


def batch_augment_from_config(cfg) -> BatchMultiCrop:
    """``data.pipeline=tensor``: the vectorised recipe on uint8 in-memory batches."""
    return BatchMultiCrop(augment_spec_from_config(cfg))


def make_dataloader(cfg, num_workers: int | None = None, shuffle: bool = True):
    """A standard DataLoader of multi-crop :class:`ibot.data.loader.Batch` es with collate-side masks.

    Its sampler is an :class:`ibot.data.loader.EpochSampler` (``with_epoch=True``), the one source of
    the epoch: the permutation, the crops (seeded by (seed, epoch, index)), the masks and their start
    at ``mask.start_epoch`` follow ``loader.sampler.set_epoch(epoch)``, which Lightning calls every
    epoch (also through its DDP sampler wrapper); a plain loop calls :func:`set_data_epoch`.
    """
    import torch

    if cfg.data.streaming:
        raise DatasetError(
            "data.streaming=true trains with `ibot pretrain` (its loader resumes the stream); "
            "this DataLoader reads map-style data: set data.streaming=false"
        )
    ds = MultiCropDataset(dataset_from_config(cfg), pil_transform_from_config(cfg), seed=cfg.run.seed)
    sampler = EpochSampler(len(ds), cfg.optim.batch_size, cfg.run.seed, 0, shuffle=shuffle, with_epoch=True)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.optim.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_from_config(cfg),
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
    )


def set_data_epoch(loader, epoch: int) -> None:
    """Move a loader with an epoch sampler (:func:`make_dataloader`) to ``epoch``: ``sampler.set_epoch``.

    Takes effect at the next ``iter(loader)``; the epoch travels with the indices, so persistent
    workers follow too. A loader whose sampler has no ``set_epoch`` is refused (its epoch could not move).
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
            return
    raise ValueError("set_data_epoch needs a loader whose sampler has set_epoch (make_dataloader's EpochSampler)")


def crop_flip_from_config(cfg) -> CropFlip:
    """Worker half of ``data.pipeline=gpu``: uint8 random resized crops and flips."""
    return CropFlip(augment_spec_from_config(cfg))


def crop_flip_dataset_from_config(cfg, dataset) -> MultiCropDataset:
    """The workers' dataset of ``data.pipeline=gpu``: image files are decoded by torchvision and
    cropped by torch (twice as fast as stock Pillow); other datasets go through PIL."""
    if DecodedImages.supports(dataset):
        dataset = DecodedImages(dataset, cfg.model.in_chans)
    return MultiCropDataset(dataset, crop_flip_from_config(cfg), seed=cfg.run.seed)


def device_augment_from_config(cfg) -> DeviceAugment:
    """Device half of ``data.pipeline=gpu``: jitter, grayscale, blur, solarize, normalise."""
    return DeviceAugment(augment_spec_from_config(cfg))
