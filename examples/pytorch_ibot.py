"""iBOT with a plain PyTorch loop, composed by hand from the library's blocks (no config, no Lightning).

python examples/pytorch_ibot.py                 # 64 synthetic 32-px images, a 2-block ViT: seconds on a CPU
python examples/pytorch_ibot.py --epochs 5

The blocks: a multi-crop transform (per-sample seeded by epoch), a collate that makes the block
masks, the ``iBOT`` module (student, EMA teacher, heads, centers, loss), the official per-step
schedules, parameter groups, per-parameter clipping and last-layer freezing. The loop owns four
calls per epoch/step: the data's epoch, the model's epoch, the optimizer step and the EMA update.
"""

import argparse

import torch

from ibot import iBOT
from ibot.data.datasets import build_dataset
from ibot.data.loader import MultiCropCollate, MultiCropDataset
from ibot.data.masking import MaskGenerator
from ibot.data.transforms import AugmentSpec, MultiCropTransform
from ibot.train.optim import cancel_last_layer_grads, clip_gradients, param_groups
from ibot.train.schedules import cosine_scheduler


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
    dataset = MultiCropDataset(images, transform, seed=0)
    mask_generator = MaskGenerator("block", ratio=[0.0, 0.3], ratio_var=[0.0, 0.2], start_epoch=0)
    collate = MultiCropCollate(2, 2, patch_size=8, mask_generator=mask_generator, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate
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
    )

    # official per-step schedules (lr scaled by batch / 256, warm-up of one epoch)
    steps_per_epoch = len(loader)
    total = args.epochs * steps_per_epoch
    lr = cosine_scheduler(args.lr * args.batch_size / 256, 1e-6, args.epochs, steps_per_epoch, warmup_epochs=1)
    wd = cosine_scheduler(0.04, 0.4, args.epochs, steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model.student))
    params = model.trainable_parameters()

    for epoch in range(args.epochs):
        dataset.epoch = collate.epoch = epoch  # new crops and masks every epoch
        mask_generator.set_epoch(epoch)  # masks start at mask start_epoch
        model.set_epoch(epoch)  # teacher temperatures
        model.train()
        for i, batch in enumerate(loader):
            step = epoch * steps_per_epoch + i
            for g, group in enumerate(optimizer.param_groups):
                group["lr"] = lr[step]
                if g == 0:  # the group with weight decay
                    group["weight_decay"] = wd[step]
            out = model(batch=batch, epoch=epoch)  # CLS + masked-patch self-distillation
            optimizer.zero_grad()
            out["loss"].backward()
            clip_gradients(params, 3.0)  # per-parameter, as the official code
            cancel_last_layer_grads(model.student, epoch, 1)  # prototypes frozen in epoch 0
            optimizer.step()
            model.update_teacher(model.ema_momentum(step, total))  # EMA teacher, cosine 0.996 -> 1
        print(f"epoch {epoch}: loss {out.loss.item():.4f} (cls {out.loss_cls:.4f}, patch {out.loss_patch:.4f})")
    return model, loader


if __name__ == "__main__":
    main()
