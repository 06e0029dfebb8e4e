"""Launch configurations of the GEMM kernels: autotune lists for sm_80 (A100) and sm_90 (H100),
and the single config used under ``TRITON_INTERPRET=1`` (the interpreter rejects multi-config
autotune and ``do_bench``; big tiles make it fast on small test shapes).

A config is ``dict(BM=, BN=, BK=, num_warps=, num_stages=, maxnreg=)`` (``maxnreg``: ptx
``.maxnreg``; 8-warp configs get 128 and 4-warp ones 255, so ptxas does not squeeze them to 64-96
registers and spill, as it did without it). ``benchmarks/compile_report.py``
compiles every config of every kernel for both archs and fails on spills or shared memory over
the device limit, so these lists are checked without a GPU.

Register budget: the regenerate-on-chip path keeps a ``BK x BN`` weight tile of Philox states in
registers (4 words + counters per element), so ``BK·BN/(32·num_warps)`` elements per thread must
stay small: the compile report showed spills at 16 and more (BM=64/128 tiles), none with
the tiles below (<= 4 weight and <= 8 epilogue elements per thread). Larger tiles need the
epilogue RNG split into sub-tiles first (future work).
"""
from __future__ import annotations

import os
from typing import Dict, List

ELEMENTWISE_BLOCK = 1024


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _c(BM, BN, BK, w, s, maxnreg=None):
    return dict(BM=BM, BN=BN, BK=BK, num_warps=w, num_stages=s, maxnreg=maxnreg)


# forward / input-grad GEMM: rows x out-columns, reduction over BK
GEMM: Dict[int, List[dict]] = {
    80: [_c(32, 32, 16, 8, 2, 128), _c(32, 16, 16, 4, 2, 255)],
    90: [_c(32, 32, 16, 8, 3, 168), _c(32, 16, 16, 4, 3, 255)],
}
# weight-grad GEMM: out-channels x in-channels, reduction over rows (split-K with fp32 atomics)
WGRAD: Dict[int, List[dict]] = {
    80: [_c(32, 32, 32, 4, 2)],
    90: [_c(32, 32, 16, 4, 3, 255)],
}
INTERPRET_CONFIG = _c(64, 32, 32, 1, 1)
ARCHS = (80, 90)


def arch_of(device) -> int:
    """80 or 90: the config family for a CUDA device (sm_8x -> 80, sm_9x and newer -> 90)."""
    import torch
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80
