//! Reading one quantized Linear of any supported layout into an [`Fp4Matrix`].

use mimo_kernels::fp4::Fp4Matrix;

use crate::checkpoint::{Checkpoint, DType, TensorView};

use super::{FormatError, Layout};

fn get<'a>(ck: &'a Checkpoint, name: &str, layout: Layout) -> Result<TensorView<'a>, FormatError> {
    ck.tensor(name).map_err(|_| FormatError::MissingTensor {
        dir: ck.root().to_path_buf(),
        tensor: name.to_string(),
        layout: layout.name(),
    })
}

fn want_dtype(t: &TensorView<'_>, expected: &[DType]) -> Result<(), FormatError> {
    if expected.contains(&t.dtype) {
        Ok(())
    } else {
        Err(FormatError::WrongDType {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            expected: expected[0],
            actual: t.dtype,
        })
    }
}

fn wrong_shape(t: &TensorView<'_>, expected: String) -> FormatError {
    FormatError::WrongShape {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        expected,
        actual: t.shape.to_vec(),
    }
}

/// The stored per-tensor scale of `module` as written on disk (compressed-tensors
/// `weight_global_scale`, a divisor, or ModelOpt `weight_scale_2`, a multiplier); `None` for
/// MXFP4. Accepts shapes `[]` and `[1]`.
pub fn read_global_scale(
    ck: &Checkpoint,
    layout: Layout,
    module: &str,
) -> Result<Option<f32>, FormatError> {
    let Some(name) = layout.tensor_names(module).global else {
        return Ok(None);
    };
    let t = get(ck, &name, layout)?;
    want_dtype(&t, &[DType::F32])?;
    if t.numel() != 1 || t.shape.len() > 1 {
        return Err(wrong_shape(&t, "[] or [1]".into()));
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&t.data[..4]);
    let v = f32::from_le_bytes(b);
    if !(v.is_finite() && v > 0.0) {
        return Err(FormatError::BadGlobalScale {
            file: t.file.to_path_buf(),
            tensor: name,
            value: v,
        });
    }
    // The largest weight a block can hold is 6 * 448 (FP4 max times E4M3 max) divided by a
    // compressed-tensors global scale, or times a ModelOpt weight_scale_2; a scale that makes it
    // inf would turn every non-zero weight of the layer into inf and the logits into NaN.
    let max = match layout {
        Layout::ModelOptNvfp4 => FP4_E4M3_MAX * v,
        _ => FP4_E4M3_MAX / v,
    };
    let inverse_ok = layout != Layout::ModelOptNvfp4 || (1.0 / v).is_finite();
    if !max.is_finite() || !inverse_ok {
        return Err(FormatError::GlobalScaleOverflow {
            file: t.file.to_path_buf(),
            tensor: name,
            value: v,
            max,
        });
    }
    Ok(Some(v))
}

/// Largest FP4 value (6) times the largest E4M3 block scale (448).
const FP4_E4M3_MAX: f32 = 6.0 * 448.0;

/// First E8M0 code (253) for which the largest MXFP4 weight, 6 * 2^(code - 127), is not a finite
/// f32; 255 is NaN and left to the callers' NaN checks.
const E8M0_FIRST_OVERFLOW: u8 = 253;

/// Loads the quantized Linear `module` (e.g. `model.layers.0.mlp.up_proj`) stored in `layout`.
/// The matrix's `global_scale` is in the compressed-tensors convention (`w = fp4 * scale /
/// global_scale`): ModelOpt's `weight_scale_2` is inverted (exact up to the last f32 bit), MXFP4
/// gets 1.0.
pub fn load_linear(
    ck: &Checkpoint,
    layout: Layout,
    module: &str,
) -> Result<Fp4Matrix, FormatError> {
    let names = layout.tensor_names(module);
    let format = layout.format();
    let block = format.block_size();
    let packed = get(ck, &names.packed, layout)?;
    want_dtype(&packed, &[DType::U8])?;
    if packed.shape.len() != 2 {
        return Err(wrong_shape(&packed, "[N, K/2]".into()));
    }
    let (n, k) = (packed.shape[0], packed.shape[1] * 2);
    let scale = get(ck, &names.scale, layout)?;
    let scale_dtypes: &[DType] = match layout {
        Layout::CtMxfp4 => &[DType::U8, DType::F8_E8M0],
        _ => &[DType::F8_E4M3],
    };
    want_dtype(&scale, scale_dtypes)?;
    if k % block != 0 || scale.shape != [n, k / block] {
        return Err(wrong_shape(&scale, format!("[{n}, {k}/{block}]")));
    }
    if layout == Layout::CtMxfp4 {
        if let Some(index) = scale
            .data
            .iter()
            .position(|&c| (E8M0_FIRST_OVERFLOW..u8::MAX).contains(&c))
        {
            return Err(FormatError::ScaleCodeOverflow {
                file: scale.file.to_path_buf(),
                tensor: names.scale.clone(),
                index,
                code: scale.data[index],
            });
        }
    }
    let global_scale = match (layout, read_global_scale(ck, layout, module)?) {
        (Layout::ModelOptNvfp4, Some(s2)) => 1.0 / s2,
        (_, Some(g)) => g,
        (_, None) => 1.0,
    };
    Ok(Fp4Matrix {
        format,
        n,
        k,
        packed: packed.data.to_vec(),
        scales: scale.data.to_vec(),
        global_scale,
    })
}
