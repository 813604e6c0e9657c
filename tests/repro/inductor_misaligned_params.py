"""Minimal reproducer: torch.compile (inductor) faults on a parameter that is not 16-byte aligned when the
same compiled graph was first built with aligned parameters.

Inductor treats parameters as static inputs. For a static input whose example was aligned when the graph
was compiled, it emits Triton code that assumes 16-byte alignment (vectorised loads) and never checks the
address again at run time (torch/_inductor/compile_fx.py get_input_idxs_to_check). Blocks of one model share
one compiled graph; when DeepSpeed packs bf16 parameters into a flat buffer without padding, a parameter
with an odd number of 8-byte units (e.g. a (12, 513) bias) shifts every later parameter by 8 bytes, so the
second block's parameters are misaligned: "CUDA error: misaligned address".

    python tests/repro/inductor_misaligned_params.py [--aligned] [--variant pointwise|rmsnorm|select|all]

Two blocks whose parameters are views into one flat bf16 buffer, the second one 8 bytes off a 16-byte
boundary (--aligned: on one), each block's forward compiled as lm compiles blocks; each variant runs in its
own process (a CUDA fault poisons the process). Prints one line per variant, "ok" or the error; exit status
0 when every variant ran. The project keeps parameters aligned instead (lm.model.longvq pads its relative
bias to a multiple of 8 entries; ZeRO-1/2 run with zero_optimization.parameter_alignment; lm.engine checks).
"""

import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("pointwise", "rmsnorm", "select")


class Block(nn.Module):
    def __init__(self, flat: torch.Tensor, offset: int, dim: int, variant: str):
        super().__init__()
        self.variant = variant
        # views into the shared flat buffer, as DeepSpeed's flattened parameters are
        self.weight = nn.Parameter(flat[offset: offset + dim])
        self.scale = nn.Parameter(flat[offset + dim: offset + 3 * dim].view(2, dim))

    def forward(self, x):
        if self.variant == "pointwise":
            return F.silu(x * self.weight + self.scale[1])
        if self.variant == "rmsnorm":  # a per-row reduction kernel reading the weight along the row
            return F.rms_norm(x, (x.shape[-1],), self.weight) * F.silu(x)
        return F.rms_norm(F.silu(x) * self.scale[0] + self.scale[1], (x.shape[-1],), None)  # select of a 2-D parameter


def run(variant: str, aligned: bool) -> None:
    dim = 768
    flat = torch.randn(8 * dim + 64, device="cuda", dtype=torch.bfloat16)
    first = Block(flat, 0, dim, variant)  # offset 0: aligned
    second = Block(flat, 3 * dim + (8 if aligned else 4), dim, variant)  # 4 bf16 = 8 bytes: misaligned
    x = torch.randn(4096, dim, device="cuda", dtype=torch.bfloat16)
    compiled = [torch.compile(b.forward, dynamic=False) for b in (first, second)]  # one graph for both, as in lm
    with torch.no_grad():
        compiled[0](x)
        b = compiled[1](x)
        torch.cuda.synchronize()
    torch.testing.assert_close(b, second(x), rtol=3e-2, atol=3e-2)  # bf16: fused vs eager rounding


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--aligned", action="store_true", help="place the second block on a 16-byte boundary too")
    p.add_argument("--variant", default="all", choices=VARIANTS + ("all",))
    args = p.parse_args(argv)
    if args.variant != "all":
        run(args.variant, args.aligned)
        return 0
    failed = 0
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", v] + (["--aligned"] if args.aligned else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = (proc.stdout + proc.stderr).splitlines()
        err = ([ln for ln in lines if "misaligned address" in ln] or [ln for ln in lines if "CUDA error" in ln]
               or [ln for ln in lines if "Error" in ln])
        print(f"{v}: {'ok' if proc.returncode == 0 else 'failed: ' + (err[0] if err else str(proc.returncode))}", flush=True)
        failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
