"""Datasets and resumable, rank-aware loaders for training and evaluation.

Data order contract (what makes kill-and-resume exact): the order of epoch ``e`` is
``torch.randperm(N, generator=manual_seed(seed + e))`` (torch's `DistributedSampler`), padded and
split across ranks as `DistributedSampler` does; batch ``b`` of the epoch is positions
``[b·B, (b+1)·B)`` of this rank's list. Random augmentation (CIFAR crop/flip) is a pure function
of ``(seed, epoch, sample index)`` (a per-epoch table drawn from ``manual_seed(seed·7919 + e)``),
so nothing about the data pipeline has to be stored in a checkpoint beyond ``(epoch, batch)``.

Datasets:
- MNIST: the IDX files in ``root/MNIST/raw`` (torchvision's layout), plain or ``.gz`` (`read_idx`);
  `root` = the shared ``../shared/data`` copy or any folder (``download=True`` fetches it with
  torchvision where there is internet).
- CIFAR-10: ``cifar10_mini`` (the 4,000 / 1,000 image subset in the ``cifar-10-batches-py`` layout
  with only ``data_batch_1`` and ``test_batch``) or a full copy (``data_batch_1..5``), or download.
- ImageNet: an ``ImageFolder`` tree ``root/{train,val}/<class>/<image>``.
MNIST and CIFAR are held in memory as uint8 tensors and batched by indexing (no per-image PIL).
"""
from __future__ import annotations

import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["TensorImageDataset", "SeededTransformDataset", "ResumableSampler", "ResumableLoader",
           "build_dataset", "make_loader", "default_data_root", "MNIST_MEAN", "MNIST_STD",
           "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetNotFoundError",
           "image_folder_dataset", "image_folder_split", "read_idx"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# The shared CIFAR ResNet weights were trained with these (see ../shared/weights/README.md).
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_data_root() -> str:
    """``$NOISYOPS_DATA`` if set, else ``../shared/data`` next to the repository, else ``./data``."""
    env = os.environ.get("NOISYOPS_DATA")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shared = os.path.join(os.path.dirname(repo), "shared", "data")
    return shared if os.path.isdir(shared) else os.path.join(os.getcwd(), "data")


class TensorImageDataset(Dataset):
    """In-memory uint8 images ``[N, H, W, C]`` + int64 labels ``[N]``, normalised on access.

    ``ds[i]`` → ``(x [C, H', W'] float32, y)``; ``ds[list_of_ints]`` → a batch ``(x [B, C, H', W'], y [B])``.
    ``pad`` zero-pads (in normalised units: value 0 = the mean) every side, e.g. 2 for a 32×32 LeNet-5.
    ``augment=True`` applies a random crop (4 px zero padding) and horizontal flip per sample, drawn
    from a per-epoch table (`set_epoch`): a pure function of (seed, epoch, index).
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float], *,
                 augment: bool = False, pad: int = 0, seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected shape [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        c = images.shape[3]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        self.augment = augment
        self.pad = int(pad)
        self.seed = int(seed)
        self.classes = sorted(set(self.labels.tolist()))
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation table of ``epoch`` (crop offsets in 0..8, flip bits)."""
        self.epoch = int(epoch)
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            n = len(self)
            self._dy = torch.randint(0, 9, (n,), generator=g)
            self._dx = torch.randint(0, 9, (n,), generator=g)
            self._flip = torch.randint(0, 2, (n,), generator=g).bool()

    def subset(self, n: int) -> "TensorImageDataset":
        """The first ``n`` samples (same normalisation/augmentation settings)."""
        ds = TensorImageDataset(self.images[:n], self.labels[:n], self.mean.flatten().tolist(),
                                self.std.flatten().tolist(), augment=self.augment, pad=self.pad, seed=self.seed)
        return ds

    def __getitem__(self, idx):
        single = isinstance(idx, int)
        index = torch.tensor([idx] if single else list(idx), dtype=torch.long)
        x = self.images[index].permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.augment:
            x = self._augment(x, index)
        if self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4)
        y = self.labels[index]
        return (x[0], int(y[0])) if single else (x, y)

    def _augment(self, x: Tensor, index: Tensor) -> Tensor:
        b, c, h, w = x.shape
        xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
        out = torch.empty_like(x)
        dy, dx, flip = self._dy[index].tolist(), self._dx[index].tolist(), self._flip[index].tolist()
        for i in range(b):
            crop = xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
            out[i] = crop.flip(-1) if flip[i] else crop
        return out


