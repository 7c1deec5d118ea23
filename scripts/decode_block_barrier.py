"""Times kernels.decode_block's grid barrier alone on a GPU: kernels of a program per SM that pass 0, 4 or 32
barriers and nothing else, 20 calls in one jitted loop; the cost of a barrier is the slope.
    PYTHONPATH=. python scripts/decode_block_barrier.py"""

import functools
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import decode_block
from kernels.common import compiler_params

CALLS = 20


def barriers(n: int, programs: int, warps: int):
    def kernel(_, sync):
        for _ in range(n):
            decode_block._grid_barrier(sync, programs)

    word = pl.BlockSpec((1,), lambda i: (0,))
    call = pl.pallas_call(kernel, grid=(programs,), in_specs=[word], out_specs=word,
                          out_shape=jax.ShapeDtypeStruct((1,), jnp.int32), input_output_aliases={0: 0},
                          compiler_params=compiler_params(num_warps=warps, num_stages=1))
    return jax.jit(lambda s: jax.lax.fori_loop(0, CALLS, lambda i, s: call(s), s), donate_argnums=0)


def main():
    programs = jax.local_devices()[0].core_count
    print(f"{jax.devices()[0].device_kind}: {programs} programs")
    for warps in (8, 4):
        for n in (0, 4, 32):
            run, sync = barriers(n, programs, warps), jnp.zeros((1,), jnp.int32)
            sync = run(sync).block_until_ready()
            start = time.perf_counter()
            for _ in range(10):
                sync = run(sync)
            sync.block_until_ready()
            seconds = (time.perf_counter() - start) / (10 * CALLS)
            print(f"warps {warps}, {n} barriers: {seconds * 1e6:.2f} us a kernel")


if __name__ == "__main__":
    main()
