"""Plain PyTorch RGT, checkpoint-exact with the official implementation; the parity oracle."""
from .rgt import LSA, RGSA, RGT, Block, ResidualGroup, WindowAttention, recursion_count

__all__ = ["RGT", "ResidualGroup", "Block", "LSA", "RGSA", "WindowAttention", "recursion_count"]
