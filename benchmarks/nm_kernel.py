"""GPU time of the Triton N:M kernel (lit_eff.kernels.nm_sparsify) vs its torch reference.

For each weight shape, dtype and N:M pattern: forward only (mask + ``W ⊙ (E + β(1−E))``) and
forward + backward (with the SR-STE term), Triton and torch alternating over several rounds in one
process, CUDA-event timed. Printed: median microseconds per call and reference / Triton (> 1 means
the kernel is faster). Needs a CUDA GPU and triton; elsewhere it says so and exits (status 0).
The interpreter (TRITON_INTERPRET=1) is for correctness only: never time it.

    python benchmarks/nm_kernel.py [--rounds 5] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from lit_eff.kernels.nm_sparsify import _apply, triton_available

SHAPES = [(768, 3072), (3072, 768), (4096, 4096), (8192, 2048)]  # ViT-B MLP, GPT-ish projections
PATTERNS = [(2, 4), (1, 8), (1, 16), (1, 32)]
DTYPES = [torch.float32, torch.bfloat16]


def time_us(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def make_calls(weight: torch.Tensor, n: int, m: int, backend: str):
    grad = torch.randn_like(weight)

    def forward():
        with torch.no_grad():
            _apply(weight, n, m, 0.3, 2e-4, backend)

    def forward_backward():
        weight.grad = None
        out, _ = _apply(weight, n, m, 0.3, 2e-4, backend)
        out.backward(grad)

    return forward, forward_backward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/nm_kernel.py: no CUDA GPU here, nothing to time (the Triton kernel runs on CUDA only; "
              "CPU runs use the torch reference). Run it on a GPU machine.")
        return 0
    if not triton_available():
        print("benchmarks/nm_kernel.py: triton is not installed (it ships for Linux x86_64); nothing to time.")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.rounds} rounds x "
          f"{args.iters} calls, microseconds per call")
    print(f"{'shape':>12} {'dtype':>9} {'n:m':>5} | {'fwd torch':>9} {'fwd triton':>10} {'ratio':>6} | "
          f"{'f+b torch':>9} {'f+b triton':>10} {'ratio':>6}")
    ratios = []
    for shape in SHAPES:
        for dtype in DTYPES:
            weight = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            for n, m in PATTERNS:
                calls = {b: make_calls(weight, n, m, b) for b in ("torch", "triton")}
                for b in calls:  # warm-up (Triton compiles here)
                    for fn in calls[b]:
                        fn()
                torch.cuda.synchronize()
                times = {(b, k): [] for b in calls for k in (0, 1)}
                for _ in range(args.rounds):
                    for b in calls:
                        for k in (0, 1):
                            times[(b, k)].append(time_us(calls[b][k], args.iters))
                med = {key: statistics.median(v) for key, v in times.items()}
                fwd, both = med[("torch", 0)] / med[("triton", 0)], med[("torch", 1)] / med[("triton", 1)]
                ratios.append(both)
                print(f"{str(shape):>12} {str(dtype).removeprefix('torch.'):>9} {f'{n}:{m}':>5} | "
                      f"{med[('torch', 0)]:9.1f} {med[('triton', 0)]:10.1f} {fwd:6.2f} | "
                      f"{med[('torch', 1)]:9.1f} {med[('triton', 1)]:10.1f} {both:6.2f}")
    print(f"forward+backward speedup of Triton over torch: median {statistics.median(ratios):.2f}x, "
          f"min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
