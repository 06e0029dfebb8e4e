"""The ``cpu`` backend: C++ kernels (OpenMP, AVX2) around ATen's conv / matmul (oneDNN, MKL).

Same four kernels and signatures as `noisyops.reference` (the oracle they are tested against):

    xq  = Q_in(x)                          C++ `cpu_quantize_out` into a reused per-thread workspace
                                           (a temporary; x is what autograd saves)
    Wn  = Q_w(clip(W))·(1 + eta_mul·ε') + σ·ε
                                           C++ `cpu_noisy_weights_`: one pass over W, four normals per
                                           Philox call; K instance ids at once -> [K, *W.shape]
    y_t = conv(xq, Wn|tile t)              ATen (F.conv2d / convolution_backward / mm)
    y_t += out_noise·ε''_t                 C++ `cpu_out_noise_`, in place
    y   = Σ_t Q_out(y_t) + b               C++ `cpu_out_quant_`: in place, packs the straight-through
                                           mask bits (storage order) into the op's int32 out_mask

Sampling (SPEC section 2): ``per_call`` makes one ``Wn``. ``per_sample`` makes one per sample, in
chunks of at most ``NOISYOPS_CPU_CHUNK_MB`` (default 256) megabytes of weights, each chunk running
as one grouped conv (batched matmul for linear). ``per_instance`` groups the samples by chip id,
runs the chips as one grouped conv / batched matmul, and takes the chips' noisy weights from the
op's ``chip_weights`` input when its owner made them (`noisyops.chip_store`: modules inside
`noisyops.chips`, budget ``NOISYOPS_CHIP_CACHE_MB``), so repeated evaluation generates each chip's
weights once; the backend itself keeps no cache.

Backward (straight-through): the noisy weights are regenerated (never stored), the input
quantizer's mask is applied in place from the saved x (no mask tensor), the output mask is read
from the packed words. RNG contract: `noisyops.stream` (SPEC section 3), bit-identical words and
uniforms, normals within a few ulp (SLEEF 1-ulp log / sincos). float64 inputs take their normals
from the torch stream itself (float64 is the exact-check dtype: results equal the reference to
float64 rounding); float32 / bfloat16 / float16 use the vectorised C++ generator.
"""
from __future__ import annotations

import os
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _ext, reference, stream
from ..params import PER_CALL, PER_INSTANCE, OpParams
from ..plan import CallPlan, conv2d_plan, linear_plan

DEVICES = ("cpu",)
# K chips with equal sample counts run as one grouped conv / batched matmul (False: one product per
# chip with that chip's cached weights; same numbers up to summation order). For measurements.
GROUPED_CHIPS = True
_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def available():
    mod, why = _ext.cpu()
    if mod is None:
        return False, why
    if not hasattr(mod, "cpu_noisy_weights_") or not hasattr(mod, "cpu_quantize_mask_out"):
        return False, "noisyops._C has no CPU kernels or predates cpu_quantize_mask_out (built from older sources); rebuild the extension"
    return True, "C++ CPU kernels (OpenMP, AVX2) around ATen conv / matmul"


def _C():
    return _ext.cpu()[0]


def _kernel(passes, name: str):
    """C++ kernel ``name`` run now (``cpu_<name>``), or recorded into ``passes`` (a
    ``_C.CpuPasses``) to run with the other independent kernels of the call as one parallel region
    (``passes.run()``: one barrier instead of one per kernel)."""
    return getattr(_C(), "cpu_" + name) if passes is None else getattr(passes, name)


def _new_passes():
    """A recorder for `_kernel` (None where the extension predates ``CpuPasses``: kernels run one by one)."""
    cls = getattr(_C(), "CpuPasses", None)
    return cls() if cls is not None else None


def _run(passes):
    if passes is not None:
        passes.run()


def chunk_bytes() -> int:
    """Weight bytes generated at once for per_sample / uncached per_instance (``NOISYOPS_CPU_CHUNK_MB``)."""
    raw = os.environ.get("NOISYOPS_CPU_CHUNK_MB", "256")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"NOISYOPS_CPU_CHUNK_MB={raw!r}: expected a number of megabytes > 0") from None
    if mb <= 0:
        raise ValueError(f"NOISYOPS_CPU_CHUNK_MB={raw!r}: expected a number of megabytes > 0")
    return int(mb * (1 << 20))


_tls = threading.local()


_MAX_VIEWS = 64  # cached workspace views per thread (one per distinct layout in use)


