"""Constants of MAE's computation that the reference, the kernels and the visualization share (a leaf
module: the kernels import it without importing the op layer above them)."""

# the original's per-patch normalization of the target: (x - mean) / sqrt(var + eps)
NORM_PIX_EPS = 1e-6