class SeededTransformDataset(Dataset):
    """Wraps a PIL-style dataset (e.g. ImageFolder) so its random transform is a pure function of
    ``(seed, epoch, index)``: the global torch RNG is re-seeded before each sample's transform
    (this runs in the loader workers, whose RNG nothing else uses)."""

    def __init__(self, base: Dataset, transform, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, int(seed), 0
        self.classes = getattr(base, "classes", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, y = self.base[i]
        torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_000_019 + int(i)) % (2 ** 63))
        return self.transform(img), y


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (same order, padding and rank split) that can start mid-epoch.

    Works without torch.distributed: pass ``num_replicas`` and ``rank`` (1 and 0 single-process).
    ``set_epoch(e, start=k)`` makes the next iteration skip this rank's first ``k`` indices.
    """

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start={start}: expected 0..{self.num_samples}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])


class ResumableLoader:
    """Batches of one rank's share of a dataset, resumable at any batch of any epoch.

    ``loader.set_epoch(epoch, start_batch)`` then ``for x, y in loader``: yields batches
    ``start_batch .. len(loader)-1`` of that epoch. In-memory datasets (`TensorImageDataset`) are
    indexed a batch at a time; others go through a `DataLoader` with ``num_workers``.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        self.dataset, self.batch_size, self.drop_last = dataset, int(batch_size), drop_last
        self.num_workers = num_workers
        self.sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                        seed=seed, drop_last=drop_last)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch}: expected 0..{len(self)}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.sampler.set_epoch(epoch, start=min(start_batch * self.batch_size, self.sampler.num_samples))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        nb = len(self) - self.start_batch
        if isinstance(self.dataset, TensorImageDataset):
            idx = list(iter(self.sampler))
            for b in range(nb):
                chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield self.dataset[chunk]
            return
        dl = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                        num_workers=self.num_workers, drop_last=self.drop_last,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
        for b, batch in enumerate(dl):
            if b >= nb:
                break
            yield batch


def make_loader(dataset, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                world_size: int = 1, num_workers: int = 0) -> ResumableLoader:
    """Training loaders shuffle and drop the last partial batch; evaluation loaders keep order and
    every sample (with several ranks the last samples are repeated to balance, as in torch)."""
    return ResumableLoader(dataset, batch_size, shuffle=train, seed=seed, rank=rank,
                           world_size=world_size, drop_last=train, num_workers=num_workers)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for; the message says where and what to pass."""


_ROOT_HINT = ("Pass the folder that holds it (CLI --data-root DIR, config data.root=DIR, or $NOISYOPS_DATA), "
              "or allow the download with --download (config data.download=true; needs internet).")


def _not_found(name: str, looked: Sequence[str], layout: str, hint: str = _ROOT_HINT) -> DatasetNotFoundError:
    where = "\n".join(f"  - {os.path.abspath(p)}" for p in looked)
    return DatasetNotFoundError(f"dataset {name!r} not found. Looked for {layout} in:\n{where}\n{hint}")


_MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32,
               0x0D: torch.float32, 0x0E: torch.float64}


def read_idx(path: str) -> Tensor:
    """One IDX file (the MNIST format: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian int32 dims,
    then the values big-endian), plain or gzip-compressed (``.gz``), as a tensor of those dims.

    torchvision's MNIST reads only the extracted files; the shared copy and a fresh download hold
    the original ``.gz`` files, so both are read here."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path!r} is not an IDX file (magic {data[:4].hex()!r}, expected 0000<type><ndim>)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_DTYPES[data[2]]
    start = 4 + 4 * ndim
    count = math.prod(dims)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) - start != count * itemsize:
        raise ValueError(f"read_idx: {path!r} holds {len(data) - start} bytes of data, expected "
                         f"{count * itemsize} for dims {dims}")
    raw = torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8)
    if itemsize > 1:  # big-endian on disk: reverse each value's bytes
        raw = raw.view(count, itemsize).flip(-1).contiguous().view(-1)
    return raw.view(dtype).reshape(dims)


def _find_mnist_files(root: str, train: bool) -> Optional[Tuple[str, str]]:
    raw = os.path.join(root, "MNIST", "raw")
    found = []
    for name in _MNIST_FILES[train]:
        path = next((p for p in (os.path.join(raw, name), os.path.join(raw, name + ".gz")) if os.path.isfile(p)), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _mnist(root: str, train: bool, pad: int, download: bool = False) -> TensorImageDataset:
    files = _find_mnist_files(root, train)
    if files is None:
        if not download:
            raise _not_found("mnist", [os.path.join(root, "MNIST", "raw")],
                             "the MNIST files (train-images-idx3-ubyte[.gz], ...) in MNIST/raw")
        from torchvision.datasets import MNIST
        MNIST(root, train=train, download=True)
        files = _find_mnist_files(root, train)
    images, labels = read_idx(files[0]), read_idx(files[1]).long()
    if images.dim() != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"mnist: images {tuple(images.shape)} and labels {tuple(labels.shape)} in {files} "
                         "do not match (expected [N, 28, 28] and [N])")
    return TensorImageDataset(images.unsqueeze(-1).contiguous(), labels, MNIST_MEAN, MNIST_STD, pad=pad)


def _cifar_class():
    from torchvision.datasets import CIFAR10

    class CIFAR10Mini(CIFAR10):
        """The 4,000 / 1,000 image subset of ``../shared/data/cifar10_mini`` (md5 check off)."""
        base_folder = "cifar-10-batches-py"
        train_list = [["data_batch_1", None]]
        test_list = [["test_batch", None]]

        def _check_integrity(self) -> bool:  # pickles are not the original bytes
            return True

    return CIFAR10, CIFAR10Mini


