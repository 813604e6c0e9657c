"""Minimal reproducer: torch.compile (inductor) faults on a parameter that is not 16-byte aligned when the
same compiled graph was first built with aligned parameters.

Inductor treats parameters as static inputs. For a static input whose example was aligned when the graph
was compiled, it emits Triton code that assumes 16-byte alignment (vectorised loads) and never checks the
address again at run time (torch/_inductor/compile_fx.py get_input_idxs_to_check). Blocks of one model share
one compiled graph; when DeepSpeed packs bf16 parameters into a flat buffer without padding, a parameter
with an odd number of 8-byte units (e.g. a (12, 513) bias) shifts every later parameter by 8 bytes, so the
second block's parameters are misaligned: "CUDA error: misaligned address".

    python tests/repro/inductor_misaligned_params.py [--aligned]

Exit status 0 when both calls run (--aligned: both modules' parameters aligned), otherwise the CUDA error.
The project works around it by keeping parameters aligned (lm.model.longvq pads its relative bias to a
multiple of 8 entries; ZeRO-1/2 run with zero_optimization.parameter_alignment; lm.engine checks).
"""

import argparse
import sys

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, flat: torch.Tensor, offset: int, dim: int):
        super().__init__()
        # a view into the shared flat buffer, as DeepSpeed's flattened parameters are
        self.weight = nn.Parameter(flat[offset: offset + dim])
        self.bias = nn.Parameter(flat[offset + dim: offset + 2 * dim])

    def forward(self, x):
        return torch.nn.functional.silu(x * self.weight + self.bias)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--aligned", action="store_true", help="place the second block on a 16-byte boundary too")
    args = p.parse_args(argv)
    dim = 4096
    flat = torch.randn(4 * dim + 64, device="cuda", dtype=torch.bfloat16)
    first = Block(flat, 0, dim)  # offset 0: aligned
    second = Block(flat, 2 * dim + (8 if args.aligned else 4), dim)  # 4 bf16 = 8 bytes: misaligned
    print("second block weight address % 16 =", second.weight.data_ptr() % 16, flush=True)
    x = torch.randn(64, dim, device="cuda", dtype=torch.bfloat16)
    compiled = [torch.compile(b.forward, dynamic=False) for b in (first, second)]  # one graph, as lm compiles blocks
    with torch.no_grad():
        a = compiled[0](x)
        b = compiled[1](x)
        torch.cuda.synchronize()
    torch.testing.assert_close(b, second(x), rtol=2e-2, atol=2e-2)  # bf16: fused vs eager rounding
    print("ok", float(a.float().sum()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
