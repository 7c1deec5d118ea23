"""Compiles the block decoding kernel (kernels/decode_block.py) at GPT-2 Medium's widths for an H100
(sm_90a) on any machine, GPU or not, and prints for each rule and row count the registers a thread, shared
memory and spills, and whether a program per SM fits in both (every program of the persistent grid must be
resident at once).

    pip install triton==3.6.0   # its compiler and ptxas; JAX is not affected
    PYTHONPATH=. JAX_PLATFORMS=cpu python scripts/decode_block_ptx.py

XLA compiles the kernel with a Triton of its own, so these figures estimate what it emits rather than quote it.
"""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from kernels import decode_block
from tests.kernels.kernel_checks import triton_modules_for_cuda
from tests.kernels.test_decode_block import RULE_KEY_DIMS, gpt2_medium_call

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
REGISTERS_PER_SM, SHARED_PER_SM = 65536, 227 * 1024  # an H100's, for one program
THREADS = 32 * decode_block.NUM_WARPS


def report(rule: str, rows: int) -> str:
    call, args = gpt2_medium_call(rule, rows)
    [module] = triton_modules_for_cuda(call, *args)
    with tempfile.TemporaryDirectory() as folder:
        ttir, ptx = (os.path.join(folder, f"{rule}.{suffix}") for suffix in ("ttir", "ptx"))
        with open(ttir, "w") as out:
            out.write(module)
        kernel = triton.compile(ttir, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": decode_block.NUM_WARPS, "num_stages": 1})
        with open(ptx, "w") as out:
            out.write(kernel.asm["ptx"])
        ptxas = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                               text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas).groups()
    allocated = -(-registers // 8) * 8  # registers are allocated a warp's 256 at a time
    fits = allocated * THREADS <= REGISTERS_PER_SM and kernel.metadata.shared <= SHARED_PER_SM
    return (f"{rule:12s} rows {rows}: {registers} registers a thread, {kernel.metadata.shared} bytes of shared "
            f"memory, spill stores/loads {stores}/{loads} bytes, a program per SM {'fits' if fits else 'does not fit'}")


if __name__ == "__main__":
    for rule in RULE_KEY_DIMS:
        for rows in (1, 2):
            print(report(rule, rows))
