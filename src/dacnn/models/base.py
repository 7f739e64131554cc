"""timm's model interface, shared by every family.

``forward(x) == forward_head(forward_features(x))``; ``forward_head(x, pre_logits=True)`` returns the
pooled features the classifier reads (``num_features`` of them); :meth:`get_classifier` is the final
layer (its qualified name is ``classifier_name``, also recorded as ``ModelInfo.classifier``);
:meth:`reset_classifier` replaces it for ``num_classes`` outputs (``0``: identity).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassifierMixin"]


class ClassifierMixin:
    """Mixin for ``nn.Module`` subclasses ending in global pooling (``pool_name``) and a linear
    classifier (``classifier_name``); a family with another head overrides :meth:`forward_head`."""

    classifier_name: str = "fc"
    pool_name: str = "pool"
    num_classes: int
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.get_submodule(self.pool_name)(x), 1)  # type: ignore[attr-defined]
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)  # type: ignore[attr-defined]

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised ``Linear(num_features, num_classes)`` (``0``: ``nn.Identity``)."""
        self.num_classes = num_classes
        new = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        parent, _, leaf = self.classifier_name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, new)  # type: ignore[attr-defined]
