"""Batched, device-side augmentation with explicit per-sample parameters.

An augmentation *view* of a sample is fully described by integer crop offsets ``(dx, dy)`` in
``[0, 2 * crop_pad]`` and a flip bit: the image is zero-padded by ``crop_pad`` pixels on every side,
the original-size window whose top-left corner is at row ``dy``, column ``dx`` of the padded image is
cut out, and it is mirrored left-right when the flip bit is 1 (the torchvision
``RandomCrop(size, padding=p)`` + ``RandomHorizontalFlip()`` recipe). Views are numbered
``view_index = (dy * (2p + 1) + dx) * 2 + flip``, so that outputs can be cached per view
(2 * (2p + 1)**2 views: 162 for p = 4).

An optional rotation by a per-sample angle in degrees, uniform in ``[-rotation, rotation]``, comes
after crop and flip: counter-clockwise for positive angles, about the image centre, nearest-neighbour,
zero fill, like torchvision's ``RandomRotation(rotation)`` default. Rotation is not part of the view
index. Normalisation is applied last, by the loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdlab.data_names import DATASETS
from kdlab.errors import ConfigError

__all__ = [
    "AugmentSpec",
    "Views",
    "default_augment",
    "sample_views",
    "sample_angles",
    "apply_views",
    "rotate_batch",
    "view_index",
    "view_from_index",
    "num_views",
]


class Views(NamedTuple):
    """Per-sample augmentation parameters: int64 ``dx``, ``dy``, ``flip`` and float32 ``angle``."""

    dx: torch.Tensor
    dy: torch.Tensor
    flip: torch.Tensor
    angle: torch.Tensor

    def to(self, device) -> Views:
        return Views(*(t.to(device) for t in self))

    def select(self, index) -> Views:
        """The views of the samples at ``index`` (slice or int tensor)."""
        return Views(*(t[index] for t in self))


def uncacheable_views(rotation: float) -> str | None:
    """Why the teacher-logit cache cannot hold this augmentation's views, or None. The cache enumerates every
    crop/flip view of every image; a rotation draws a continuous angle per sample."""
    if not rotation:
        return None
    return (
        f"data.augment.rotation={rotation:g} draws a continuous angle per sample, so the views are "
        "non-enumerable and cannot be cached; set train.teacher_cache=false (or data.augment.rotation=0)"
    )


@dataclass
class AugmentSpec:
    """Training augmentation: random crop after zero padding, horizontal flip, rotation.

    Mutable (a recipe may override single fields of :func:`default_augment`), but every assignment
    is validated; a :class:`DeviceLoader` takes a snapshot when it is built.
    """

    crop_pad: int = 0
    flip: bool = False
    rotation: float = 0.0

    def __setattr__(self, key: str, value) -> None:
        if key == "crop_pad":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"augment crop_pad must be an int >= 0, got {value!r}")
            value = int(value)
        elif key == "flip":
            if not isinstance(value, bool):
                raise ConfigError(f"augment flip must be true or false, got {value!r}")
        elif key == "rotation":
            try:
                rotation = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"augment rotation must be a number of degrees, got {value!r}") from None
            if isinstance(value, bool) or not (0.0 <= rotation <= 180.0):
                raise ConfigError(f"augment rotation must be in [0, 180] degrees, got {value!r}")
            value = rotation
        else:
            raise ConfigError(f"unknown augment option {key!r} (options: crop_pad, flip, rotation)")
        object.__setattr__(self, key, value)

    @property
    def is_identity(self) -> bool:
        return self.crop_pad == 0 and not self.flip and self.rotation == 0.0

    @property
    def num_views(self) -> int:
        """Number of distinct crop/flip views (rotation excluded)."""
        return num_views(self.crop_pad)

    def sample_views(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dx, dy, flip)``: int64 tensors (n,) on the generator's device; see :func:`sample_views`."""
        return sample_views(n, generator, self.crop_pad, self.flip)

    def sample(self, n: int, generator: torch.Generator) -> Views:
        """All per-sample parameters, drawn in a fixed order: dx, dy, flip, then angles."""
        dx, dy, flip = self.sample_views(n, generator)
        return Views(dx, dy, flip, sample_angles(n, generator, self.rotation))

    def apply(self, images: torch.Tensor, views: Views) -> torch.Tensor:
        """Crop/flip (uint8) then rotate; returns float32 in [0, 255] pixel units (not normalised)."""
        x = apply_views(images, views.dx, views.dy, views.flip, self.crop_pad)
        x = x.to(torch.float32)
        if self.rotation:
            x = rotate_batch(x, views.angle)
        return x


