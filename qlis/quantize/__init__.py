"""Quantize: one layer at a time, from float weights to codes on a grid and back.

The quantizers and the grids they describe (quantizers, grid), the pruners, GPTQ's error
feedback along an input covariance (gptq), learned rounding (rounding), and sequential
reconstruction of a model's layers on the quantized model's own inputs (reconstruct). Nothing
here knows about archives or policies.
"""
