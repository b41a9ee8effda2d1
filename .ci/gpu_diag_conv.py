"""Which CPU conv call crashes in a CUDA build (a device-run diagnostic; each call in its own process)."""
import subprocess
import sys

CALLS = {
    "error: kernel 6 > 5": "ops.sum_sq_grad_conv2d(g, x, 6, stride=2)",
    "error: dilated span 7 > 5": "ops.sum_sq_grad_conv2d(g, x, 3, stride=2, dilation=3)",
    "valid: padded 7 >= 6": "ops.sum_sq_grad_conv2d(g, x, 6, stride=2, padding=1)",
    "valid: ordinary 3x3": "ops.sum_sq_grad_conv2d(torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5), 3, padding=1)",
    "error: linear bad shapes": "ops.sum_sq_grad_linear(torch.randn(2, 3), torch.randn(2, 3))",
    "error: conv bad dtype": "ops.sum_sq_grad_conv2d(g.double(), x, 3)",
    "error: c10 check in aten": "torch.ones(2) + torch.ones(3)",
}
PRELUDE = ("import faulthandler, torch; faulthandler.enable(); from mnemo_fast.fast import ops; "
           "x = torch.randn(1, 1, 5, 5); g = torch.randn(1, 1, 1, 1)\n"
           "try:\n    r = {call}\n    print('returned', tuple(r.shape) if r is not None else None)\n"
           "except Exception as e:\n    print('raised', type(e).__name__, str(e).splitlines()[0][:150])\n")
for name, call in CALLS.items():
    for threads in ("1", "16"):
        p = subprocess.run([sys.executable, "-c", PRELUDE.format(call=call)], capture_output=True, text=True,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": threads})
        last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"{name} [threads {threads}]: rc {p.returncode}: {last}", flush=True)
        if p.returncode != 0:
            print("   ", " | ".join(p.stderr.strip().splitlines()[:6]), flush=True)
