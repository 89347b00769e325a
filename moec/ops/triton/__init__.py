"""Triton kernels for the MoE region, one kernel family per module.

`router` (softmax + top-k + renormalise + per-expert counts), `align` (sort assignments into
expert-major blocks), `grouped_gemm` (gate/up with the activation fused, down with the routing
weight and the scatter to token order fused), composed by `fused_moe`. `moec.ops.fused_moe`
registers the composition as the `moec::fused_moe` triton_op. Launch configs live in `configs`.

Everything here is tested on CPU under `TRITON_INTERPRET=1` (tests/test_triton_kernels.py).
"""
