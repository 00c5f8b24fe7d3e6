"""The causal depthwise short conv + activation as Pallas kernels on the Triton (GPU) backend.

Math ([B, T, C] x, [Kc, C] w; a tap counts only inside the current token's document):
    acc[t] = sum_j w[j] x[t - (Kc-1) + j]   (fp32),   y[t] = act(acc[t])
    dacc   = dy * act'(acc),   dx[t] = sum_m w[Kc-1-m] dacc[t+m],   dw[j] = sum_t dacc[t] x[t-(Kc-1)+j]

Stages (one module each): ``tiles.py`` (the specialisation, shifted gather loads, the segment masks,
the pre-activation, the launch), ``forward.py`` (short_conv_fwd), ``backward.py`` (short_conv_bwd),
``ops.py`` (the custom_vjp and the entry ``pallas_short_conv``). Launch parameters: ``../config.py``.

Design. The grid is (T-blocks, C-blocks, B), tiles [BT, BC] powers of two; the last tiles in T and C
are masked, so any T and C work. The halo is not a separate load: each of the Kc taps is its own
[BT, BC] load at a row offset, so HBM (through L1/L2) sees about one read of x per pass. HBM bytes:
the forward reads x once and writes y once (2 x 2 bytes/element in bf16), the floor; the backward
reads x and dy once and writes dx once (3 x 2 bytes/element) plus the fp32 dw partials
(Kc x C x 4 bytes per program walk, ~B x T / (BT x steps) of them, a few per cent at T = 8192), again
the floor: the pre-activation is recomputed (16 FMAs and Kc activation slopes per element, cheap
next to the bytes), not stored by the forward. XLA's autodiff of the shifted sum instead writes
each shifted cotangent and reduces dw over T in separate passes (``reduce_sum``, ``add_any``).

Rounding: every accumulator is fp32 (acc, dacc, dx, dw); y and dx are rounded once, to x.dtype;
the dw partials are summed in fp32 and rounded once to w.dtype. The forward sums the taps in the
reference's order (same fp32 values up to FMA contraction); dx differs from XLA's autodiff of the
reference, which sums the shifted cotangents in x.dtype.
"""

from .ops import pallas_short_conv

__all__ = ["pallas_short_conv"]
