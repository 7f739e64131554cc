"""Filter visualisation by activation maximisation (DACNN paper section 4.3, Figure 7).

"First input an image of random noise, then we optimize the input image with respect to each
convolution layer using backpropagation." For every convolution layer (the output of its
conv + BN + ReLU) and each of its first ``filters`` channels, an input starting from noise is
optimised by gradient ascent on the channel's mean activation, with a small L2 penalty and the
pixels kept in range. The result is uint8 images, one row per layer, ready to plot or store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dacnn.checkpoint import atomic_write
from dacnn.models.dacnn import ConvBNReLU
from dacnn.shared_kernel import AnchoredConv2d

__all__ = ["visualised_layers", "activation_maximisation", "save_filters", "load_filters"]


def visualised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs are visualised: each conv + BN + ReLU block of a plain DACNN, else
    every convolution (free or anchored) in definition order."""

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ConvBNReLU)]
    if blocks:
        return blocks
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | AnchoredConv2d)]


def activation_maximisation(
    model: nn.Module,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    filters: int = 5,
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``(images uint8 (layers, filters, H, W, C), layer names)`` maximising each channel's mean output.

    The optimisation runs in the normalised input space of the trained model (``mean``/``std`` in
    0..1 units); pixels are clamped to [0, 1] after every step. ``layers`` restricts it to those
    names of :func:`visualised_layers`. Only the input is differentiated (``torch.autograd.grad``):
    the caller's model keeps its ``requires_grad`` flags, its gradients and (after the call) its mode.
    """
    was_training = model.training
    model.eval()
    try:
        return _maximise(model, input_size, mean, std, filters, steps, lr, l2, seed, layers)
    finally:
        model.train(was_training)


def _maximise(
    model: nn.Module, input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
    filters: int, steps: int, lr: float, l2: float, seed: int, names: Sequence[str] | None,
) -> tuple[np.ndarray, list[str]]:
    channels, height, width = input_size
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    low, high = (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t
    layers = visualised_layers(model)
    if names is not None:
        unknown = sorted(set(names) - {n for n, _ in layers})
        if unknown:
            raise ValueError(f"activation maximisation: no visualised layer named {unknown}")
        layers = [(n, m) for n, m in layers if n in set(names)]
    out = np.zeros((len(layers), filters, height, width, channels), dtype=np.uint8)
    gen = torch.Generator().manual_seed(seed)
    for li, (name, layer) in enumerate(layers):
        captured: dict[str, torch.Tensor] = {}
        handle = layer.register_forward_hook(lambda m, a, o, store=captured: store.__setitem__("out", o))
        try:
            x = (0.5 + 0.1 * torch.randn(filters, channels, height, width, generator=gen) - mean_t) / std_t
            x.requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                captured.clear()
                model(x)
                if "out" not in captured:
                    raise RuntimeError(f"activation maximisation: layer {name!r} was not called in forward")
                act = captured["out"]
                n = min(filters, act.shape[1])
                score = act[torch.arange(n), torch.arange(n)].mean(dim=(1, 2)).sum()
                loss = -score + l2 * (x ** 2).sum()
                (x.grad,) = torch.autograd.grad(loss, [x])
                optimizer.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
        finally:
            handle.remove()
        pixels = (x.detach() * std_t + mean_t).clamp(0, 1)
        out[li] = (pixels.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return out, [name for name, _ in layers]


def save_filters(path: Any, images: np.ndarray, layers: list[str]) -> None:
    """Write the images and layer names to an ``.npz`` file (atomically)."""
    from pathlib import Path


    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, layers=np.asarray(layers, dtype=np.str_))

    atomic_write(path, write)


def load_filters(path: Any) -> tuple[np.ndarray, list[str]]:
    """``(images, layer names)`` as written by :func:`save_filters`."""
    with np.load(path, allow_pickle=False) as npz:
        return npz["images"], [str(n) for n in npz["layers"]]
