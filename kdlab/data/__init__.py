"""Data layer: in-memory data sets, safe readers, device-side batched augmentation and loading.

ds = load_dataset("cifar100", root="data/", split="train")
loader = DeviceLoader(ds, 128, train=True, augment=default_augment("cifar100"), device="cuda")
for epoch in range(epochs):
    loader.set_epoch(epoch)
    for x, y in loader:
        ...

A large image folder is streamed from disk instead (data.loader: stream):

ds = open_stream("data/imagenet", split="train", image_size=224)   # its cached file index, nothing decoded
loader = StreamLoader(ds, 256, train=True, device="cuda", workers=8)  # the same contract as DeviceLoader
"""

from .arrays import ArrayDataset, channel_stats
from .augment import (
    AugmentSpec,
    Views,
    apply_views,
    default_augment,
    num_views,
    rotate_batch,
    sample_angles,
    sample_views,
    view_from_index,
    view_index,
)
from .folder_index import FolderIndex
from .loader import DeviceLoader, epoch_seed
from .registry import DATASETS, SPLITS, load_dataset
from .stream import StreamDataset, StreamLoader, open_stream

__all__ = [
    "ArrayDataset",
    "AugmentSpec",
    "DATASETS",
    "DeviceLoader",
    "FolderIndex",
    "SPLITS",
    "StreamDataset",
    "StreamLoader",
    "Views",
    "apply_views",
    "channel_stats",
    "default_augment",
    "epoch_seed",
    "load_dataset",
    "num_views",
    "open_stream",
    "rotate_batch",
    "sample_angles",
    "sample_views",
    "view_from_index",
    "view_index",
]
