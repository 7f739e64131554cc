"""``DatasetSplit``: one split of a dataset as decoded arrays, with seeded subsets and a validation split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dacnn.errors import DataError


@dataclass(eq=False)
class DatasetSplit:
    """Images ``uint8 (N, H, W, C)``, labels ``int64 (N,)`` in ``[0, len(classes))`` and class names.

    ``source`` names the files the arrays came from (used in error messages).
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"DatasetSplit(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def validate(self) -> None:
        """Raise DataError unless the arrays are well formed (dtype, shape, labels in range, non-empty)."""
        where = f"{self.name}/{self.split}" + (f" ({self.source})" if self.source else "")
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            got = (getattr(self.images, "dtype", type(self.images).__name__),
                   getattr(self.images, "shape", None))
            raise DataError(f"{where}: images must be a uint8 array (N, H, W, C), got {got}")
        if not isinstance(self.labels, np.ndarray) or self.labels.ndim != 1:
            raise DataError(f"{where}: labels must be a 1-D array, got {getattr(self.labels, 'shape', None)}")
        if self.labels.dtype != np.int64:
            self.labels = self.labels.astype(np.int64)
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"{where}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if len(self) == 0:
            raise DataError(f"{where}: the split is empty")
        if not self.classes:
            raise DataError(f"{where}: no class names")
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= len(self.classes):
            bad = low if low < 0 else high
            raise DataError(f"{where}: label {bad} out of range [0, {len(self.classes)})")

    def class_counts(self) -> np.ndarray:
        """Number of samples per class, shape (num_classes,)."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def take(self, indices: np.ndarray, split: str | None = None) -> DatasetSplit:
        """A new split holding ``images[indices]`` (a copy), named ``split`` (default: unchanged)."""
        indices = np.asarray(indices, dtype=np.int64)
        return DatasetSplit(self.name, split or self.split, np.ascontiguousarray(self.images[indices]),
                            self.labels[indices].copy(), list(self.classes), self.source)

    def subset(self, n: int, seed: int = 0) -> DatasetSplit:
        """The first ``n`` samples of a permutation seeded by ``seed`` (in that permuted order)."""
        if not 0 < n <= len(self):
            raise DataError(f"{self.name}/{self.split}: subset size {n} not in [1, {len(self)}]")
        order = np.random.default_rng(seed).permutation(len(self))[:n]
        return self.take(order)

    def train_val_split(self, val_size: int | float = 5000,
                        seed: int = 0) -> tuple[DatasetSplit, DatasetSplit]:
        """Hold out a stratified, seeded validation part: returns ``(train, val)``, disjoint, order kept.

        ``val_size`` is a count, or a fraction in (0, 1). Each class gives its share of the
        validation set (largest-remainder rounding), so class proportions match the full split:
        model selection then needs no test set (the reference trainers selected on test, SPEC 1.2/2.2).
        """
        n = len(self)
        fraction = isinstance(val_size, float) and 0 < val_size < 1
        n_val = int(round(val_size * n)) if fraction else int(val_size)
        if not 0 < n_val < n:
            raise DataError(f"{self.name}/{self.split}: val_size {val_size} must leave both parts non-empty "
                            f"(split has {n} samples)")
        counts = self.class_counts()
        quota = counts * (n_val / n)
        per_class = np.floor(quota).astype(np.int64)
        remainder = n_val - int(per_class.sum())
        if remainder:
            order = np.argsort(-(quota - per_class), kind="stable")
            per_class[order[:remainder]] += 1
        rng = np.random.default_rng(seed)
        is_val = np.zeros(n, dtype=bool)
        for cls in range(self.num_classes):
            members = np.flatnonzero(self.labels == cls)
            if per_class[cls]:
                is_val[rng.permutation(members)[: per_class[cls]]] = True
        return self.take(np.flatnonzero(~is_val), "train"), self.take(np.flatnonzero(is_val), "val")
