"""The in-memory data set type every reader returns and every loader consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdlab.errors import DataError

__all__ = ["ArrayDataset", "channel_stats"]


def _where(source: str) -> str:
    return f"{source}: " if source else ""


@dataclass
class ArrayDataset:
    """A whole labelled image data set held in memory.

    ``images`` is a uint8 tensor (N, C, H, W) on the CPU, ``labels`` an int64 tensor (N,) with
    values in [0, num_classes). ``mean`` / ``std`` are per-channel statistics in [0, 1] pixel units
    used to normalise batches (for data sets without published statistics they are those of the
    *train* split, carried by the test split too). ``source`` names the file or folder the data came
    from and is used in error messages.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    name: str
    source: str = field(default="", compare=False)
    skipped: list[str] = field(default_factory=list, compare=False)  # files left out as unreadable, with the reason

    def __post_init__(self) -> None:
        where = _where(self.source)
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor):
            raise DataError(f"{where}images must be a torch tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise DataError(f"{where}images must have 4 dimensions (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise DataError(f"{where}images must be uint8, got {images.dtype}")
        if images.device.type != "cpu":
            raise DataError(f"{where}images must be on the CPU, got {images.device}")
        if not isinstance(labels, torch.Tensor):
            raise DataError(f"{where}labels must be a torch tensor, got {type(labels).__name__}")
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise DataError(
                f"{where}labels must be a 1-D int64 tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        n = images.shape[0]
        if labels.shape[0] != n:
            raise DataError(f"{where}{n} images but {labels.shape[0]} labels")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise DataError(f"{where}num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise DataError(f"{where}num_classes must be >= 1, got {self.num_classes}")
        if n:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise DataError(f"{where}label {bad} out of range [0, {self.num_classes}) (labels span {lo}..{hi})")
        c = images.shape[1]
        try:
            self.mean = tuple(float(m) for m in self.mean)
            self.std = tuple(float(s) for s in self.std)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}mean/std must be sequences of floats ({exc})") from None
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(
                f"{where}mean/std need one value per channel ({c}), got {len(self.mean)} and {len(self.std)}"
            )
        if not all(s > 0 for s in self.std):
            raise DataError(f"{where}std must be positive, got {self.std}")
        self.class_names = [str(s) for s in self.class_names]
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{where}{len(self.class_names)} class names for {self.num_classes} classes")
        self.images = images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index, name: str | None = None) -> ArrayDataset:
        """The samples at ``index`` (int tensor / sequence / slice), keeping statistics and classes."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.int64)
        return ArrayDataset(
            images=self.images[index],
            labels=self.labels[index],
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            class_names=list(self.class_names),
            name=name or self.name,
            source=self.source,
        )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), in [0, 1] units.

    Accumulates in float64 chunk by chunk, so it needs little memory for large data sets. A channel
    with zero spread gets std 1.0 (normalisation then only shifts it).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(f"cannot compute statistics of images with shape {tuple(images.shape)}")
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255.0)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    var = (s2 / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
