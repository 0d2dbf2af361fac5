"""Op families: one file each, Triton kernels beside their plain-torch references."""
