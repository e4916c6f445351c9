//! Numbers and kernels: FP4/FP8/E8M0 codecs, NVFP4/MXFP4 block quantization, CPU and CUDA kernels.

pub mod cuda;
