"""timm's model contract, shared by every family (``timm/models/resnet.py`` is the template).

* ``forward(x) == forward_head(forward_features(x))``; ``forward_features`` runs the model's feature
  levels (:meth:`ClassifierMixin._stages`, one per ``feature_info`` entry: the stem, then each stage) and
  its final norm; ``forward_head(x, pre_logits=True)`` returns what the classifier reads
  (``head_hidden_size`` features); ``num_features`` is the channel count ``forward_features`` returns.
* ``global_pool`` (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``, or ``""`` for none) and
  ``drop_rate`` (dropout before the classifier) as timm's ``ResNet``; :meth:`reset_classifier`
  ``(num_classes, global_pool=None)`` replaces the head (``0``: identity, ``""``: unpooled maps).
* ``feature_info`` (``num_chs``, ``reduction``, ``module`` per level), :meth:`forward_intermediates`,
  :meth:`prune_intermediate_layers`, :meth:`feature_size` (timm's ``pool_size``).
* :meth:`group_matcher` (stem / blocks / head, timm's regex dict) for layer-wise lr decay: a shared
  kernel falls in ONE group, the group of the block that applies it first, i.e. the earliest (most
  general) of its uses; :meth:`no_weight_decay`; :meth:`set_grad_checkpointing` with non-reentrant
  checkpointing per stage (:func:`dacnn.features.run_stage`).
* :meth:`save_pretrained` (Hugging Face layout, :mod:`dacnn.hf_hub`).

TorchScript is refused with a sentence (:meth:`__prepare_scriptable__`): a use of a shared kernel holds
it outside ``_modules`` (that is what keeps the kernel saved and counted once), which ``torch.jit.script``
cannot compile; ``torch.export.export``, ``torch.jit.trace``, fx and ONNX export work.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dacnn import hf_hub
from dacnn.errors import ConfigError
from dacnn.features import Indices, feature_take_indices, run_stage
from dacnn.models.layers import make_pool, pooled_features
from dacnn.shared_kernel import AnchoredConv2d, SharedKernel, anchored_uses

__all__ = ["ClassifierMixin", "check_drop_path"]

Stage = Callable[[torch.Tensor], torch.Tensor]


def check_drop_path(model: str, drop_path_rate: float, why: str) -> None:
    """A model without residual branches accepts ``drop_path_rate=0`` only (timm's ``train.py``
    always passes it)."""
    if drop_path_rate:
        raise ConfigError(f"{model} has no stochastic depth ({why}): drop_path_rate must be 0, "
                          f"got {drop_path_rate}")


class ClassifierMixin:
    """Mixin for ``nn.Module`` subclasses made of feature levels, a global pool (``pool``) and a
    classifier (``fc``); a family with another head overrides :meth:`forward_head`.

    A family sets ``feature_info`` and implements :meth:`_stages` (callables whose composition is
    ``forward_features`` up to :meth:`_final_norm`) and :meth:`_group_patterns`.
    """

    classifier_name: str = "fc"
    pool_name: str = "pool"
    pool_types: tuple[str, ...] = ("avg", "max", "avgmax", "catavgmax", "")
    num_classes: int
    num_features: int
    head_hidden_size: int
    feature_info: list[dict[str, Any]]
    drop_rate: float = 0.0
    global_pool: str = "avg"
    grad_checkpointing: bool = False
    _depth: int | None = None  # feature levels kept by prune_intermediate_layers (None: all)

    # ---------------------------------------------------------------- what a family provides
    def _stages(self) -> list[Stage]:
        raise NotImplementedError

    def _final_norm(self) -> nn.Module | None:
        """A norm applied after the last level in ``forward_features`` (``forward_intermediates``
        applies it to the last level with ``norm=True``); ``None``: the model has none."""
        return None

    def _group_patterns(self, coarse: bool) -> tuple[str, str]:
        """``(stem regex, blocks regex)``: the blocks regex's groups number the blocks (coarse: stages)."""
        raise NotImplementedError

    def _set_head(self, num_features: int, num_classes: int, global_pool: str = "avg",
                  drop_rate: float = 0.0) -> None:
        """Pool + linear classifier over ``num_features`` channels (timm's ``create_classifier``)."""
        self.num_classes, self.num_features, self.drop_rate = num_classes, num_features, drop_rate
        self._set_pool(global_pool)
        self.fc = self._classifier(num_classes)

    # ---------------------------------------------------------------- features
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        stages = self._stages()[: self._depth]
        for i, stage in enumerate(stages):
            x = run_stage(stage, x, self.grad_checkpointing and i > 0, self)  # type: ignore[arg-type]
        norm = self._final_norm()
        return norm(x) if norm is not None and len(stages) == len(self.feature_info) else x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the feature maps of the levels ``indices`` (``None``: all,
        an int ``n``: the last ``n``), and with ``intermediates_only=False`` also ``forward_features(x)``.
        ``norm`` applies the final norm to the last level; ``stop_early`` stops after the last level
        asked for (then the first value returned is that level's map)."""
        if output_fmt != "NCHW":
            raise ValueError(f"dacnn feature maps are NCHW, got output_fmt={output_fmt!r}")
        stages = self._stages()[: self._depth]
        take, max_index = feature_take_indices(len(stages), indices)
        final = self._final_norm()
        last = len(self.feature_info) - 1
        run = stages[: max_index + 1] if (stop_early or intermediates_only) else stages
        intermediates = []
        for i, stage in enumerate(run):
            x = run_stage(stage, x, self.grad_checkpointing and i > 0, self)  # type: ignore[arg-type]
            if i in take:
                intermediates.append(final(x) if norm and final is not None and i == last else x)
        if intermediates_only:
            return intermediates
        if final is not None and len(run) - 1 == last:
            x = final(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the levels after the last of ``indices`` (their modules become ``nn.Identity``), the
        final norm with ``prune_norm``, the head with ``prune_head``, and any shared kernel no kept
        layer applies; returns the indices kept (timm's ``prune_intermediate_layers``)."""
        take, max_index = feature_take_indices(len(self._stages()[: self._depth]), indices)
        for level in self.feature_info[max_index + 1:]:
            self._prune_level(level["module"])
        self._depth = max_index + 1
        if prune_norm and self._final_norm() is not None:
            self._prune_final_norm()
        if prune_head:
            self._prune_head()
        self._drop_unused_kernels()
        return take

    def _prune_level(self, name: str) -> None:
        self.set_submodule(name, nn.Identity())  # type: ignore[attr-defined]

    def _prune_final_norm(self) -> None:
        raise NotImplementedError

    def _prune_head(self) -> None:
        self.reset_classifier(0, "")

    def _drop_unused_kernels(self) -> None:
        used = anchored_uses(self)  # type: ignore[arg-type]
        for name, module in list(self.named_modules()):  # type: ignore[attr-defined]
            if isinstance(module, SharedKernel) and not used.get(id(module)):
                parent, _, leaf = name.rpartition(".")
                delattr(self.get_submodule(parent) if parent else self, leaf)  # type: ignore[attr-defined]

    def feature_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of ``forward_features`` for an ``hw`` input (timm's ``pool_size``): the input
        over the last level's reduction, rounded up (stride-2 layers with padding round up)."""
        r = self.feature_info[-1]["reduction"]
        return (-(-hw[0] // r), -(-hw[1] // r))

    # ---------------------------------------------------------------- head
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.get_submodule(self.pool_name)(x)  # type: ignore[attr-defined]
        if self.global_pool:
            x = torch.flatten(x, 1)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)  # type: ignore[attr-defined]
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The final layer (timm's ``get_classifier``; ``name_only``: its qualified name)."""
        return self.classifier_name if name_only else self.get_submodule(self.classifier_name)  # type: ignore

    def _pool(self, global_pool: str) -> nn.Module:
        if global_pool not in self.pool_types:
            raise ConfigError(f"{type(self).__name__}: global_pool must be one of "
                              f"{', '.join(repr(p) for p in self.pool_types)}, got {global_pool!r}")
        return make_pool(global_pool)

    def _set_pool(self, global_pool: str) -> None:
        setattr(self, self.pool_name, self._pool(global_pool))
        self.global_pool = global_pool
        self.head_hidden_size = pooled_features(self.num_features, global_pool)

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes and not self.global_pool:
            raise ConfigError(f"{type(self).__name__}: global_pool='' (no pooling) needs num_classes=0: "
                              "a linear classifier reads pooled features")
        return nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A freshly initialised classifier for ``num_classes`` outputs (``0``: ``nn.Identity``), after
        the pool ``global_pool`` when given (``""``: none, the head then returns feature maps)."""
        if global_pool is not None:
            self._set_pool(global_pool)
        self.num_classes = num_classes
        parent, _, leaf = self.classifier_name.rpartition(".")
        owner = self.get_submodule(parent) if parent else self  # type: ignore[attr-defined]
        setattr(owner, leaf, self._classifier(num_classes))

    # ---------------------------------------------------------------- training helpers
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every stage after the stem, non-reentrant (DDP-safe with a
        kernel applied many times); BatchNorm statistics are updated once per step, as without it."""
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups for layer-wise lr decay: ``stem``, then ``blocks`` numbered by
        the blocks regex (coarse: one group per stage), the head unmatched (timm puts it last).

        A shared kernel joins the group of its first use, as a ``(regex, ordinal)`` entry in
        ``blocks``; a kernel a stage's own name already covers (LruNet's ``stage<k>.kernels``) is left
        to that name."""
        stem, blocks = self._group_patterns(coarse)
        entries: list[tuple[str, tuple[int, ...] | None]] = [(blocks, None)]
        first_use: dict[int, str] = {}
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, AnchoredConv2d):
                first_use.setdefault(id(module.kernel), name)
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if not isinstance(module, SharedKernel) or re.match(stem, name + ".") \
                    or re.match(blocks, name + "."):
                continue
            use = first_use.get(id(module), "")
            found = re.match(blocks, use + ".")
            if found is None:
                raise ValueError(f"{type(self).__name__}: the first use {use!r} of kernel {name!r} is in no "
                                 f"block group ({blocks})")
            entries.append((rf"^{re.escape(name)}\.", tuple(int(g) for g in found.groups())))
        return {"stem": stem, "blocks": entries}

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay beyond timm's own rule (1-d tensors): none; a
        shared kernel is one tensor and is decayed once per step like any other weight."""
        return set()

    # ---------------------------------------------------------------- saving and tools
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """``config.json`` and ``model.safetensors`` in ``save_directory`` (:mod:`dacnn.hf_hub`)."""
        return hf_hub.save_pretrained(self, save_directory, **kwargs)  # type: ignore[arg-type]

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            f"{type(self).__name__}: dacnn models are not TorchScript-scriptable (each use of a shared "
            "kernel holds it outside _modules so that it is saved and counted once, which "
            "torch.jit.script cannot compile); use torch.export.export or torch.jit.trace instead")
