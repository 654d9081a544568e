"""Triton kernels with their torch references (paged and shared-prefix decode attention).

Imports nothing of ours. The kernels themselves come with the Triton-kernels work; the
walking skeleton's engine uses torch SDPA.
"""
