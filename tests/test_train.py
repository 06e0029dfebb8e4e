"""Training: data order, config parsing, a two-step noisy run, kill -9 + resume equality, and a
two-process gloo (torchrun-style) run. All on tiny MNIST subsets from ../shared/data."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from noisyops.training import StageConfig, TensorImageDataset, load_checkpoint, make_loader, train_stage
from noisyops.training.checkpoint import atomic_save, latest, save_checkpoint
from noisyops.training.loop import step_eta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The training tests run on the default backend choice; NOISYOPS_TRAIN_TEST_BACKEND=name forces one
# (in-process and in the subprocesses), e.g. to check the training logic on the reference path.
FORCED = os.environ.get("NOISYOPS_TRAIN_TEST_BACKEND")


@pytest.fixture(autouse=True)
def _forced_backend(monkeypatch):
    if FORCED:
        monkeypatch.setenv("NOISYOPS_BACKEND", FORCED)


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("NOISYOPS_BACKEND", None)
    if FORCED:
        env["NOISYOPS_BACKEND"] = FORCED
    return env

TINY = ["threads=1", "progress=false", "data.train_limit=128", "data.test_limit=32", "data.batch_size=16",
        "data.eval_batch_size=32", "teacher.epochs=1", "finetune.epochs=1", "student.epochs=2",
        "quant.calib_batches=2", "eval.chips=0", "ckpt_every=3"]


def _toy_dataset(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 8, 8, 1), dtype=torch.uint8, generator=g)
    return TensorImageDataset(imgs, torch.arange(n) % 10, (0.5,), (0.25,))


# ---- data order ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_loader_resumes_mid_epoch_with_identical_batches(world):
    ds = _toy_dataset()
    for rank in range(world):
        full = make_loader(ds, 4, train=True, seed=3, rank=rank, world_size=world)
        full.set_epoch(2)
        want = [y for _, y in full]
        part = make_loader(ds, 4, train=True, seed=3, rank=rank, world_size=world)
        part.set_epoch(2, start_batch=2)
        got = [y for _, y in part]
        assert len(want) == len(full) and len(got) == len(want) - 2
        for a, b in zip(got, want[2:]):
            assert torch.equal(a, b)
    if world == 2:  # ranks see disjoint samples
        a = make_loader(ds, 4, train=True, seed=3, rank=0, world_size=2)
        b = make_loader(ds, 4, train=True, seed=3, rank=1, world_size=2)
        a.set_epoch(0), b.set_epoch(0)
        xa = torch.cat([x for x, _ in a]).flatten(1)
        xb = torch.cat([x for x, _ in b]).flatten(1)
        assert not any(torch.equal(r, s) for r in xa for s in xb)


def test_augmentation_is_a_function_of_seed_epoch_index():
    imgs = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = TensorImageDataset(imgs, torch.arange(6), (0.5,) * 3, (0.25,) * 3, augment=True, seed=5)
    ds.set_epoch(1)
    a = ds[[0, 3, 5]][0]
    ds.set_epoch(2)
    ds.set_epoch(1)
    assert torch.equal(ds[[5, 3, 0]][0], a.flip(0))


def test_step_eta_is_deterministic_and_nonnegative():
    assert step_eta(0.1, 0.0, 0, 5) == 0.1
    vals = [step_eta(0.1, 0.05, 7, s) for s in range(200)]
    assert vals == [step_eta(0.1, 0.05, 7, s) for s in range(200)]
    assert min(vals) >= 0 and len(set(vals)) > 150
    assert abs(sum(vals) / len(vals) - 0.1) < 0.02


def test_atomic_save_leaves_old_file_when_interrupted(tmp_path):
    save_checkpoint({"a": 1}, str(tmp_path))
    (tmp_path / ".last.pt.tmp.999").write_bytes(b"torn")  # what a kill mid-write leaves behind
    assert load_checkpoint(latest(str(tmp_path)))["a"] == 1
    save_checkpoint({"a": 2}, str(tmp_path), tag="epoch1")
    assert load_checkpoint(latest(str(tmp_path)))["a"] == 2
    assert not list(tmp_path.glob(".*.tmp.*"))
    assert load_checkpoint(str(tmp_path / "epoch1.pt"))["a"] == 2
    atomic_save([1, 2], str(tmp_path / "x.pt"))
    assert torch.load(str(tmp_path / "x.pt")) == [1, 2]


# ---- config ----------------------------------------------------------------------------------------
def test_config_file_presets_and_overrides(tmp_path):
    from train.config import load_config
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"student": {"eta": 0.2}, "data": {"name": "mnist"}}))
    cfg = load_config(str(p), ["student.alpha=0", "eval.etas=[0, 0.1]", "teacher.checkpoint=null"])
    assert cfg["student"]["eta"] == 0.2 and cfg["student"]["alpha"] == 0
    assert cfg["eval"]["etas"] == [0, 0.1] and cfg["teacher"]["checkpoint"] is None
    assert load_config(preset="demo")["out_dir"] == "runs/demo"
    with pytest.raises(KeyError, match="student.etaa"):
        load_config(None, ["student.etaa=0.1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["student.eta"])
    yml = os.path.join(REPO, "train", "configs", "mnist_lenet5.yaml")
    if os.path.exists(yml):
        pytest.importorskip("yaml")
        assert load_config(yml)["model"]["name"] == "lenet5"


# ---- a two-step noisy run --------------------------------------------------------------------------
def _noisy_lenet(seed=0):
    import noisyops
    from noisyops import LayerConfig
    from train.models import build_model
    torch.manual_seed(seed)
    m = noisyops.convert(build_model("lenet5"), LayerConfig(eta=0.1, w_range=2.0, w_bits=8), seed=seed)
    return m


def test_two_step_noisy_distillation_run(shared_dir, tmp_path):
    import noisyops
    from noisyops.training import build_dataset
    from train.models import build_model
    ds = build_dataset("mnist", os.path.join(shared_dir, "data"), train=True, limit=64)
    loader = make_loader(ds, 16, train=True, seed=0)
    student = _noisy_lenet()
    torch.manual_seed(1)
    teacher = build_model("lenet5").eval()
    w0 = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = StageConfig(name="s", epochs=1, lr=0.05, max_steps=2, progress=False, project=True, eta0=0.1)
    out = train_stage(student, loader, cfg=cfg, ckpt_dir=str(tmp_path), device=torch.device("cpu"),
                      teacher=teacher)
    assert out["train_loss"] > 0 and torch.isfinite(torch.tensor(out["train_loss"]))
    layers = noisyops.noisy_layers(student)
    assert all(int(m.calls) == 2 for _, m in layers)  # per_call noise: one draw per step
    changed = [k for k in w0 if k.endswith("weight") and not torch.equal(w0[k], student.state_dict()[k])]
    assert len(changed) == len(layers)
    for _, m in layers:  # projected into the fixed clip range after each step
        lo, hi = m.weight_range
        assert m.weight.min() >= lo and m.weight.max() <= hi
    ck = load_checkpoint(latest(str(tmp_path)))
    assert ck["step"] == 2 and ck["batch"] == 2 and not ck["done"]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,name,value"


# ---- kill -9 and resume ------------------------------------------------------------------------------
def _run_main(out_dir, extra=(), env_extra=None):
    env = _env()
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "train.main", f"out_dir={out_dir}", *TINY, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _student_state(out_dir):
    return load_checkpoint(os.path.join(out_dir, "student", "final.pt"))["model"]


def test_kill9_and_resume_gives_the_same_weights(shared_dir, tmp_path):
    ref_dir, kill_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    ref = _run_main(ref_dir)
    victim = _run_main(kill_dir)
    # kill the second run right after its first student checkpoint (mid-epoch, mid-stage)
    target = os.path.join(kill_dir, "student", "last.pt")
    t0 = time.time()
    while not os.path.exists(target):
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.time() - t0 < 120, "no student checkpoint after 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(target)
    assert not killed_at["done"], "the run finished before it was killed"
    out_ref = ref.communicate(timeout=300)[0].decode()
    assert ref.returncode == 0, out_ref
    resumed = _run_main(kill_dir, ["--resume"])
    out = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, out
    assert "[teacher] already finished" in out and "[student] resumed from" in out
    a, b = _student_state(ref_dir), _student_state(kill_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(k.endswith("calls") and int(v) > 0 for k, v in a.items())


# ---- two processes, gloo -----------------------------------------------------------------------------
def test_torchrun_two_process_gloo(shared_dir, tmp_path):
    out_dir = str(tmp_path / "ddp")
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.main", f"out_dir={out_dir}", *TINY, "student.epochs=1", "device=cpu"]
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = p.stdout.decode()
    assert p.returncode == 0, out
    ck = load_checkpoint(os.path.join(out_dir, "student", "final.pt"))
    assert ck["done"]
    # each rank saw half of the 128 samples per epoch: 4 steps of 16
    assert ck["step"] == 128 // 2 // 16
    assert "world size 2" in out


_DDP_SCRIPT = r'''
import gc, os, sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
import noisyops
from noisyops import LayerConfig
from noisyops.training import StageConfig, TensorImageDataset, make_loader, train_stage, distributed as D
from train.models import build_model
rank, world, dev = D.init("cpu")
g = torch.Generator().manual_seed(0)
ds = TensorImageDataset(torch.randint(0, 256, (64, 28, 28, 1), dtype=torch.uint8, generator=g),
                        torch.arange(64) % 10, (0.5,), (0.25,))
torch.manual_seed(0)
model = noisyops.convert(build_model("lenet5"), LayerConfig(eta=0.1, w_range=2.0), seed=11)
ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
loader = make_loader(ds, 8, train=True, seed=0, rank=rank, world_size=world)
train_stage(ddp, loader, cfg=StageConfig(name="ddp", epochs=1, max_steps=3, progress=False),
            ckpt_dir=sys.argv[1], device=dev, rank=rank, log=lambda *a: None)
layer = noisyops.noisy_layers(model)[0][1]
w = torch.cat([p.detach().flatten() for p in model.parameters()])
# refresh the layer's view of the rank (done lazily on every eager forward)
p = layer._op_params()
seeds = [None] * world
dist.all_gather_object(seeds, (layer.effective_seed(), int(layer.calls)))
ws = [torch.zeros_like(w) for _ in range(world)]
dist.all_gather(ws, w)
if rank == 0:
    assert seeds[0][0] != seeds[1][0], seeds          # per-rank noise
    assert seeds[0][1] == seeds[1][1] == 3, seeds     # same counters
    assert torch.equal(ws[0], ws[1])                  # DDP keeps the weights identical
    print("DDP-OK")
del ddp  # the DDP reducer holds the process group: drop it before the group is destroyed
gc.collect()
D.cleanup()
'''


def test_ddp_ranks_draw_different_noise_and_keep_equal_weights(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(_DDP_SCRIPT)
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "ck")]
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = p.stdout.decode()
    assert p.returncode == 0 and "DDP-OK" in out, out


def test_imagefolder_dataset_and_seeded_transforms(tmp_path):
    from PIL import Image
    from noisyops.training import build_dataset
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                arr = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    ds = build_dataset("imagenet", str(tmp_path), train=True, seed=1)
    assert len(ds) == 6 and ds.classes == ["a", "b"]
    ds.set_epoch(3)
    x1, y1 = ds[4]
    ds.set_epoch(0)
    ds.set_epoch(3)
    x2, _ = ds[4]
    assert x1.shape == (3, 224, 224) and y1 == 1 and torch.equal(x1, x2)  # crop = f(seed, epoch, index)
    loader = make_loader(ds, 4, train=True, seed=0)
    loader.set_epoch(0)
    batches = list(loader)  # 6 images, batch 4, training drops the partial batch
    assert len(batches) == 1 and batches[0][0].shape == (4, 3, 224, 224)
    val = build_dataset("imagenet", str(tmp_path), train=False)
    vl = make_loader(val, 4, train=False)
    vl.set_epoch(0)
    assert [b[0].shape[0] for b in vl] == [4, 2]
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        build_dataset("imagenet", str(tmp_path / "missing"), train=True)
    with pytest.raises(ValueError, match="dataset="):
        build_dataset("svhn", str(tmp_path), train=True)