def default_augment(name: str, image_size: int = 32) -> AugmentSpec:
    """The published training augmentation of a data set.

    cifar10 / cifar100: crop_pad 4, flip. digits: crop_pad 1, no flip (a mirrored digit is another
    digit). imagefolder: flip and crop_pad image_size / 8 (4 at the default size 32).
    """
    key = str(name).strip().lower()
    if key in ("cifar10", "cifar100"):
        return AugmentSpec(crop_pad=4, flip=True, rotation=0.0)
    if key == "digits":
        return AugmentSpec(crop_pad=1, flip=False, rotation=0.0)
    if key == "imagefolder":
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
        return AugmentSpec(crop_pad=max(1, image_size // 8), flip=True, rotation=0.0)
    raise ConfigError(f"unknown data set {name!r}: valid names are {', '.join(DATASETS)}")


def num_views(crop_pad: int) -> int:
    return 2 * (2 * crop_pad + 1) ** 2


def view_index(dx, dy, flip, pad: int):
    """``(dy * (2 * pad + 1) + dx) * 2 + flip`` for ints or int tensors."""
    side = 2 * pad + 1
    if isinstance(flip, torch.Tensor):
        flip = flip.to(torch.int64)
    else:
        flip = int(flip)
    return (dy * side + dx) * 2 + flip


def view_from_index(index, pad: int):
    """Inverse of :func:`view_index`: ``(dx, dy, flip)`` for ints or int tensors."""
    side = 2 * pad + 1
    flip = index % 2
    cell = index // 2
    return cell % side, cell // side, flip


def sample_views(
    n: int, generator: torch.Generator, crop_pad: int, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n`` views: dx, dy uniform on {0, ..., 2 * crop_pad} and flip ~ Bernoulli(1/2).

    Int64 tensors (n,) on the generator's device, drawn in the order dx, dy, flip. A disabled part
    draws nothing and is all zeros (crop_pad 0 with offset 0 is the original image).
    """
    device = generator.device
    if crop_pad > 0:
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator, device=device)
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator, device=device)
    else:
        dx = torch.zeros(n, dtype=torch.int64, device=device)
        dy = torch.zeros(n, dtype=torch.int64, device=device)
    if flip:
        fl = torch.randint(0, 2, (n,), generator=generator, device=device)
    else:
        fl = torch.zeros(n, dtype=torch.int64, device=device)
    return dx, dy, fl


def sample_angles(n: int, generator: torch.Generator, rotation: float) -> torch.Tensor:
    """Angles in degrees, uniform in [-rotation, rotation] (float32; zeros, nothing drawn, if 0)."""
    device = generator.device
    if not rotation:
        return torch.zeros(n, dtype=torch.float32, device=device)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    return (u * 2.0 - 1.0) * float(rotation)


def apply_views(
    images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, crop_pad: int
) -> torch.Tensor:
    """Zero-pad by ``crop_pad``, crop the original size at (row ``dy``, column ``dx``), then flip.

    Batched over (B, C, H, W) images of any dtype (uint8 in the loader) with per-sample int offsets
    and flip bits (B,) on the images' device; offsets must lie in [0, 2 * crop_pad]. One gather,
    no per-image loop.
    """
    if images.dim() != 4:
        raise ValueError(f"apply_views expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = int(crop_pad)
    dev = images.device
    dx = torch.as_tensor(dx, device=dev).to(torch.int64).reshape(-1)
    dy = torch.as_tensor(dy, device=dev).to(torch.int64).reshape(-1)
    flip = torch.as_tensor(flip, device=dev).to(torch.bool).reshape(-1)
    if not (dx.shape[0] == dy.shape[0] == flip.shape[0] == b):
        raise ValueError(f"apply_views: {b} images but {dx.shape[0]}/{dy.shape[0]}/{flip.shape[0]} views")
    if dev.type == "cpu" and b:  # (a range check would cost a device sync elsewhere)
        if int(torch.minimum(dx, dy).min()) < 0 or int(torch.maximum(dx, dy).max()) > 2 * p:
            raise ValueError(f"apply_views: crop offsets must lie in [0, {2 * p}] for crop_pad {p}")
    hp, wp = h + 2 * p, w + 2 * p
    if p > 0:
        padded = images.new_zeros((b, c, hp, wp))
        padded[:, :, p : p + h, p : p + w] = images
    else:
        padded = images.contiguous()
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + dx[:, None]  # (B, W)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H)
    # One gather over each padded plane with a per-sample flat (row, col) index, shared by channels.
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)
    out = padded.reshape(b, c, hp * wp).gather(2, flat.expand(b, c, h * w))
    return out.reshape(b, c, h, w)


def rotate_batch(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate float images (B, C, H, W) counter-clockwise by per-sample ``angles`` (degrees).

    Nearest-neighbour, zero fill, about the centre, ``align_corners=False``: the output pixel at
    centred pixel coordinates (x, y) (y pointing down) takes the input pixel nearest to
    (cos a * x - sin a * y, sin a * x + cos a * y), as torchvision's ``rotate`` does.
    """
    if x.dim() != 4:
        raise ValueError(f"rotate_batch expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    a = torch.as_tensor(angles, device=x.device).to(torch.float32).reshape(-1) * (math.pi / 180.0)
    if a.shape[0] != b:
        raise ValueError(f"rotate_batch: {b} images but {a.shape[0]} angles")
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # Pixel-space inverse map, expressed in affine_grid's normalised coordinates (x / (W/2), y / (H/2)).
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), zero], dim=1),
            torch.stack([sin * (w / h), cos, zero], dim=1),
        ],
        dim=1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
