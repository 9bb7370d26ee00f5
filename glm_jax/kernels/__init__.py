"""GPU attention kernels for the engine: cuDNN flash attention for prefill chunks (`cudnn`) and a
Pallas (Triton) kernel for decode steps (`decode_pallas`). Each returns an online-softmax
`attention.State`, so its result merges with the portable tiles'."""
