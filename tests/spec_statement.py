"""SPEC section 1-3 written out once more, as plainly as possible, independently of
noisyops.reference: one sample at a time, tiles by slicing channels, float64 arithmetic.
Only for tests (slow)."""
import torch
import torch.nn.functional as F

from noisyops import stream

SAMPLING = {"per_call": 0, "per_sample": 1, "per_instance": 2}


def Q(v, lo, hi, bits):
    if bits is None:
        return v
    lo = torch.tensor(lo, dtype=v.dtype)
    hi = torch.tensor(hi, dtype=v.dtype)
    delta = (hi - lo) / (2 ** bits - 1)
    return lo + torch.round((v.clamp(lo, hi) - lo) / delta) * delta


def instance_of_sample(cfg, s, instance):
    if cfg.sampling == "per_instance":
        return int(instance[s])
    if cfg.sampling == "per_sample":
        return instance * 2**24 + s
    return instance


def noisy_weight(W, cfg, seed, layer_key, inst):
    if cfg.w_range is None:
        s = float(W.double().std())
        lo, hi, clip = -2 * s, 2 * s, False
    elif isinstance(cfg.w_range, float):
        s = float(W.double().std())
        lo, hi, clip = -cfg.w_range * s, cfg.w_range * s, True
    else:
        (lo, hi), clip = cfg.w_range, True
    Wq = W.double()
    if clip:
        Wq = Q(Wq.clamp(lo, hi), lo, hi, cfg.w_bits)
    n = W.numel()
    eps = stream.normals(seed, layer_key, 0, inst, n).double().view(W.shape)
    eps_m = stream.normals(seed, layer_key, 1, inst, n).double().view(W.shape)
    return Wq * (1 + cfg.eta_mul * eps_m) + cfg.eta * (hi - lo) * eps


def tiles(cin, kernel_numel, tile_rows):
    if tile_rows is None:
        return [(0, cin)]
    per = max(1, tile_rows // kernel_numel)
    return [(c, min(c + per, cin)) for c in range(0, cin, per)]


def layer(x, W, b, cfg, seed, layer_key, instance, product, kernel_numel):
    """y for every sample; ``product(x_s, W_slice, c0, c1)`` gives one tile's partial sum."""
    xq = Q(x.double(), *(cfg.in_range or (0, 1)), cfg.in_bits) if cfg.in_bits else x.double()
    outs = []
    per_tile_numel = None
    ys = []
    for s in range(x.shape[0]):
        inst = instance_of_sample(cfg, s, instance)
        Wn = noisy_weight(W, cfg, seed, layer_key, inst)
        ys.append([(inst, product(xq[s:s + 1], Wn, c0, c1))
                   for c0, c1 in tiles(W.shape[1], kernel_numel, cfg.tile_rows)])
    per_sample_numel = ys[0][0][1].numel()
    numel = per_sample_numel * x.shape[0]
    for s, tiles_s in enumerate(ys):
        y = 0
        for t, (inst, part) in enumerate(tiles_s):
            if cfg.out_noise:
                elems = t * numel + s * per_sample_numel + torch.arange(per_sample_numel)
                eps = stream.normals_at(seed, layer_key, 2, inst, elems).double().view(part.shape)
                part = part + cfg.out_noise * eps
            if cfg.out_bits:
                part = Q(part, *cfg.out_range, cfg.out_bits)
            y = y + part
        outs.append(y)
    y = torch.cat(outs)
    if b is not None:
        y = y + (b.double().view(1, -1, 1, 1) if y.dim() == 4 else b.double())
    return y


def conv2d(x, W, b, stride, padding, dilation, cfg, seed, layer_key, instance):
    def product(xs, Wn, c0, c1):
        return F.conv2d(xs[:, c0:c1], Wn[:, c0:c1], None, stride, padding, dilation)
    return layer(x, W, b, cfg, seed, layer_key, instance, product, W.shape[2] * W.shape[3])


def linear(x, W, b, cfg, seed, layer_key, instance):
    def product(xs, Wn, c0, c1):
        return xs[..., c0:c1] @ Wn[:, c0:c1].t()
    return layer(x, W, b, cfg, seed, layer_key, instance, product, 1)
