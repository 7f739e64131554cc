"""Kernel sharing as a plug-in: :func:`share_kernels` ties isomorphic convs of *any* model; :func:`untie`.

DACNN (arXiv 1904.09764) proposes anchoring as something to apply to existing CNNs; inter-layer
kernel sharing (arXiv 2210.14151) shares kernels between *isomorphic* layers, and ShaResNet
(arXiv 1702.08782) shares the 3x3 convs of a stage. :func:`share_kernels` does all three on models it
has never seen, and ties only what cannot change the function:

* **safe**: a conv is a candidate only if it is an ``nn.Conv2d`` whose class does not override
  ``forward``/``_conv_forward``, with no parameter but ``weight``/``bias``, no buffer, child,
  parametrization or hook, zero padding mode and a ``weight`` no other module also owns. Everything
  else stays free and ``report.skipped`` says why (``{"stem.conv": "overrides forward (StdConv2d)"}``);
* **isomorphic**: same in/out channels, kernel size, groups, dilation, bias presence, dtype, device and
  ``requires_grad`` of weight and bias; stride by ``stride_policy`` (``"same"``: equal strides only,
  ``"unstrided"``: stride-1 convs only, as every reference does, ``"any"``: stride ignored). Each use
  keeps its own stride and padding;
* **scope** (which isomorphic convs form one group):

  - ``"stage"``: same output resolution in one eval forward of ``example_input`` (a ResNet stage,
    a DACNN section): ``share_kernels(resnet, "stage")`` ties ``layer2.1.conv1`` with ``layer2.3.conv2``;
  - ``"container"``: same enclosing container. With ``containers=`` (fnmatch patterns or a predicate
    on ``(name, module)``) that is the innermost enclosing module the user names
    (``containers="features.denseblock*"``); by default it is the parent of the conv's innermost
    *block*, a block being an ancestor held by an ``nn.Sequential``/``ModuleList``/``ModuleDict`` or
    beside a sibling of its class (``layer1.0.conv2`` -> ``layer1``,
    ``denseblock1.denselayer2.conv1`` -> ``denseblock1``, ``s1.first.conv`` -> ``s1`` when ``s1``
    holds two blocks of one class); a conv in no block belongs to its parent, so on a flat
    ``nn.Sequential`` ``"container"`` is ``"global"``;
  - ``"global"``: the whole model, ``share_kernels(wrn, "global", include="*.conv2")``;
* ``include`` / ``exclude``: fnmatch patterns on qualified names (or predicates ``(name, conv) ->
  bool``). ShaResNet's CIFAR rule on our names is ``include="*.conv2", exclude="stages.*.0.*"``; its
  ImageNet rule on torchvision names is ``include="*.conv2", stride_policy="unstrided"``;
* ``budget``: tie the groups that save the most first, only until the model has at most
  ``max_params`` (or ``ratio`` x the original) parameters; see :class:`Budget`.

Each group of two or more convs becomes one :class:`~dacnn.shared_kernel.SharedKernel` holding the group's
first conv's (module order) ``weight``/``bias`` tensors, applied by an
:class:`~dacnn.shared_kernel.AnchoredConv2d` put in each conv's place. The kernel is registered as
``kernel`` under the group's first use (``layer1.0.conv2.kernel.weight``), so no module gains a child
and modules that iterate their children, ``nn.Sequential`` subclasses and ``ModuleList`` users keep
working. Norm layers are never touched, so every use keeps its own BatchNorm. Compile
(``torch.compile``) after sharing, not before.

:func:`untie` puts a free conv of the original class, with a copy of its kernel, back in each use's
place (needed before conv-BN folding): the original parameter names and count come back, so a
checkpoint of the original model loads.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from dacnn.errors import ConfigError
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses

__all__ = ["share_kernels", "untie", "unsafe_reason", "Budget", "ShareReport", "KernelGroup"]

Filter = str | Iterable[str] | Callable[[str, nn.Module], bool] | None
SCOPES = ("stage", "container", "global")
STRIDE_POLICIES = ("same", "unstrided", "any")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# methods that, overridden by a Conv2d subclass, may make it compute something else than F.conv2d
_FUNCTION_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl", "__getattr__", "__getattribute__")
_ORIGINAL = "_original_conv"  # attribute of a use made by share_kernels: the conv it replaced, emptied


@dataclass(frozen=True)
class Budget:
    """Parameter target of :func:`share_kernels`: at most ``max_params``, or ``ratio`` x the original.

    Accepted wherever a budget is: ``Budget(ratio=0.5)``, ``{"max_params": 1_000_000}`` or the CLI
    string ``"ratio=0.5"`` / ``"max_params=1000000"``.
    """

    max_params: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.max_params is None) == (self.ratio is None):
            raise ConfigError("budget: give exactly one of max_params=N or ratio=R")
        if self.ratio is not None and not (isinstance(self.ratio, int | float) and 0 < self.ratio <= 1):
            raise ConfigError(f"budget: ratio must be in (0, 1], got {self.ratio!r}")
        if self.max_params is not None and not (isinstance(self.max_params, int) and self.max_params >= 0):
            raise ConfigError(f"budget: max_params must be a non-negative integer, got {self.max_params!r}")

    @classmethod
    def parse(cls, spec: Budget | Mapping[str, Any] | str) -> Budget:
        """A :class:`Budget` from itself, a one-key mapping or ``"max_params=N"`` / ``"ratio=R"``."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            key, sep, value = spec.partition("=")
            key = key.strip()
            if not sep or key not in ("max_params", "ratio"):
                raise ConfigError(f"budget {spec!r}: expected max_params=N or ratio=R (e.g. ratio=0.5)")
            try:
                number: int | float = float(value) if key == "ratio" else int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"budget {spec!r}: {value.strip()!r} is not a number") from None
            return cls(**{key: number})
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"max_params", "ratio"}
            if unknown:
                raise ConfigError(f"budget: unknown key(s) {sorted(unknown)}; use max_params or ratio")
            return cls(**dict(spec))
        raise ConfigError(f"budget: expected Budget, a mapping or 'max_params=N'/'ratio=R', got {spec!r}")

    def target(self, params_before: int) -> int:
        """The largest parameter count that meets the budget."""
        return self.max_params if self.max_params is not None else int(self.ratio * params_before)

    def __str__(self) -> str:
        return f"max_params={self.max_params}" if self.max_params is not None else f"ratio={self.ratio}"


