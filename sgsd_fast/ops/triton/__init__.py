"""Triton kernels of the fused ops, one module per op (imported lazily by the op that needs it).

They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the test suite checks
them without a GPU).
"""
