"""iBOT with a plain PyTorch loop, assembled from the library's building blocks.

python examples/pytorch_ibot.py                 # the smoke preset: seconds on a CPU
python examples/pytorch_ibot.py preset=fmnist_tiny optim.epochs=1
"""

import sys

import torch

from ibot.config import build_config, build_model
from ibot.lightning import make_dataloader
from ibot.train.optim import cancel_last_layer_grads, clip_gradients, param_groups
from ibot.train.schedules import cosine_scheduler


def main(argv):
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), "smoke")
    cfg = build_config(preset, [a for a in argv if not a.startswith("preset=")])
    model = build_model(cfg)  # ibot.iBOT: student, EMA teacher, centers
    loader = make_dataloader(cfg, num_workers=0)  # multi-crop views + block masks made in the collate
    o = cfg.optim
    niter = len(loader)
    lr = cosine_scheduler(o.lr * o.batch_size / 256, o.min_lr, o.epochs, niter, warmup_epochs=o.warmup_epochs)
    wd = cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, niter)
    momentum = cosine_scheduler(o.momentum_teacher, 1.0, o.epochs, niter)
    optimizer = torch.optim.AdamW(param_groups(model.student))
    params = model.trainable_parameters()
    for epoch in range(o.epochs):
        model.set_epoch(epoch)
        loader.collate_fn.epoch = epoch
        for i, batch in enumerate(loader):
            it = epoch * niter + i
            for g, group in enumerate(optimizer.param_groups):
                group["lr"] = lr[it]
                if g == 0:
                    group["weight_decay"] = wd[it]
            out = model(batch=batch, epoch=epoch)  # CLS + masked-patch self-distillation
            optimizer.zero_grad()
            out.loss.backward()
            clip_gradients(params, o.clip_grad)
            cancel_last_layer_grads(model.student, epoch, o.freeze_last_layer)
            optimizer.step()
            model.update_teacher(momentum[it])  # EMA teacher
        print(f"epoch {epoch}: loss {out.loss.item():.4f}")
    return model


if __name__ == "__main__":
    main(sys.argv[1:])