def _workspace(slot: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A reused per-thread buffer laid out like the dense tensor ``like`` (no fresh pages per call).

    For temporaries that never leave the kernel (the quantized input of a product, a masked
    gradient): reusing one buffer avoids the page faults of a fresh large allocation per layer.
    The view for a layout is made once and reused while the buffer stays (per-call overhead).
    """
    views = getattr(_tls, "views", None)
    if views is None:
        views = _tls.views = {}
    key = (slot, like.shape, like.stride(), dtype)
    view = views.get(key)
    if view is not None:
        return view
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    n = like.numel()
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = bufs[slot] = torch.empty(max(n, 1), dtype=dtype)
        for k in [k for k in views if k[0] == slot]:  # views of the old buffer
            del views[k]
    if len(views) >= _MAX_VIEWS:
        views.clear()
    view = views[key] = buf[:n].as_strided(like.shape, like.stride())
    return view


def _bits_workspace(slot: str, numel: int) -> torch.Tensor:
    """A reused per-thread int32 buffer for the packed bits of ``numel`` elements (1/32 of them)."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    n = (numel + 31) // 32
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n or buf.dtype != torch.int32:
        buf = bufs[slot] = torch.empty(max(n, 1), dtype=torch.int32)
    return buf[:n]


def _quantize_ws(slot, x, lo, hi, bits, passes=None):
    """``Q(x)`` into a workspace buffer (x dense); with ``passes``, recorded (valid after passes.run())."""
    out = _workspace(slot, x, x.dtype)
    _kernel(passes, "quantize_out")(x, out, lo, hi, bits)
    return out


def _dense(t, fmt):
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _to(t, dtype):
    """``t.to(dtype)`` (``t`` itself when it has that dtype, as ``.to`` returns it) without the
    cost of ``.to``'s argument parsing on the common no-op call."""
    return t if t.dtype == dtype else t.to(dtype)


def _place(out, part, rng, order, batch: int):
    """Write the rows of one chip set (``part``) into the batch-sized ``out`` (allocated on first
    use): a contiguous sample range ``rng`` or the sample indices ``order``."""
    if out is None:
        out = part.new_empty((batch,) + tuple(part.shape[1:]))
    if rng:
        out[rng[0]:rng[1]] = part
    else:
        out.index_copy_(0, _index(order), part)
    return out


# ---- weights ----------------------------------------------------------------------------------
class _Weights:
    """Clip/quantize/noise parameters of one call, and the generator of ``Wn`` for instance ids."""

    def __init__(self, weight: torch.Tensor, p: OpParams, cd: torch.dtype, out_dtype: torch.dtype,
                 lo: float, hi: float, sigma: float, noise: bool = True, chip_weights=None):
        self.weight, self.p, self.cd, self.out_dtype = weight, p, cd, out_dtype
        self.lo, self.hi, self.sigma = lo, hi, sigma
        # the empty range (0, 0) of all-zero weights: the quantizer is the clamp (no 0/0 step)
        self.w_bits = p.w_bits if self.hi > self.lo or self.hi != self.hi else 0
        self.noise = noise and p.has_weight_noise
        self.chip_weights = chip_weights if self.noise else None
        self.transform = self.noise or bool(p.w_clip)
        self._wc = None

    @classmethod
    def of(cls, weight: torch.Tensor, plan: CallPlan, out_dtype: torch.dtype, noise: bool = True):
        lo, hi = (plan.w_lo, plan.w_hi) if plan.w_lo is not None else (0.0, 0.0)
        return cls(weight, plan.p, plan.compute_dtype, out_dtype, lo, hi, plan.sigma, noise,
                   plan.chip_weights)

    def source(self) -> torch.Tensor:
        if self._wc is None:
            self._wc = _to(self.weight.detach(), self.cd).contiguous()
        return self._wc

    def make(self, ids: Sequence[int], passes=None) -> torch.Tensor:
        """``[len(ids), *weight.shape]`` noisy weights in ``out_dtype`` (K = 1 without noise).

        With ``passes`` the float32 generator is recorded (the values are there after passes.run())."""
        if not self.transform:
            return _to(self.weight.detach(), self.out_dtype).unsqueeze(0)
        ids = list(ids) if self.noise else [0]
        w = self.source()
        p = self.p
        if self.noise and self.cd == torch.float64:
            # float64 is the exact-check dtype: its noise comes from the torch stream itself, so
            # results equal the reference to float64 rounding (the C++ normals agree only to a few
            # float32 ulp, SPEC section 3). The clip / quantize pass is still the C++ kernel.
            wq = torch.empty((1,) + tuple(w.shape), dtype=self.cd)
            _C().cpu_noisy_weights_(w, wq, [0], self.lo, self.hi, bool(p.w_clip), self.w_bits, 0.0, 0.0,
                                    p.seed, p.layer_key)
            return torch.stack([reference.weight_noisy(wq[0], self.sigma, p, i) for i in ids])
        out = torch.empty((len(ids),) + tuple(w.shape), dtype=self.cd)
        if self.out_dtype != self.cd:
            passes = None  # converted below: needs the values now
        _kernel(passes, "noisy_weights_")(w, out, ids, self.lo, self.hi, bool(p.w_clip), self.w_bits,
                                          self.sigma if self.noise else 0.0,
                                          p.eta_mul if self.noise else 0.0, p.seed, p.layer_key)
        return out if self.out_dtype == self.cd else out.to(self.out_dtype)

    def make_channels_last(self, instance: int) -> torch.Tensor:
        """``make([instance])[0]`` of a 4-D conv weight ``[C_out, C_in/groups, kh, kw]``, laid out
        channels-last (strides ``(C·kh·kw, 1, kw·C, C)``, what inductor's CPU convolutions take).

        In the compute dtype with noise from the C++ stream (float32), the kernel writes that layout
        directly (same values as `make`, scattered within each filter); otherwise `make`'s result is
        converted."""
        w = self.source()
        p = self.p
        if not (self.transform and w.dim() == 4 and self.out_dtype == self.cd
                and not (self.noise and self.cd == torch.float64)):
            wn = self.make([instance])[0]
            return torch.empty_like(wn, memory_format=torch.channels_last).copy_(wn)
        c_out, c_in, kh, kw = w.shape
        buf = torch.empty(w.numel(), dtype=self.cd)
        _C().cpu_noisy_weights_(w, buf, [instance], self.lo, self.hi, bool(p.w_clip), self.w_bits,
                                self.sigma if self.noise else 0.0, p.eta_mul if self.noise else 0.0,
                                p.seed, p.layer_key, spatial=kh * kw)
        return buf.as_strided(tuple(w.shape), (c_in * kh * kw, 1, kw * c_in, c_in))

    def per_instance(self, ids: Sequence[int], start: int) -> torch.Tensor:
        """`make` for the chips ``ids``, the distinct ids ``start .. start + len(ids)`` of the call
        in first-seen order: a view of the owner's ``chip_weights`` when it gave them."""
        cw = self.chip_weights
        if cw is not None and cw.dtype == self.out_dtype and start + len(ids) <= cw.shape[0]:
            return cw[start:start + len(ids)]
        return self.make(ids)


# ---- the layer geometry -----------------------------------------------------------------------
class _Conv:
    def __init__(self, weight, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self.cin_g = weight.shape[1]
        self.kernel_numel = weight.shape[2] * weight.shape[3]
        self.wshape = tuple(weight.shape)

    def x_tile(self, x, c0, c1):
        if c0 == 0 and c1 == self.cin_g:
            return x
        if self.groups == 1:
            return x[:, c0:c1]
        idx = torch.tensor([g * self.cin_g + c for g in range(self.groups) for c in range(c0, c1)])
        return x.index_select(1, idx)

    def put_x_tile(self, grad_x, part, c0, c1):
        if c0 == 0 and c1 == self.cin_g:
            grad_x.copy_(part)
        elif self.groups == 1:
            grad_x[:, c0:c1] = part
        else:
            idx = torch.tensor([g * self.cin_g + c for g in range(self.groups) for c in range(c0, c1)])
            grad_x.index_copy_(1, idx, part)

    @staticmethod
    def w_tile(w, c0, c1):
        return w if c0 == 0 and c1 == w.shape[-3] else w[..., c0:c1, :, :]

    def fwd(self, x, w, b, k=1):
        """conv of x (samples of K chips: [K·n, ...], chip-major) with w [K·C_out, ...]."""
        if k == 1:
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        n = x.shape[0] // k
        xg = x.reshape(k, n, *x.shape[1:]).transpose(0, 1).reshape(n, k * x.shape[1], *x.shape[2:])
        y = F.conv2d(xg, w, None if b is None else b.repeat(k), self.stride, self.padding,
                     self.dilation, self.groups * k)
        return y.reshape(n, k, -1, *y.shape[2:]).transpose(0, 1).reshape(k * n, -1, *y.shape[2:])

    def bwd(self, g, x, w, need_x, need_w, k=1):
        """(grad_x, grad_w) of `fwd` with weights w (K·C_out rows for k chips; grad_w only k = 1)."""
        if k == 1:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g, x, w, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups,
                [need_x, need_w, False])
            return gx, gw
        n = x.shape[0] // k
        xg = x.reshape(k, n, *x.shape[1:]).transpose(0, 1).reshape(n, k * x.shape[1], *x.shape[2:])
        gg = g.reshape(k, n, *g.shape[1:]).transpose(0, 1).reshape(n, k * g.shape[1], *g.shape[2:])
        gx, _, _ = torch.ops.aten.convolution_backward(
            gg, xg, w, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups * k,
            [True, False, False])
        return gx.reshape(n, k, -1, *gx.shape[2:]).transpose(0, 1).reshape(k * n, -1, *gx.shape[2:]), None

    @staticmethod
    def stack(wn):
        """[K, C_out, ...] -> [K·C_out, ...] (a view)."""
        return wn.reshape(-1, *wn.shape[2:])

    @staticmethod
    def bias_view(b):
        return b.view(1, -1, 1, 1)


class _Linear:
    groups = 1

    def __init__(self, weight):
        self.cin_g = weight.shape[1]
        self.kernel_numel = 1
        self.wshape = tuple(weight.shape)

    def x_tile(self, x, c0, c1):
        return x if c0 == 0 and c1 == self.cin_g else x[..., c0:c1]

    def put_x_tile(self, grad_x, part, c0, c1):
        if c0 == 0 and c1 == self.cin_g:
            grad_x.copy_(part)
        else:
            grad_x[..., c0:c1] = part

    @staticmethod
    def w_tile(w, c0, c1):
        return w if c0 == 0 and c1 == w.shape[-1] else w[..., c0:c1]

    def fwd(self, x, w, b, k=1):
        if k == 1:
            return F.linear(x, w, b)
        n = x.shape[0] // k
        x3 = x.reshape(k, -1, x.shape[-1])
        w3 = w.reshape(k, -1, w.shape[-1]).transpose(1, 2)
        y = torch.bmm(x3, w3) if b is None else torch.baddbmm(b.view(1, 1, -1), x3, w3)
        return y.reshape(k * n, *x.shape[1:-1], y.shape[-1])  # (no -1: x may have a zero dim)

    def bwd(self, g, x, w, need_x, need_w, k=1):
        gx = gw = None
        if need_x:
            if k == 1:
                gx = (g.reshape(-1, g.shape[-1]) @ w).reshape(x.shape)
            else:
                g3 = g.reshape(k, -1, g.shape[-1])
                gx = torch.bmm(g3, w.reshape(k, -1, w.shape[-1])).reshape(x.shape)
        if need_w:
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return gx, gw

    @staticmethod
    def stack(wn):
        return wn.reshape(-1, wn.shape[-1])

    @staticmethod
    def bias_view(b):
        return b


# ---- instance groups --------------------------------------------------------------------------
def _chunks(p: OpParams, ids: List[int], wbytes: int):
    """``[(instance ids, sample indices (host ints) ordered chip-major, samples per chip or None)]``.

    Equal sample counts per chip -> one grouped product per chunk; else None (one product per chip).
    """
    groups = {}
    for s, i in enumerate(ids):
        groups.setdefault(i, []).append(s)
    keys = list(groups)
    per_chunk = max(1, chunk_bytes() // max(1, wbytes))
    out = []
    for c in range(0, len(keys), per_chunk):
        ks = keys[c:c + per_chunk]
        counts = {len(groups[k]) for k in ks}
        order = [s for k in ks for s in groups[k]]
        out.append((ks, order, counts.pop() if len(counts) == 1 else None))
    return out


def _is_range(order: List[int], batch: int) -> Optional[Tuple[int, int]]:
    """``(a, b)`` when the sample indices ``order`` are the run ``a, a+1, ..., b-1`` (host ints)."""
    n = len(order)
    if n == 0:
        return None
    a = order[0]
    if a + n <= batch and order == list(range(a, a + n)):
        return a, a + n
    return None


def _index(order: List[int]) -> torch.Tensor:
    return torch.tensor(order, dtype=torch.int64)


def _products(layer, xq, wsrc: _Weights, bias, p, ids, tile, out_dtype, wn_call=None):
    """The product of every sample with its instance's weights, restricted to one tile
    (``tile = (c0, c1)``), as one tensor ``[N, ...]`` in the product dtype. ``wn_call``: the one
    weight copy of a per_call / noise-free call, made once for all tiles."""
    c0, c1 = tile
    batch = xq.shape[0]
    xt = layer.x_tile(xq, c0, c1)
    if p.sampling == PER_CALL or not wsrc.noise or batch == 0:  # batch 0: one empty product
        wn = wn_call if wn_call is not None else wsrc.make(ids[:1] or [0])[0]
        return layer.fwd(xt, layer.w_tile(wn, c0, c1), bias)
    wbytes = torch.Size(layer.wshape).numel() * torch.empty(0, dtype=wsrc.cd).element_size()
    y = None
    start = 0
    for ks, order, n in _chunks(p, ids, wbytes):
        wn = wsrc.per_instance(ks, start) if p.sampling == PER_INSTANCE else wsrc.make(ks)
        start += len(ks)
        rng = _is_range(order, batch)
        xs = xt[rng[0]:rng[1]] if rng else xt.index_select(0, _index(order))
        if n is not None and (GROUPED_CHIPS or len(ks) == 1):
            part = layer.fwd(xs, layer.stack(layer.w_tile(wn, c0, c1)), bias, k=len(ks))
        else:
            parts, s0 = [], 0
            counts = [ids.count(k) for k in ks] if n is None else [n] * len(ks)
            for j, cnt in enumerate(counts):
                parts.append(layer.fwd(xs[s0:s0 + cnt], layer.w_tile(wn[j], c0, c1), bias))
                s0 += cnt
            part = torch.cat(parts)
        if rng and rng == (0, batch):
            return part
        y = _place(y, part, rng, order, batch)
    return y


# ---- forward ----------------------------------------------------------------------------------
def _forward(layer, plan: CallPlan, x, weight, bias):
    if x.dtype not in _SUPPORTED or weight.dtype != x.dtype:
        return NotImplemented
    C = _C()
    p = plan.p
    cd, fmt = plan.compute_dtype, plan.memory_format
    batch = x.shape[0]
    passes = _new_passes()
    xq = _quantize_ws("fwd_xq", _dense(x, fmt), p.in_lo, p.in_hi, p.in_bits, passes) if p.in_bits else x
    wsrc = _Weights.of(weight, plan, x.dtype)
    ids = plan.host_ids()  # CPU tensors: a memory load, not a device sync
    # one weight copy per call: made once (not per tile), in one parallel region with Q_in(x)
    one_copy = p.sampling == PER_CALL or not wsrc.noise or batch == 0
    wn_call = wsrc.make(ids[:1] or [0], passes)[0] if one_copy else None
    _run(passes)
    tiles = plan.tiles
    if not p.tiled:
        y = _products(layer, xq, wsrc, None if bias is None else bias, p, ids, tiles[0], x.dtype, wn_call)
        return _dense(y, fmt), x.new_empty((0,), dtype=torch.int32)
    acc = None
    words = None
    ids_t = torch.tensor(ids, dtype=torch.int64) if p.out_noise > 0 else None
    for t, tile in enumerate(tiles):
        part = _products(layer, xq, wsrc, None, p, ids, tile, x.dtype, wn_call)
        part = _dense(_to(part, cd), fmt)
        if p.out_noise > 0 and part.numel() == 0:
            pass  # an empty batch: no output noise to draw
        elif p.out_noise > 0 and cd == torch.float64:  # exact-check dtype: the torch stream (see _Weights.make)
            numel = part.numel()
            inst_of = ids_t.repeat_interleave(numel // batch)
            eps = stream.normals_at(p.seed, p.layer_key, stream.PURPOSE_OUT, inst_of,
                                    t * numel + torch.arange(numel, dtype=torch.int64))
            part.add_(p.out_noise * eps.to(cd).view(part.shape))
        elif p.out_noise > 0:
            C.cpu_out_noise_(part if part.dim() <= 4 else part.view(batch, -1), ids_t, t, p.out_noise,
                             p.seed, p.layer_key)
        if p.out_bits:
            if words is None:
                words = torch.empty((len(tiles), (part.numel() + 31) // 32), dtype=torch.int32)
            if acc is None:
                acc = part
            C.cpu_out_quant_(part, acc, words[t], p.out_lo, p.out_hi, p.out_bits, t == 0)
        else:
            acc = part if acc is None else acc.add_(part)
    if bias is not None:
        acc.add_(layer.bias_view(_to(bias, cd)))
    y = _dense(_to(acc, x.dtype), fmt)
    return y, (words if words is not None else x.new_empty((0,), dtype=torch.int32))


# ---- backward ---------------------------------------------------------------------------------
def _same_layout(shape, s1, s2) -> bool:
    """Whether two dense layouts of ``shape`` have one storage order (size-1 dims ignored)."""
    return all(a == b for n, a, b in zip(shape, s1, s2) if n > 1)


def _is_dense(t) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _ste_(grad, ref, lo, hi):
    """grad = 0 where ref is outside [lo, hi], in place via C++ (ref dense; grad laid out like ref)."""
    if not _same_layout(grad.shape, grad.stride(), ref.stride()) or not _is_dense(grad):
        grad = torch.empty_strided(ref.shape, ref.stride(), dtype=grad.dtype).copy_(grad)
    _C().cpu_ste_mask_(grad, ref, lo, hi)
    return grad


# The mask passes of the backward touch only the mask words with a cleared bit (in place, and the
# caller's gradient borrowed: masked in place, restored after the product) when at most this
# fraction of the words has one; else the dense passes. Measured (`python
# benchmarks/mask_pass_cpu.py`, 16x256x56x56 float32, 2 threads, docs/benchmarks_cpu.md): the
# sparse in-place pass beats the dense one up to about a sixth of the words cleared, borrow +
# restore beats the masked copy up to about a seventh; a pretrained CIFAR ResNet-32 clears 3-6%.
SPARSE_MAX_CLEARED = 0.12


def _sparse(words) -> bool:
    """Whether few enough words of ``words`` have a cleared bit for the sparse passes."""
    return _C().cpu_cleared_words(words) <= SPARSE_MAX_CLEARED * words.numel()


def _same_storage(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _out_masked_grads(g, out_mask, n_tiles: int, owned: bool, passes=None, borrowable: bool = True):
    """``(the incoming gradient through each tile's output mask, borrow or None)`` (C++ AVX2).

    One tile: in place when ``g`` is a copy made in this backward (``owned``), touching only the
    mask words with a cleared bit when they are few (`SPARSE_MAX_CLEARED`). Else ``g`` is the
    caller's gradient; with few cleared words it is *borrowed*: the returned ``CpuMaskedBorrow``
    kept the overwritten elements and its ``restore()``, which the caller runs once the products
    have read g, writes them back bit for bit (no version bump; nothing else runs on g in between). With many, or not
    ``borrowable`` (g shares memory with what the products read): masked into a reused workspace.
    Several tiles: one masked copy per tile.
    """
    if n_tiles == 1:
        words = out_mask[0].contiguous()
        sparse = _sparse(words)
        if owned:
            _kernel(passes, "mask_grad_out")(g, words, g, sparse)
            return [g], None
        if borrowable and sparse and passes is not None:
            return [g], passes.mask_grad_borrow(g, words)
        out = _workspace("bwd_g", g, g.dtype)
        _kernel(passes, "mask_grad_out")(g, words, out)
        return [out], None
    return [_C().cpu_mask_grad(g, out_mask[t].contiguous()) for t in range(n_tiles)], None


def _requantize(xc, p: OpParams, need_x: bool, need_w: bool, passes=None):
    """``(x for the weight gradient, packed in-range bits of x or None)``.

    The weight gradient needs ``Q_in(x)`` (xq is not saved); when the input gradient is needed too,
    the same pass over x packs the input's straight-through bits ``[in_lo <= x <= in_hi]`` (C++
    `cpu_quantize_mask_out`, storage order of xc), so the mask later reads 1/32 of x instead of x.
    """
    if not p.in_bits or not need_w:
        return xc, None
    xq = _workspace("bwd_xq", xc, xc.dtype)
    if not need_x:
        _kernel(passes, "quantize_out")(xc, xq, p.in_lo, p.in_hi, p.in_bits)
        return xq, None
    bits = _bits_workspace("bwd_xbits", xc.numel())
    _kernel(passes, "quantize_mask_out")(xc, xq, bits, p.in_lo, p.in_hi, p.in_bits)
    return xq, bits


def _input_ste_(grad_x, xc, x_bits, p: OpParams):
    """The input quantizer's straight-through mask on ``grad_x`` (owned by this backward), in place:
    from the bits packed by `_requantize` when grad_x has xc's storage order, else from xc."""
    if x_bits is not None and _is_dense(grad_x) and _same_layout(grad_x.shape, grad_x.stride(), xc.stride()):
        _C().cpu_mask_grad_out(grad_x, x_bits, grad_x, _sparse(x_bits))
        return grad_x
    return _ste_(grad_x, xc, p.in_lo, p.in_hi)


def _backward(layer, plan: CallPlan, grad_y, x, weight, out_mask, y_stride, need_x, need_w):
    if x.dtype not in _SUPPORTED or weight.dtype != x.dtype:
        return NotImplemented
    p = plan.p
    cd, fmt = plan.compute_dtype, plan.memory_format
    xc = _dense(_to(x, cd), fmt)
    g = _dense(_to(grad_y, cd), fmt)
    if p.out_bits and not _same_layout(g.shape, g.stride(), y_stride):
        # the mask bits follow y's storage order: lay the gradient out like y was
        g = torch.empty_strided(g.shape, tuple(y_stride), dtype=cd).copy_(g)
    tiles = plan.tiles
    # the out mask of g, Q_in(x) (+ its bits) and the per_call Wn: one parallel region
    passes = _new_passes()
    borrow = None
    if p.out_bits:
        # a gradient that shares memory with x or the weights (y.backward(x)) is copied, not borrowed
        borrowable = not any(_same_storage(g, t) for t in (xc, weight))
        g_tiles, borrow = _out_masked_grads(g, out_mask, len(tiles), owned=g is not grad_y, passes=passes,
                                            borrowable=borrowable)
    else:
        g_tiles = [g] * len(tiles)
    try:
        grad_x, grad_w, wsrc, x_bits = _grads(layer, plan, xc, g_tiles, weight, need_x, need_w, passes)
    finally:
        if borrow is not None:
            borrow.restore()
    if grad_x is not None:
        if p.in_bits:
            grad_x = _input_ste_(grad_x, xc, x_bits, p)
        grad_x = _to(grad_x, x.dtype)
    if grad_w is not None:
        if p.w_clip:
            grad_w = _ste_(grad_w, wsrc.source(), wsrc.lo, wsrc.hi)
        grad_w = _to(grad_w, weight.dtype)
    return grad_x, grad_w


def _grads(layer, plan: CallPlan, xc, g_tiles, weight, need_x, need_w, passes):
    """``(grad_x, grad_w, weight source, x's packed in-range bits)`` before the straight-through
    masks of the input and weight clips: runs ``passes`` (with ``Q_in(x)`` and ``Wn`` added) and the
    ATen products of every tile."""
    p = plan.p
    cd = plan.compute_dtype
    batch = xc.shape[0]
    tiles = plan.tiles
    xq, x_bits = _requantize(xc, p, need_x, need_w, passes)
    wsrc = _Weights.of(weight, plan, cd, noise=not p.clean_grad_input)
    grad_x = grad_w = None
    single = len(tiles) == 1
    ids = plan.host_ids()  # CPU tensors: a memory load, not a device sync
    if p.sampling == PER_CALL or not wsrc.noise or batch == 0:  # batch 0: one empty product
        # the weight gradient alone does not read the weights: no Philox pass for it
        wn = wsrc.make(ids[:1] or [0], passes)[0] if need_x else torch.empty(layer.wshape, dtype=cd)
        _run(passes)
        if single:  # one ATen call for both gradients (grad_x via Wn, grad_w via xq)
            grad_x, grad_w = layer.bwd(g_tiles[0], xq, wn, need_x, need_w)
        else:
            if need_x:
                grad_x = torch.empty_like(xc)
            if need_w:
                grad_w = torch.zeros(layer.wshape, dtype=cd)
            for (c0, c1), g_t in zip(tiles, g_tiles):
                gx_t, gw_t = layer.bwd(g_t, layer.x_tile(xq, c0, c1), layer.w_tile(wn, c0, c1), need_x, need_w)
                if need_x:
                    layer.put_x_tile(grad_x, gx_t, c0, c1)
                if need_w:
                    layer.w_tile(grad_w, c0, c1).copy_(gw_t)
    else:
        _run(passes)
        if need_x:
            grad_x = torch.empty_like(xc)
            for (c0, c1), g_t in zip(tiles, g_tiles):
                gx_t = _grad_input_grouped(layer, g_t, layer.x_tile(xc, c0, c1), wsrc, p, ids, (c0, c1))
                layer.put_x_tile(grad_x, gx_t, c0, c1)
        if need_w:
            grad_w = torch.zeros(layer.wshape, dtype=cd)
            for (c0, c1), g_t in zip(tiles, g_tiles):
                _, gw_t = layer.bwd(g_t, layer.x_tile(xq, c0, c1),
                                    layer.w_tile(torch.empty(layer.wshape, dtype=cd), c0, c1), False, True)
                layer.w_tile(grad_w, c0, c1).copy_(gw_t)
    return grad_x, grad_w, wsrc, x_bits


def _grad_input_grouped(layer, g, xt, wsrc: _Weights, p, ids, tile):
    """Input gradient of one tile with per-sample / per-chip noisy weights (chunked)."""
    c0, c1 = tile
    batch = xt.shape[0]
    wbytes = torch.Size(layer.wshape).numel() * torch.empty(0, dtype=wsrc.cd).element_size()
    out = None
    start = 0
    for ks, order, n in _chunks(p, ids, wbytes):
        wn = wsrc.per_instance(ks, start) if p.sampling == PER_INSTANCE else wsrc.make(ks)
        start += len(ks)
        rng = _is_range(order, batch)
        xs = xt[rng[0]:rng[1]] if rng else xt.index_select(0, _index(order))
        gs = g[rng[0]:rng[1]] if rng else g.index_select(0, _index(order))
        if n is not None:
            part, _ = layer.bwd(gs, xs, layer.stack(layer.w_tile(wn, c0, c1)), True, False, k=len(ks))
        else:
            parts, s0 = [], 0
            for j, k in enumerate(ks):
                cnt = ids.count(k)
                pj, _ = layer.bwd(gs[s0:s0 + cnt], xs[s0:s0 + cnt], layer.w_tile(wn[j], c0, c1), True, False)
                parts.append(pj)
                s0 += cnt
            part = torch.cat(parts)
        if rng and rng == (0, batch):
            return part
        out = _place(out, part, rng, order, batch)
    return out


# ---- the chip-weight primitive ------------------------------------------------------------------
def noisy_weights(weight: torch.Tensor, p: OpParams, ids: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``[len(ids), *weight.shape]`` noisy weights of the instance ids in ``dtype``, exactly as the
    forward generates them (``Wn = Q_w(clip(W))·(1 + eta_mul·ε') + σ·ε``, RNG contract of
    `noisyops.stream`); what chip owners (`noisyops.chip_store`) pass back as ``chip_weights``."""
    lo, hi = p.weight_range(weight) if (p.has_weight_noise or p.w_clip) else (0.0, 0.0)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return _Weights(weight, p, cd, dtype, lo, hi, p.sigma(lo, hi)).make(list(ids))


# ---- the four kernels ---------------------------------------------------------------------------
def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, p: OpParams, instance, plan=None):
    """`noisyops.reference.conv2d_fwd` on the C++ CPU kernels (see the module docstring)."""
    plan = plan or conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance)
    return _forward(_Conv(weight, stride, padding, dilation, groups), plan, x, weight, bias)


def conv2d_bwd(grad_y, x, weight, stride, padding, dilation, groups, p: OpParams, instance, out_mask,
               y_stride, needs_input_grad=True, needs_weight_grad=True, plan=None):
    """`noisyops.reference.conv2d_bwd` on the C++ CPU kernels; noise regenerated, never stored."""
    plan = plan or conv2d_plan(x, weight, stride, padding, dilation, groups, p, instance)
    return _backward(_Conv(weight, stride, padding, dilation, groups), plan, grad_y, x, weight,
                     out_mask, y_stride, needs_input_grad, needs_weight_grad)


def linear_fwd(x, weight, bias, p: OpParams, instance, plan=None):
    """`noisyops.reference.linear_fwd` on the C++ CPU kernels (a 1-D ``x`` is one sample)."""
    plan = plan or linear_plan(x, weight, p, instance)
    out = _forward(_Linear(weight), plan, x.unsqueeze(0).contiguous()
                   if plan.unbatched else x.contiguous(), weight, bias)
    if out is NotImplemented or not plan.unbatched:
        return out
    return out[0].reshape(plan.out_shape), out[1]


def linear_bwd(grad_y, x, weight, p: OpParams, instance, out_mask, y_stride,
               needs_input_grad=True, needs_weight_grad=True, plan=None):
    """`noisyops.reference.linear_bwd` on the C++ CPU kernels."""
    plan = plan or linear_plan(x, weight, p, instance)
    if plan.unbatched:
        grad_y, x = grad_y.unsqueeze(0), x.unsqueeze(0)
    out = _backward(_Linear(weight), plan, grad_y.contiguous(), x.contiguous(), weight, out_mask,
                    plan.batched_y_stride(y_stride), needs_input_grad, needs_weight_grad)
    if out is NotImplemented or not plan.unbatched:
        return out
    gx, gw = out
    return (gx.squeeze(0) if gx is not None else None), gw
