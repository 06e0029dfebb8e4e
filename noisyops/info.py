"""`python -m noisyops.info`: which backends can run here, and why the others cannot."""
from __future__ import annotations

import os
import platform
import sys


def report() -> str:
    import torch

    from . import __version__, dispatch

    lines = [f"noisyops {__version__}  (python {platform.python_version()}, torch {torch.__version__}, "
             f"CUDA build {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    except ImportError:
        lines.append("triton: not installed")
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(f"CUDA devices: {cuda_devices}; CPU threads: {torch.get_num_threads()}")
    forced = os.environ.get("NOISYOPS_BACKEND") or "(not set: fastest available per device)"
    lines.append(f"NOISYOPS_BACKEND: {forced}")
    lines.append("")
    lines.append(f"{'backend':<10} {'available':<10} runs on / reason")
    for name, (ok, reason) in dispatch.status().items():
        devs = ",".join(dispatch.backend(name).devices()) if ok else ""
        lines.append(f"{name:<10} {'yes' if ok else 'no':<10} {devs + ': ' if devs else ''}{reason}")
    lines.append("")
    for dev, order in dispatch.PREFERENCE.items():
        lines.append(f"default order on {dev} tensors: {' > '.join(order)}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