@dataclass(frozen=True)
class KernelGroup:
    """One shared kernel: its qualified name, shape, and the layers that now apply it."""

    kernel: str
    shape: tuple[int, ...]
    uses: list[str]
    saved: int  # parameters removed by tying: (uses - 1) * kernel size


@dataclass
class ShareReport:
    """What :func:`share_kernels` did.

    ``params_before - sum(g.saved for g in groups) == params_after == count_params(model).unique``;
    ``skipped`` maps every ``nn.Conv2d`` left free to the reason; ``floor`` is the count if every
    eligible group were tied (the least a budget can reach); ``target`` the budget's count, if any.
    """

    groups: list[KernelGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    floor: int = 0
    target: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        head = (f"{len(self.groups)} shared kernels; parameters {self.params_before:,} -> "
                f"{self.params_after:,} ({ratio:.3f} of the original)")
        if self.target is not None:
            head += f"; budget {self.target:,}, floor {self.floor:,}"
        lines = [head]
        for g in self.groups:
            uses = ", ".join(g.uses)
            lines.append(f"  {g.kernel} {tuple(g.shape)} x{len(g.uses)}, saves {g.saved:,}: {uses}")
        if self.skipped:
            lines.append(f"  free ({len(self.skipped)}):")
            lines += [f"    {name}: {why}" for name, why in self.skipped.items()]
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


def unsafe_reason(conv: nn.Conv2d) -> str | None:
    """Why replacing ``conv`` by a plain use of a shared kernel could change the model, or ``None``."""
    cls = type(conv)
    if parametrize.is_parametrized(conv):
        return f"parametrized ({', '.join(conv.parametrizations)})"
    for klass in cls.__mro__[: cls.__mro__.index(nn.Conv2d)]:
        overridden = [m for m in _FUNCTION_METHODS if m in vars(klass)]
        if overridden:
            return f"{klass.__name__} overrides {', '.join(overridden)}"
    if any(m in vars(conv) for m in _FUNCTION_METHODS):
        return "forward replaced on the instance"
    extra = [k for k, p in conv._parameters.items() if p is not None and k not in ("weight", "bias")]
    if extra or not isinstance(conv._parameters.get("weight"), nn.Parameter):
        return f"has parameters other than weight/bias: {', '.join(extra) or 'no weight parameter'}"
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters(recurse=False)):
        return "lazy parameters not initialised yet"
    buffers = [k for k, b in conv._buffers.items() if b is not None]
    if buffers:
        return f"has buffers: {', '.join(buffers)}"
    hooks = sorted(k for k, v in vars(conv).items() if "hooks" in k and isinstance(v, dict) and v)
    if hooks:
        return f"has hooks: {', '.join(hooks)}"
    if conv._modules:
        return f"has child modules: {', '.join(conv._modules)}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (shared uses pad with zeros)"
    return None


