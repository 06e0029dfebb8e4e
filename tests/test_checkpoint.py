"""Checkpoints that survive faults: a truncated or corrupted checkpoint is a clear error naming the
file, and a resume falls back to the newest good checkpoint and reaches the same final weights as
an uninterrupted run."""
import os

import pytest
import torch
from torch import nn

import noisyops
from noisyops import LayerConfig
from noisyops.training import StageConfig, TensorImageDataset, make_loader, train_stage
from noisyops.training.checkpoint import (CHECKSUM_SUFFIX, CheckpointError, atomic_save, candidates,
                                          latest, load_checkpoint, save_checkpoint, verify)


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _flip(path, where=0.6, n=4):
    data = bytearray(open(path, "rb").read())
    i = int(len(data) * where)
    for j in range(i, i + n):
        data[j] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_checksum_file_is_written_and_sha256sum_compatible(tmp_path):
    import hashlib
    p = atomic_save({"a": torch.arange(5)}, str(tmp_path / "x.pt"))
    line = open(p + CHECKSUM_SUFFIX).read().split()
    assert line == [hashlib.sha256(open(p, "rb").read()).hexdigest(), "x.pt"]
    assert torch.equal(torch.load(p)["a"], torch.arange(5))  # still a plain torch.save file
    verify(p)


@pytest.mark.parametrize("fault", ["truncate", "flip"])
def test_corrupted_checkpoint_is_an_error_naming_the_file(tmp_path, fault):
    p = atomic_save({"w": torch.randn(1000)}, str(tmp_path / "last.pt"))
    (_truncate if fault == "truncate" else _flip)(p)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(p)
    assert p in str(info.value) and "SHA-256 mismatch" in str(info.value)


def test_unreadable_checkpoint_without_checksum_names_the_file(tmp_path):
    p = str(tmp_path / "old.pt")
    torch.save({"w": torch.randn(1000)}, p)  # an older checkpoint: no .sha256 file
    _truncate(p)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(p)
    assert p in str(info.value) and "cannot be read" in str(info.value)
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_latest_skips_bad_files_newest_first(tmp_path):
    d = str(tmp_path)
    for step in range(3):
        save_checkpoint({"step": step}, d, tag="epoch1" if step == 0 else None)
    assert [os.path.basename(p) for p in candidates(d)] == ["last.pt", "prev.pt", "epoch1.pt"]
    assert load_checkpoint(latest(d))["step"] == 2
    _truncate(os.path.join(d, "last.pt"))
    with pytest.warns(UserWarning) as rec:
        assert load_checkpoint(latest(d))["step"] == 1  # prev.pt
    assert [os.path.basename(str(w.message).split(":")[1].split()[-1]) for w in rec] == ["last.pt"]
    _flip(os.path.join(d, "prev.pt"), where=0.5, n=1)
    with pytest.warns(UserWarning) as rec:
        assert load_checkpoint(latest(d))["step"] == 0  # epoch1.pt
    assert len(rec) == 2 and "prev.pt" in str(rec[1].message)
    _flip(os.path.join(d, "epoch1.pt"), where=0.5, n=1)
    with pytest.warns(UserWarning) as rec:
        assert latest(d) is None
    assert len(rec) == 3


def test_checkpoint_killed_between_renames_falls_back(tmp_path):
    """A crash after the new last.pt landed but before its checksum did: the stale checksum of
    another file never vouches for it (the pair moves together), so last.pt is verified by loading."""
    d = str(tmp_path)
    save_checkpoint({"step": 0}, d)
    save_checkpoint({"step": 1}, d)
    os.remove(os.path.join(d, "last.pt" + CHECKSUM_SUFFIX))  # as if killed before the checksum rename
    assert load_checkpoint(latest(d))["step"] == 1
    _truncate(os.path.join(d, "last.pt"))
    with pytest.warns(UserWarning, match="last.pt"):
        assert load_checkpoint(latest(d))["step"] == 0


# ---- resume after a fault reaches the uninterrupted run's weights -------------------------------------
def _dataset():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (40, 8, 8, 1), dtype=torch.uint8, generator=g)
    return TensorImageDataset(imgs, torch.arange(40) % 10, (0.5,), (0.25,))


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return noisyops.convert(net, LayerConfig(eta=0.05, w_range=2.0, w_bits=6), seed=5)


def _train(ckpt_dir, max_steps=None):
    model = _model()
    cfg = StageConfig(name="s", epochs=2, lr=0.05, ckpt_every=1, max_steps=max_steps, progress=False,
                      project=True, eval_every_epoch=False)
    loader = make_loader(_dataset(), 4, train=True, seed=1)
    train_stage(model, loader, cfg=cfg, ckpt_dir=ckpt_dir, device=torch.device("cpu"), seed=2,
                log=lambda s: None)
    return model.state_dict()


@pytest.mark.parametrize("fault", ["truncate_last", "flip_last_and_prev"])
def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path, fault):
    want = _train(str(tmp_path / "ref"))
    d = str(tmp_path / "run")
    _train(d, max_steps=14)  # stopped mid-epoch 2: last.pt/prev.pt at step 14, epoch1.pt at step 10
    if fault == "truncate_last":
        _truncate(os.path.join(d, "last.pt"))
        expect_step = 14
    else:
        _flip(os.path.join(d, "last.pt"))
        _flip(os.path.join(d, "prev.pt"))
        expect_step = 10
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(os.path.join(d, "last.pt"))
    with pytest.warns(UserWarning, match="skipping a bad checkpoint"):
        assert load_checkpoint(latest(d))["step"] == expect_step
    with pytest.warns(UserWarning, match="skipping a bad checkpoint") as rec:
        got = _train(d)
    assert all("skipping a bad checkpoint" in str(w.message) for w in rec)
    assert got.keys() == want.keys()
    for k in want:  # bit for bit (unset range buffers hold NaN)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert load_checkpoint(os.path.join(d, "final.pt"))["done"]
