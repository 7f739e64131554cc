"""Kernel sharing as a plug-in: :func:`share_kernels` ties isomorphic convs of *any* model; :func:`untie`.

DACNN (arXiv 1904.09764) proposes anchoring as something to apply to existing CNNs; inter-layer
kernel sharing (arXiv 2210.14151) shares kernels between *isomorphic* layers, and ShaResNet
(arXiv 1702.08782) shares the 3x3 convs of a stage. :func:`share_kernels` does all three on models it
has never seen:

* **isomorphic** ``nn.Conv2d``: same in/out channels, kernel size, groups, dilation, bias presence,
  padding mode, dtype and device; stride by ``stride_policy`` (``"same"``: equal strides only,
  ``"unstrided"``: stride-1 convs only, as every reference does, ``"any"``: stride ignored; the
  shared kernel is applied with each use's own stride/padding);
* **scope**: ``"stage"`` ties convs whose *outputs have the same spatial size* in one forward pass of
  ``example_input`` (a ResNet stage, a DACNN section); ``"container"`` ties convs under the same
  innermost indexed container (``layer1.0.conv2`` and ``layer1.1.conv2`` are both in ``layer1``);
  ``"global"`` ties across the whole model;
* ``include`` / ``exclude``: fnmatch patterns on qualified names (or predicates ``(name, conv) ->
  bool``) choose which convs may be tied. ShaResNet's CIFAR rule on our names is
  ``include="*.conv2", exclude="stages.*.0.*"``; its ImageNet rule on torchvision names is
  ``include="*.conv2", stride_policy="unstrided"``.

Each group of two or more convs becomes one :class:`~dacnn.shared_kernel.SharedKernel` initialised from the
group's first conv (module order) and applied by an :class:`~dacnn.shared_kernel.AnchoredConv2d` per use.
The kernel is registered once, in a ``shared_kernels`` ModuleDict of the lowest common ancestor of the
group that is not a container (for a bare ``nn.Sequential`` root the root's class is switched to
:class:`KernelSequential`, which skips that dict in ``forward``). Norm layers are never touched, so
every use keeps its own BatchNorm. Compile (``torch.compile``) after sharing, not before.

:func:`untie` replaces every ``AnchoredConv2d`` by a free ``nn.Conv2d`` holding a copy of its kernel
(needed before conv-BN folding) and removes kernels nothing applies any more.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dacnn.errors import ConfigError
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses

__all__ = ["share_kernels", "untie", "ShareReport", "KernelGroup", "KernelSequential"]

Filter = str | Iterable[str] | Callable[[str, nn.Module], bool] | None
SCOPES = ("stage", "container", "global")
STRIDE_POLICIES = ("same", "unstrided", "any")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class KernelSequential(nn.Sequential):
    """An ``nn.Sequential`` that also owns a ``shared_kernels`` dict, left out of iteration/forward."""

    def _layers(self) -> list[nn.Module]:
        return [m for k, m in self._modules.items() if k != "shared_kernels"]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._layers())

    def __len__(self) -> int:
        return len(self._layers())

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):
            return nn.Sequential(*self._layers()[idx])
        return self._layers()[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self._layers():
            x = module(x)
        return x


@dataclass(frozen=True)
class KernelGroup:
    """One shared kernel: its qualified name, shape, and the layers that now apply it."""

    kernel: str
    shape: tuple[int, ...]
    uses: list[str]
    saved: int  # parameters removed by tying: (uses - 1) * kernel size


@dataclass
class ShareReport:
    """What :func:`share_kernels` did: groups, and the unique parameter count before/after."""

    groups: list[KernelGroup] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} shared kernels; parameters "
                 f"{self.params_before:,} -> {self.params_after:,}"]
        for g in self.groups:
            lines.append(f"  {g.kernel} {tuple(g.shape)} x{len(g.uses)}: {', '.join(g.uses)}")
        return "\n".join(lines)


def _matcher(spec: Filter, default: bool) -> Callable[[str, nn.Module], bool]:
    if spec is None:
        return lambda name, m: default
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _references(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``id(module) -> [(qualified name, parent, attribute)]`` for every place a module is registered."""
    refs: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                name = f"{parent_name}.{attr}" if parent_name else attr
                refs.setdefault(id(child), []).append((name, parent, attr))
    return refs


