"""One real labelled patch for fitting tests: a case read with SimpleITK, z-scored, cropped (or padded)
to a size the network accepts, centred on the labelled structure; and the fitting loop itself."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch


def _crop_or_pad(array: np.ndarray, centre, size) -> np.ndarray:
    out = np.zeros(size, dtype=array.dtype)
    source, target = [], []
    for extent, c, s in zip(array.shape, centre, size):
        start = int(round(c)) - s // 2
        lo, hi = max(start, 0), min(start + s, extent)
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[tuple(target)] = array[tuple(source)]
    return out


def labelled_patch(image_path: Path, label_path: Path, size) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (1, 1, *size) float32 z-scored, label (1, *size) int64, centred on the label's
    bounding box; voxels outside the case are 0 in both."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).astype(np.int64)
    foreground = np.argwhere(label > 0)
    centre = (foreground.min(0) + foreground.max(0)) / 2
    image = (image - image.mean()) / image.std()
    x = torch.from_numpy(_crop_or_pad(image, centre, size))[None, None]
    y = torch.from_numpy(_crop_or_pad(label, centre, size))[None]
    return x, y


def fit(net: torch.nn.Module, loss_at: Callable[[int], tuple[torch.Tensor, dict]], steps: int, lr: float) -> list[dict]:
    """``steps`` Adam steps on ``loss_at(step) -> (loss, parts)``; the parts of every step, as floats."""
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for step in range(steps):
        loss, parts = loss_at(step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append({"total": loss.item(), **{k: float(v) for k, v in parts.items()}})
    return history