def _output_sizes(
    model: nn.Module, convs: list[nn.Module], example_input: torch.Tensor | None
) -> dict[int, tuple]:
    """``id(conv) -> sorted tuple of output (H, W)`` seen in one eval-mode forward pass."""
    if example_input is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        weight = convs[0].weight
        example_input = torch.zeros(2, first.in_channels, 32, 32, device=weight.device, dtype=weight.dtype)
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


def _container_of(model: nn.Module, name: str, named: Callable[[str, nn.Module], bool] | None) -> str | None:
    """The qualified name of ``name``'s container (see the module docstring); ``None``: in none named."""
    parts = name.split(".")
    if named is not None:
        for i in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:i])
            if named(path, model.get_submodule(path)):
                return path
        return None
    for i in range(len(parts) - 1, 0, -1):
        block, parent_path = model.get_submodule(".".join(parts[:i])), ".".join(parts[: i - 1])
        parent = model.get_submodule(parent_path) if parent_path else model
        siblings = [c for k, c in parent._modules.items() if k != parts[i - 1] and c is not None]
        if isinstance(parent, _CONTAINERS) or any(type(c) is type(block) for c in siblings):
            return parent_path
    return ".".join(parts[:-1])


def _numel(conv: nn.Conv2d) -> int:
    return conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)


