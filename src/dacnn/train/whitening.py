"""Patch whitening of a model's first convolution from training images (airbench's frozen first layer).

airbench94 (arXiv 2404.00498) starts with a 2x2 conv whose 24 filters are the whitening eigenvectors of
the training images' 2x2 patches and their negatives, never trained. :func:`init_patch_whitening` does
that for any model whose first conv (``model.info.first_conv``, timm's ``first_conv``) is a free
``nn.Conv2d`` reading the image: a model with its own ``init_whitening`` (:class:`~dacnn.models.airbench.
Airbench`) uses it; otherwise the conv's ``out`` filters are the ``out // 2`` leading eigen-filters of
its ``k x k`` patches and their negatives (a last odd filter stays zero), and its weight is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from dacnn.errors import ConfigError
from dacnn.models.airbench import patch_whitening_weights

__all__ = ["init_patch_whitening", "WHITENING_IMAGES"]

WHITENING_IMAGES = 5000  # airbench: the first 5,000 training images


@torch.no_grad()
def init_patch_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> nn.Conv2d:
    """Set ``model``'s first conv as a frozen patch-whitening filter bank from ``images`` (normalised,
    (N, C, H, W)); returns that conv. A model without a free first conv raises :class:`ConfigError`."""
    info = getattr(model, "info", None)
    name = getattr(info, "first_conv", "") if info is not None else ""
    conv = model.get_submodule(name) if name else None
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.in_channels != images.shape[1]:
        model_name = getattr(info, "name", type(model).__name__)
        raise ConfigError(f"field 'whiten': model {model_name!r} has no free first conv reading the "
                          f"{images.shape[1]}-channel image (first_conv {name!r}); patch whitening needs one")
    if hasattr(model, "init_whitening"):
        model.init_whitening(images, eps)
    else:
        filters = patch_whitening_weights(images, conv.kernel_size, eps)
        half = min(conv.out_channels // 2, filters.shape[0] // 2)
        chosen = torch.cat((filters[:half], filters[filters.shape[0] // 2: filters.shape[0] // 2 + half]))
        conv.weight.zero_()
        conv.weight[: 2 * half].copy_(chosen.to(conv.weight.dtype))
    conv.weight.requires_grad_(False)
    return conv