def _output_sizes(
    model: nn.Module, convs: list[nn.Module], example_input: torch.Tensor | None
) -> dict[int, tuple]:
    """``id(conv) -> sorted tuple of output (H, W)`` seen in one eval-mode forward pass."""
    if example_input is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        example_input = torch.zeros(2, first.in_channels, 32, 32, device=first.weight.device,
                                    dtype=first.weight.dtype)
    sizes: dict[int, set] = {id(c): set() for c in convs}
    hooks = [c.register_forward_hook(lambda m, i, o: sizes[id(m)].add(tuple(o.shape[-2:]))) for c in convs]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:
        raise ConfigError(
            f"share_kernels(scope='stage') runs the model once to find each conv's resolution, and "
            f"that failed on input of shape {tuple(example_input.shape)} ({exc}); pass example_input= "
            f"or use scope='container' or 'global'"
        ) from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {k: tuple(sorted(v)) for k, v in sizes.items()}


def _container_scope(name: str) -> str:
    """``layer1.0.conv2`` -> ``layer1``: the name up to the innermost numeric component."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    return ".".join(parts[: digits[-1]]) if digits else ".".join(parts[:-1])


def _host(model: nn.Module, names: list[str]) -> tuple[nn.Module, str]:
    """The lowest common non-container ancestor of ``names`` and its qualified name."""
    split = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    while prefix and isinstance(model.get_submodule(".".join(prefix)), _CONTAINERS):
        prefix.pop()
    path = ".".join(prefix)
    host = model.get_submodule(path) if path else model
    if type(host) is nn.Sequential:
        host.__class__ = KernelSequential
    elif isinstance(host, _CONTAINERS) and not isinstance(host, KernelSequential):
        raise ConfigError(f"share_kernels: cannot attach shared kernels to a bare {type(host).__name__}")
    return host, path


def _kernel_from(conv: nn.Conv2d) -> SharedKernel:
    kernel = SharedKernel(conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups,
                          bias=conv.bias is not None)
    kernel.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        kernel.weight.copy_(conv.weight)
        if conv.bias is not None:
            kernel.bias.copy_(conv.bias)
    kernel.weight.requires_grad_(conv.weight.requires_grad)
    return kernel


def share_kernels(
    model: nn.Module,
    scope: str = "stage",
    *,
    stride_policy: str = "same",
    include: Filter = None,
    exclude: Filter = None,
    example_input: torch.Tensor | None = None,
) -> ShareReport:
    """Tie isomorphic ``nn.Conv2d`` layers of ``model`` in place; returns a :class:`ShareReport`.

    See the module docstring for ``scope``, ``stride_policy``, ``include`` and ``exclude``. A conv
    registered under several parents or called several times is one candidate; convs that the
    ``"stage"`` forward pass never reaches are left alone.
    """
    if scope not in SCOPES:
        raise ConfigError(f"share_kernels: scope must be one of {SCOPES}, got {scope!r}")
    if stride_policy not in STRIDE_POLICIES:
        raise ConfigError(
            f"share_kernels: stride_policy must be one of {STRIDE_POLICIES}, got {stride_policy!r}"
        )
    keep, drop = _matcher(include, True), _matcher(exclude, False)
    params_before = sum(p.numel() for p in model.parameters())
    refs = _references(model)
    convs: list[tuple[str, nn.Conv2d]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros" or not keep(name, m) or drop(name, m):
            continue
        if stride_policy == "unstrided" and tuple(m.stride) != (1, 1):
            continue
        convs.append((name, m))
    report = ShareReport(params_before=params_before)
    if not convs:
        report.params_after = params_before
        return report
    sizes = _output_sizes(model, [c for _, c in convs], example_input) if scope == "stage" else {}

    groups: dict[tuple, list[tuple[str, nn.Conv2d]]] = {}
    for name, conv in convs:
        key: tuple = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups,
                      tuple(conv.dilation), conv.bias is not None, conv.weight.dtype, conv.weight.device)
        if stride_policy == "same":
            key += (tuple(conv.stride),)
        if scope == "stage":
            if not sizes[id(conv)]:
                continue  # never run: no resolution, leave it free
            key += (sizes[id(conv)],)
        elif scope == "container":
            key += (_container_scope(name),)
        groups.setdefault(key, []).append((name, conv))

    for members in groups.values():
        if len(members) < 2:
            continue
        all_names = [n for _, conv in members for n, _, _ in refs[id(conv)]]
        host, host_path = _host(model, all_names)
        if "shared_kernels" not in host._modules:
            if hasattr(host, "shared_kernels"):
                raise ConfigError(
                    f"share_kernels: {host_path or 'model'}.shared_kernels exists and is not a kernel dict"
                )
            host.shared_kernels = nn.ModuleDict()
        bank = host._modules["shared_kernels"]
        first = members[0][0]
        key = (first[len(host_path) + 1:] if host_path else first).replace(".", "_")
        while key in bank:
            key += "_"
        kernel = _kernel_from(members[0][1])
        bank[key] = kernel
        uses = []
        for _, conv in members:
            anchored = AnchoredConv2d(
                kernel, stride=conv.stride, padding=conv.padding, dilation=conv.dilation
            )
            anchored.train(conv.training)
            for ref_name, parent, attr in refs[id(conv)]:
                setattr(parent, attr, anchored)
                uses.append(ref_name)
        kernel_name = ".".join(p for p in (host_path, "shared_kernels", key) if p)
        report.groups.append(KernelGroup(kernel_name, tuple(kernel.weight.shape), uses,
                                         (len(members) - 1) * sum(p.numel() for p in kernel.parameters())))
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def untie(model: nn.Module) -> list[str]:
    """Replace every :class:`AnchoredConv2d` by a free ``nn.Conv2d`` with a copy of its kernel.

    Kernels that no use applies any more are removed (so no dead parameters remain). Returns the
    qualified names of the replaced layers. The forward pass computes the same function.
    """
    refs = _references(model)
    replaced: dict[int, nn.Conv2d] = {}
    touched: dict[int, SharedKernel] = {}
    names = []
    for _, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, AnchoredConv2d) or id(module) in replaced:
            continue
        k = module.kernel
        conv = nn.Conv2d(k.in_channels, k.out_channels, k.kernel_size, stride=module.stride,
                         padding=module.padding, dilation=module.dilation, groups=k.groups,
                         bias=k.bias is not None, device=k.weight.device, dtype=k.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(k.weight)
            if k.bias is not None:
                conv.bias.copy_(k.bias)
        conv.weight.requires_grad_(k.weight.requires_grad)
        conv.train(module.training)
        replaced[id(module)] = conv
        for ref_name, parent, attr in refs[id(module)]:
            setattr(parent, attr, conv)
            names.append(ref_name)
        touched[id(k)] = k
    still_used = anchored_uses(model)  # from the module tree, after the replacements
    for _, parent, attr in [r for rs in _references(model).values() for r in rs]:
        child = parent._modules.get(attr)
        if isinstance(child, SharedKernel) and id(child) in touched and id(child) not in still_used:
            del parent._modules[attr]
    for _, parent, attr in [r for rs in _references(model).values() for r in rs]:
        child = parent._modules.get(attr)
        if attr == "shared_kernels" and isinstance(child, nn.ModuleDict) and not len(child):
            del parent._modules[attr]
    for module in model.modules():
        if isinstance(module, KernelSequential) and "shared_kernels" not in module._modules:
            module.__class__ = nn.Sequential
    return names
