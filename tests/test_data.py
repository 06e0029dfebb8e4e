"""Dataset files: the IDX reader behind MNIST (plain and .gz, as shipped and as downloaded)."""
import gzip
import os

import pytest
import torch

from noisyops.training.data import DatasetNotFoundError, build_dataset, read_idx


def _idx_bytes(t: torch.Tensor, code: int) -> bytes:
    head = bytes([0, 0, code, t.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in t.shape)
    body = t.contiguous().view(torch.uint8).view(-1, t.element_size()).flip(-1).contiguous().numpy().tobytes()
    return head + body


@pytest.mark.parametrize("dtype,code", [(torch.uint8, 0x08), (torch.int16, 0x0B), (torch.int32, 0x0C),
                                        (torch.float32, 0x0D)])
def test_read_idx_plain_and_gzip_agree_with_what_was_written(tmp_path, dtype, code):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, 7, generator=g) * 1000).to(dtype)
    data = _idx_bytes(t, code)
    (tmp_path / "a").write_bytes(data)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(data)
    assert torch.equal(read_idx(str(tmp_path / "a")), t)
    assert torch.equal(read_idx(str(tmp_path / "a.gz")), t)


def test_read_idx_rejects_a_file_that_is_not_idx_or_is_truncated(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x1f\x8bxxxxxxxx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(_idx_bytes(torch.zeros(4, 4, dtype=torch.uint8), 0x08)[:-3])
    with pytest.raises(ValueError, match="expected 16"):
        read_idx(str(tmp_path / "short"))


def test_shared_mnist_loads_from_its_gzip_files(shared_dir):
    root = os.path.join(shared_dir, "data")
    test = build_dataset("mnist", root, train=False)
    assert len(test) == 10000
    labels = read_idx(os.path.join(root, "MNIST", "raw", "t10k-labels-idx1-ubyte.gz"))
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's published test order
    assert len(build_dataset("mnist", root, train=True, limit=64)) == 64


def test_mnist_missing_names_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="MNIST/raw"):
        build_dataset("mnist", str(tmp_path), train=False)
