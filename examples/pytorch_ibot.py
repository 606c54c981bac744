"""iBOT with a plain PyTorch loop, composed by hand from the library's blocks (no config, no Lightning).

python examples/pytorch_ibot.py                 # 64 synthetic 32-px images, a 2-block ViT: seconds on a CPU
python examples/pytorch_ibot.py --epochs 5

The blocks: an epoch sampler (the data's one epoch: the permutation, and with each index the epoch
that seeds the crops and masks), a multi-crop transform, a collate that makes the block masks, the
``iBOT`` module (student, EMA teacher, heads, centers, loss), the official per-step schedules (lr,
weight decay, teacher momentum and temperatures, last-layer freeze, one object indexed by the global
step), parameter groups and per-parameter clipping. The loop owns the sampler's epoch, the optimizer
step and the EMA update; the model, the dataset, the collate and the mask generator hold no epoch.
"""

import argparse

import torch

from ibot import iBOT
from ibot.data.datasets import build_dataset
from ibot.data.loader import EpochSampler, MultiCropCollate, MultiCropDataset
from ibot.data.masking import MaskGenerator
from ibot.data.transforms import AugmentSpec, MultiCropTransform
from ibot.train.optim import clip_gradients, drop_last_layer_grads, param_groups
from ibot.train.schedules import Schedules


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    # data: 2 global 32-px crops + 2 local 16-px crops per image; block masks on the 4x4 patch grid
    images = build_dataset("synthetic", train=True, synthetic_size=64, image_size=32)
    transform = MultiCropTransform(AugmentSpec(2, 32, (0.4, 1.0), 2, 16, (0.05, 0.4)))
    dataset = MultiCropDataset(images, transform, seed=0)  # crops seeded by (seed, epoch, index)
    sampler = EpochSampler(len(dataset), args.batch_size, seed=0, epoch=0, with_epoch=True)
    mask_generator = MaskGenerator("block", ratio=[0.0, 0.3], ratio_var=[0.0, 0.2], start_epoch=0)
    collate = MultiCropCollate(2, 2, mask_cell=8, mask_generator=mask_generator, seed=0)  # cell = the ViT patch
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, collate_fn=collate
    )

    # model: a 2-block ViT with 8-px patches, 64 prototypes shared by the CLS and patch heads
    model = iBOT(
        "vit_tiny_patch16_224",
        projector_hidden_dim=64,
        projector_bottleneck_dim=32,
        n_cls_prototypes=64,
        n_patch_prototypes=64,
        mask_ratio=[0.0, 0.3],
        mask_ratio_var=[0.0, 0.2],
        warmup_epochs_temperature_teacher=1,
        image_size=32,
        encoder_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        shared_head=True,
        mask_generator=mask_generator,  # the collate's (used only for calls that bring no masks)
    )

    # official per-step schedules: lr scaled by batch / 256 with a warm-up of one epoch, weight decay
    # 0.04 -> 0.4, teacher momentum 0.996 -> 1, teacher temperatures warmed up over one epoch, the
    # prototypes frozen during epoch 0
    steps_per_epoch = len(loader)
    lr = args.lr * args.batch_size / 256
    schedules = Schedules(args.epochs, steps_per_epoch, lr=lr, warmup_epochs=1, teacher_temps=model.teacher_temps)
    optimizer = torch.optim.AdamW(param_groups(model.student))
    params = model.trainable_parameters()

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # new order, crops and masks every epoch; masks start at start_epoch
        model.train()
        for i, batch in enumerate(loader):
            v = schedules[epoch * steps_per_epoch + i]
            for g, group in enumerate(optimizer.param_groups):
                group["lr"] = v.lr
                if g == 0:  # the group with weight decay
                    group["weight_decay"] = v.weight_decay
            out = model(batch=batch, temps=v.teacher_temps)  # CLS + masked-patch self-distillation
            optimizer.zero_grad()
            out["loss"].backward()
            clip_gradients(params, 3.0)  # per-parameter, as the official code
            if v.freeze_last_layer:
                drop_last_layer_grads(model.student)
            optimizer.step()
            model.update_teacher(v.momentum)  # EMA teacher
        print(f"epoch {epoch}: loss {out.loss.item():.4f} (cls {out.loss_cls:.4f}, patch {out.loss_patch:.4f})")
    return model, loader


if __name__ == "__main__":
    main()
