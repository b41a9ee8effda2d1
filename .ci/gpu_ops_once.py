"""One small call of each CUDA op, for compute-sanitizer (memcheck, racecheck, synccheck).

Small shapes that still reach every code path: several position tiles and sample splits
(Linear T > 16), the T = 1 GEMM, a grouped conv, a multi-tensor batch with an empty tensor and
special Fishers, the Gaussian with torch.Generator("cuda"). Exits 0 when every call ran.
"""

from __future__ import annotations

import torch

from mnemo_fast.fast import _ext, ops

import os

cuda = torch.device(os.environ.get("MNEMO_GPU_CHECK_DEVICE", "cuda"))  # "cpu": a dry run
assert cuda.type == "cpu" or _ext.has_cuda_kernels(cuda), f"no CUDA kernels ({_ext.load_error()})"
gen = torch.Generator().manual_seed(0)

g, x = torch.randn(3, 37, 70, generator=gen).to(cuda), torch.randn(3, 37, 65, generator=gen).to(cuda)
ops.sum_sq_grad_linear(g, x)
ops.sum_sq_grad_linear(g[:, :1], x[:, :1])
x4 = torch.randn(2, 4, 9, 7, generator=gen).to(cuda)
g4 = torch.randn(2, 6, 9, 7, generator=gen).to(cuda)
ops.sum_sq_grad_conv2d(g4, x4, 3, 1, 1, 1, 2)

shapes = [(5000,), (3, 4), (0,), (1,)]
forget = [torch.rand(s, generator=gen).to(cuda) for s in shapes]
remain = [torch.rand(s, generator=gen).to(cuda) for s in shapes]
forget[0][:3] = torch.tensor([0.0, float("inf"), float("nan")])
remain[0][3] = 0.0
ratio = ops.perturb_max_ratio(forget, remain)
params = [torch.randn(s, generator=gen).to(cuda) for s in shapes]
ops.perturb_shift_(params, forget, remain, ratio, 1e-3, 10.0, 1.0)
ops.perturb_gaussian_(params, forget, remain, ratio, 1e-3, 10.0, 0.5, torch.Generator(cuda.type).manual_seed(1))
forget64 = [f.double() for f in forget]
ops.perturb_max_ratio(forget64, [r.double() for r in remain])
if cuda.type == "cuda":
    torch.cuda.synchronize()
print("gpu_ops_once: all ops ran")
