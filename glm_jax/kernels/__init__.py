"""Attention kernels for the engine: on GPUs, cuDNN flash attention for prefill chunks (`cudnn`) and
a paged Pallas (Triton) kernel for decode steps (`decode_pallas`); on TPUs,
JAX's Pallas paged-attention kernels behind the paged signature (`paged_tpu`). Each returns an
online-softmax `attention.State`, so its result merges with the portable tiles'."""
