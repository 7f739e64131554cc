"""A plain image-folder tree ``root/<class>/<image>``: classes are the sorted sub-folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dacnn.errors import DataError

FOLDER_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image_folder(root: Path) -> bool:
    """True when ``root`` has class sub-folders holding at least one image file."""
    if not root.is_dir():
        return False
    for sub in root.iterdir():
        if sub.is_dir() and any(p.suffix.lower() in FOLDER_IMAGE_EXTS for p in sub.iterdir()):
            return True
    return False


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image path, class index)]) sorted by class then file name."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = []
    for index, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()):
            if path.is_file() and path.suffix.lower() in FOLDER_IMAGE_EXTS:
                samples.append((path, index))
    if not samples:
        raise DataError(f"{root}: no images found (expected {root}/<class>/<image>)")
    return classes, samples


def _open(path: Path) -> Image.Image:
    im = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if im is not None:
            im.close()  # a failed load leaves the file open
        raise DataError(f"{path}: image does not decode: {exc}") from exc


def read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image -> (images uint8 (N,H,W,C), labels int64, classes).

    All images must have the size of the first one; the first image's mode decides greyscale
    (C=1) or RGB (C=3), and the others are converted to it.
    """
    classes, samples = list_image_folder(root)
    first = _open(samples[0][0])
    mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    height, width = first.height, first.width
    channels = 1 if mode == "L" else 3
    images = np.empty((len(samples), height, width, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        im = first if i == 0 else _open(path)
        if im.mode != mode:
            im = im.convert(mode)
        arr = np.asarray(im)
        if arr.shape[:2] != (height, width):
            raise DataError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {width}x{height} "
                            f"(the size of {samples[0][0].name})")
        images[i] = arr.reshape(height, width, channels)
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    return images, labels, classes