def _cifar10(root: str, train: bool, augment: bool, seed: int, download: bool = False) -> TensorImageDataset:
    CIFAR10, CIFAR10Mini = _cifar_class()
    folder = os.path.join(root, "cifar-10-batches-py")
    mini = os.path.join(root, "cifar10_mini")
    if os.path.isdir(folder) and os.path.exists(os.path.join(folder, "data_batch_2")):
        ds = CIFAR10(root, train=train, download=False)
    elif os.path.isdir(folder):
        ds = CIFAR10Mini(root, train=train, download=False)
    elif os.path.isdir(os.path.join(mini, "cifar-10-batches-py")):
        ds = CIFAR10Mini(mini, train=train, download=False)
    elif download:
        ds = CIFAR10(root, train=train, download=True)
    else:
        raise _not_found("cifar10", [folder, os.path.join(mini, "cifar-10-batches-py")],
                         "a cifar-10-batches-py folder (data_batch_*, test_batch)")
    images = torch.from_numpy(ds.data).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.long)
    return TensorImageDataset(images, labels, CIFAR_MEAN, CIFAR_STD, augment=augment, seed=seed)


def _imagenet(root: str, train: bool, seed: int):
    from torchvision import datasets, transforms as T
    split = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(split):
        raise _not_found("imagenet", [split], "an ImageFolder tree (root/train/<class>/*, root/val/<class>/*)",
                         "Pass the folder that holds train/ and val/ (config data.root=DIR).")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    return SeededTransformDataset(datasets.ImageFolder(split), tf, seed=seed)


def image_folder_split(path: str, train: bool) -> Optional[str]:
    """The class-folder tree of an ``imagefolder:PATH`` dataset: evaluation uses ``PATH/val`` if it
    exists, else ``PATH`` itself (unless ``PATH`` only holds ``train``); training / calibration uses
    ``PATH/train`` (None when absent). Raises `DatasetNotFoundError` when nothing fits."""
    if train:
        split = os.path.join(path, "train")
        return split if os.path.isdir(split) else None
    val = os.path.join(path, "val")
    if os.path.isdir(val):
        return val
    subdirs = [d for d in (os.listdir(path) if os.path.isdir(path) else [])
               if os.path.isdir(os.path.join(path, d))]
    if not subdirs or subdirs == ["train"]:
        raise _not_found(f"imagefolder:{path}", [val, path],
                         "an ImageFolder tree (PATH/val/<class>/<image>, or PATH/<class>/<image>)",
                         "Pass --dataset imagefolder:PATH with such a tree (PATH/train, if present, "
                         "is used for calibration).")
    return path


def image_folder_dataset(path: str, *, train: bool = False, resize: int = 256, crop: int = 224,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         grayscale: bool = False):
    """An evaluation `ImageFolder` of ``imagefolder:PATH`` (`image_folder_split`) with the usual
    evaluation transform: shorter side resized to ``resize`` (bilinear), centre crop ``crop × crop``,
    ``ToTensor`` (pixels in [0, 1]), ``Normalize(mean, std)`` (ImageNet statistics by default;
    ``grayscale`` converts to one channel first). Returns None for ``train=True`` without ``PATH/train``.
    Samples are ``(x [C, crop, crop] float32, class index)``; classes are the sorted folder names."""
    from torchvision import datasets, transforms as T
    split = image_folder_split(path, train)
    if split is None:
        return None
    tf = ([T.Grayscale(1)] if grayscale else []) + [T.Resize(resize), T.CenterCrop(crop), T.ToTensor(),
                                                    T.Normalize(mean, std)]
    return datasets.ImageFolder(split, transform=T.Compose(tf))


def build_dataset(name: str, root: Optional[str] = None, *, train: bool, augment: Optional[bool] = None,
                  seed: int = 0, pad: int = 0, limit: Optional[int] = None, download: bool = False):
    """``name`` in {"mnist", "cifar10", "imagenet"}; ``root`` defaults to `default_data_root`.

    ``augment`` defaults to True for CIFAR/ImageNet training sets. ``pad`` (MNIST only) zero-pads the
    28×28 digits. ``limit`` keeps the first ``limit`` samples (tiny runs and tests). A dataset that is
    not under ``root`` raises `DatasetNotFoundError` (where it looked, what to pass) unless
    ``download=True``, which lets torchvision fetch MNIST / CIFAR-10 into ``root``.
    """
    root = root or default_data_root()
    name = name.lower()
    if name == "mnist":
        ds = _mnist(root, train, pad, download)
    elif name in ("cifar10", "cifar-10", "cifar10_mini"):
        ds = _cifar10(root, train, train if augment is None else augment, seed, download)
    elif name == "imagenet":
        ds = _imagenet(root, train, seed)
    else:
        raise ValueError(f"dataset={name!r}: expected 'mnist', 'cifar10' or 'imagenet'")
    if limit is not None:
        if isinstance(ds, TensorImageDataset):
            ds = ds.subset(int(limit))
        else:
            ds.base = torch.utils.data.Subset(ds.base, range(int(limit)))
    return ds
