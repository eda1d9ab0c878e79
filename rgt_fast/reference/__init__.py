"""Plain PyTorch RGT, checkpoint-exact with the official implementation; the parity oracle."""
