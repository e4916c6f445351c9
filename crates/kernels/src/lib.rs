//! Numbers and kernels: FP4/FP8/E8M0 codecs, NVFP4/MXFP4 block quantization, CPU and CUDA kernels.

pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod e2m1;
pub mod e4m3;
pub mod e8m0;
pub mod fp4;
pub mod fp8_rows;
pub mod rowquant;

pub use dtype::{DTypeError, SrcDType};
pub use fp4::{
    dequantize, dequantize_row, modelopt_weight_scale_2, nvfp4_global_scale, quantize_mxfp4,
    quantize_nvfp4, quantize_nvfp4_modelopt, quantize_row_mxfp4, quantize_row_nvfp4,
    quantize_row_nvfp4_modelopt, Fp4Error, Fp4Format, Fp4Matrix,
};
