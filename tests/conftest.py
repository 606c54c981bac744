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
