"""rgt-fast: a fused, checkpoint-exact RGT for image super-resolution."""