def _tie(members: list[tuple[str, nn.Conv2d]], refs: dict) -> KernelGroup:
    """Put one use of a new kernel (the first member's tensors) in every member's place."""
    first = members[0][1]
    saved = (len(members) - 1) * _numel(first)
    with torch.device("meta"):  # the tensors are the first conv's: allocate and draw nothing here
        kernel = SharedKernel(first.in_channels, first.out_channels, first.kernel_size,
                              groups=first.groups, bias=first.bias is not None)
    kernel.weight, kernel.bias = first.weight, first.bias
    uses: list[str] = []
    for i, (_, conv) in enumerate(members):
        use = AnchoredConv2d(kernel, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        use.train(conv.training)
        if i == 0:
            use._modules["kernel"] = kernel  # the owner: registered once, under the first use
        conv.weight, conv.bias = None, None  # no stale copy is kept; untie refills it
        object.__setattr__(use, _ORIGINAL, conv)
        for ref_name, parent, attr in refs[id(conv)]:
            setattr(parent, attr, use)
            uses.append(ref_name)
    return KernelGroup(f"{uses[0]}.kernel", tuple(kernel.weight.shape), uses, saved)


def _candidates(
    model: nn.Module, keep: Callable, drop: Callable, stride_policy: str, skipped: dict[str, str]
) -> list[tuple[str, nn.Conv2d]]:
    """The convs that may be tied, in module order; every other ``nn.Conv2d`` goes to ``skipped``."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    convs = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        why = unsafe_reason(m)
        if why is None and owners[id(m.weight)] > 1:
            why = "its weight is also registered in another module (Parameter aliasing)"
        if why is None and not keep(name, m):
            why = "not matched by include"
        if why is None and drop(name, m):
            why = "matched by exclude"
        if why is None and stride_policy == "unstrided" and tuple(m.stride) != (1, 1):
            why = f"stride {tuple(m.stride)} (stride_policy='unstrided')"
        if why is None:
            convs.append((name, m))
        else:
            skipped[name] = why
    return convs


def _groups(
    model: nn.Module, convs: list[tuple[str, nn.Conv2d]], scope: str, stride_policy: str,
    named: Callable | None, example_input: torch.Tensor | None, skipped: dict[str, str],
) -> list[list[tuple[str, nn.Conv2d]]]:
    """Groups of two or more isomorphic convs in one scope; convs left alone go to ``skipped``."""
    sizes = _output_sizes(model, [c for _, c in convs], example_input) if scope == "stage" and convs else {}
    groups: dict[tuple, list[tuple[str, nn.Conv2d]]] = {}
    for name, conv in convs:
        key: tuple = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups,
                      tuple(conv.dilation), conv.bias is not None, conv.weight.dtype, conv.weight.device,
                      conv.weight.requires_grad, conv.bias is not None and conv.bias.requires_grad)
        if stride_policy == "same":
            key += (tuple(conv.stride),)
        if scope == "stage":
            if not sizes[id(conv)]:
                skipped[name] = "never ran in the example forward pass (scope='stage')"
                continue
            key += (sizes[id(conv)],)
        elif scope == "container":
            where = _container_of(model, name, named)
            if where is None:
                skipped[name] = "in no module matched by containers"
                continue
            key += (where,)
        groups.setdefault(key, []).append((name, conv))
    for members in groups.values():
        if len(members) == 1:
            skipped[members[0][0]] = f"no isomorphic conv to tie with in its scope ({scope!r})"
    return [g for g in groups.values() if len(g) > 1]


def share_kernels(
    model: nn.Module,
    scope: str = "stage",
    *,
    stride_policy: str = "same",
    include: Filter = None,
    exclude: Filter = None,
    containers: Filter = None,
    budget: Budget | Mapping[str, Any] | str | None = None,
    example_input: torch.Tensor | None = None,
) -> ShareReport:
    """Tie isomorphic ``nn.Conv2d`` layers of ``model`` in place; returns a :class:`ShareReport`.

    See the module docstring for the arguments. A conv registered under several parents or called
    several times is one candidate; convs that the ``"stage"`` forward pass never reaches stay free.
    With ``budget``, groups are tied largest saving first until the target is met; a target below the
    floor raises :class:`~dacnn.errors.ConfigError` naming the floor, and leaves the model unchanged.
    """
    if scope not in SCOPES:
        raise ConfigError(f"share_kernels: scope must be one of {SCOPES}, got {scope!r}")
    if stride_policy not in STRIDE_POLICIES:
        raise ConfigError(
            f"share_kernels: stride_policy must be one of {STRIDE_POLICIES}, got {stride_policy!r}"
        )
    if containers is not None and scope != "container":
        raise ConfigError(f"share_kernels: containers= needs scope='container', got scope={scope!r}")
    plan = Budget.parse(budget) if budget is not None else None
    named = _matcher(containers, False) if containers is not None else None
    report = ShareReport(params_before=sum(p.numel() for p in model.parameters()))
    keep, drop = _matcher(include, True), _matcher(exclude, False)
    convs = _candidates(model, keep, drop, stride_policy, report.skipped)
    candidates = _groups(model, convs, scope, stride_policy, named, example_input, report.skipped)
    savings = [(len(g) - 1) * _numel(g[0][1]) for g in candidates]
    report.floor = report.params_before - sum(savings)
    chosen = list(range(len(candidates)))
    if plan is not None:
        report.target = plan.target(report.params_before)
        if report.floor > report.target:
            raise ConfigError(
                f"share_kernels: budget {plan} ({report.target:,} of {report.params_before:,} parameters) "
                f"cannot be met: tying all {len(candidates)} eligible groups leaves {report.floor:,} (the "
                f"floor for scope={scope!r}, stride_policy={stride_policy!r}); the model is unchanged"
            )
        chosen, left = [], report.params_before
        for i in sorted(range(len(candidates)), key=lambda i: -savings[i]):
            if left <= report.target:
                for name, _ in candidates[i]:
                    report.skipped[name] = f"left free: budget met without this group (saves {savings[i]:,})"
                continue
            chosen.append(i)
            left -= savings[i]
    refs = _references(model)
    for i in sorted(chosen):
        report.groups.append(_tie(candidates[i], refs))
    report.skipped = {n: report.skipped[n] for n, m in model.named_modules() if n in report.skipped}
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def _free_conv(use: AnchoredConv2d) -> nn.Conv2d:
    """A free conv computing what ``use`` computes: the conv it replaced, or a new ``nn.Conv2d``."""
    k = use.kernel
    conv = use.__dict__.get(_ORIGINAL)
    if conv is None:
        conv = nn.Conv2d(k.in_channels, k.out_channels, k.kernel_size, stride=use.stride,
                         padding=use.padding, dilation=use.dilation, groups=k.groups,
                         bias=k.bias is not None, device=k.weight.device, dtype=k.weight.dtype)
    conv.weight = nn.Parameter(k.weight.detach().clone(), requires_grad=k.weight.requires_grad)
    if k.bias is not None:
        conv.bias = nn.Parameter(k.bias.detach().clone(), requires_grad=k.bias.requires_grad)
    conv.train(use.training)
    return conv


def untie(model: nn.Module) -> list[str]:
    """Put a free conv with a copy of its kernel in every :class:`AnchoredConv2d`'s place.

    Layers :func:`share_kernels` tied get their original conv object (class, names) back; kernels
    that no use applies any more are removed, so no dead parameters remain. Returns the qualified
    names of the replaced layers. The forward pass computes the same function.
    """
    refs = _references(model)
    replaced: set[int] = set()
    touched: dict[int, SharedKernel] = {}
    names = []
    for _, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, AnchoredConv2d) or id(module) in replaced:
            continue
        conv = _free_conv(module)
        replaced.add(id(module))
        for ref_name, parent, attr in refs[id(module)]:
            setattr(parent, attr, conv)
            names.append(ref_name)
        touched[id(module.kernel)] = module.kernel
    still_used = anchored_uses(model)  # from the module tree, after the replacements
    for _, parent, attr in [r for rs in _references(model).values() for r in rs]:
        child = parent._modules.get(attr)
        if isinstance(child, SharedKernel) and id(child) in touched and id(child) not in still_used:
            del parent._modules[attr]
    return names
