"""iBOT projection head: MLP -> L2 norm -> weight-normalised prototypes (CLS and patch).

Parameter names follow the official ``iBOTHead`` (``mlp.{0,2,4}``, ``last_layer.weight_g``,
``last_layer.weight_v``, ``last_layer2.*``), so official checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation ``W = g * v / ||v||`` per output row.

    Same numbers and parameter names as ``nn.utils.weight_norm(nn.Linear(d, K, bias=False))``.
    With ``freeze_norm`` the gain ``weight_g`` is fixed at 1 (official ``norm_last_layer``).
    """

    def __init__(self, in_dim: int, out_dim: int, freeze_norm: bool = True) -> None:
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone()  # kaiming-uniform init
        self.weight_v = nn.Parameter(v)  # (K, d)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_norm)  # (K, 1)

    @property
    def out_features(self) -> int:
        return self.weight_v.shape[0]

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(*, d) -> (*, K)."""
        return F.linear(x, self.weight())


def _norm_layer(kind: str | None, dim: int) -> nn.Module | None:
    if kind in (None, "", "none"):
        return None
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    if kind == "ln":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown head norm {kind!r}; use 'none', 'bn' or 'ln'")


class iBOTHead(nn.Module):  # noqa: N801 - the method's name
    """3-layer MLP projection head with CLS and patch prototypes.

    Args:
        in_dim: backbone width D.
        out_dim: CLS prototypes K.
        patch_out_dim: patch prototypes K_p (ignored when ``shared_head``).
        shared_head: patch tokens use the CLS prototypes (``last_layer2`` is ``last_layer``).
        norm: None, "bn" or "ln" after each hidden linear layer (one module shared by all of them, as the
            official head). With "bn" the statistics are those of every row passed in: the official head
            sees every token of a crop group, and :class:`ibot.iBOT` passes the same rows.
        act: "gelu" or "relu".
        nlayers, hidden_dim, bottleneck_dim: MLP shape (official: 3, 2048, 256).
        norm_last_layer: freeze the prototype gains at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        *,
        shared_head: bool = False,
        norm: str | None = None,
        act: str = "gelu",
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if act not in ("gelu", "relu"):
            raise ValueError(f"unknown head activation {act!r}; use 'gelu' or 'relu'")
        if nlayers < 1:
            raise ValueError("the head needs at least one layer")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        # one norm module reused after every hidden layer, as the official DINOHead builds it
        # (``mlp.1`` and ``mlp.4`` are the same BatchNorm/LayerNorm: one set of weights and statistics)
        shared_norm = _norm_layer(norm, hidden_dim)
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if shared_norm is not None:
                    layers.append(shared_norm)
                layers.append(nn.GELU() if act == "gelu" else nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        self.shared_head = shared_head
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = None if shared_head else WeightNormLinear(bottleneck_dim, patch_out_dim, norm_last_layer)

    @property
    def batch_norm(self) -> bool:
        """True when the MLP normalises with batch statistics (``norm="bn"``, or SyncBatchNorm after conversion)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.mlp)

    @property
    def out_dim(self) -> int:
        return self.last_layer.out_features

    @property
    def patch_out_dim(self) -> int:
        return self.patch_prototypes.out_features

    @property
    def patch_prototypes(self) -> WeightNormLinear:
        return self.last_layer if self.last_layer2 is None else self.last_layer2

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(R, D) rows -> L2-normalised bottleneck (R, bottleneck)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, D) -> CLS logits (B, K); (B, 1+N, D) -> (CLS logits (B, K), patch logits (B, N, K_p))."""
        if x.ndim == 2:
            return self.last_layer(self.project(x))
        b, t, d = x.shape
        z = self.project(x.reshape(b * t, d)).reshape(b, t, -1)
        return self.last_layer(z[:, 0]), self.patch_prototypes(z[:, 1:])
