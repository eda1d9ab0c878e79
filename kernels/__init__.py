"""Triton kernels of rgt-fast, installed as ``rgt_fast.kernels``."""
