import torch

torch.set_num_threads(2)

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}


def tiny_ibot(cls=None, **kw):
    from ibot import iBOT

    cls = cls or iBOT
    args = dict(
        encoder_name="vit_tiny_patch16_224",
        projector_hidden_dim=64,
        projector_bottleneck_dim=32,
        image_size=32,
        encoder_kwargs=dict(TINY),
    )
    if cls is iBOT:
        args.update(n_cls_prototypes=40, n_patch_prototypes=40)
    else:
        args.update(n_prototypes=40)
    args.update(kw)
    return cls(**args)


def step_values(model, epoch=1, momentum=0.99, lr=1e-3, weight_decay=0.04, freeze_last_layer=False):
    """:class:`ibot.train.schedules.StepValues` for a :class:`TrainStep` call in tests: the model's own
    teacher temperatures at ``epoch``, fixed lr / weight decay / momentum, prototypes not frozen."""
    from ibot.train.schedules import StepValues

    cls_t, patch_t = model.teacher_temperatures(epoch)
    return StepValues(0, epoch, lr, weight_decay, momentum, cls_t, patch_t, freeze_last_layer)
