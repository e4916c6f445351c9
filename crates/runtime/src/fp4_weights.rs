//! Bridge between the decoder's weight loader and [`crate::format`]: finds whether a Linear is
//! stored in an FP4 layout and loads it as a packed [`Fp4Matrix`].

use mimo_kernels::Fp4Matrix;

use crate::checkpoint::Checkpoint;
use crate::weights::LoadError;

/// Loads Linear `base` (`[n, k]`) as FP4 if the checkpoint stores it in an FP4 layout;
/// `Ok(None)` for a dense weight.
pub fn load_fp4(
    ck: &Checkpoint,
    base: &str,
    n: usize,
    k: usize,
) -> Result<Option<Fp4Matrix>, LoadError> {
    let _ = (n, k);
    for suffix in ["weight_packed", "weight_blocks"] {
        let name = format!("{base}.{suffix}");
        if ck.contains(&name) {
            return Err(LoadError::Fp4Layout {
                file: ck.root().to_path_buf(),
                tensor: name,
                reason: "FP4 layouts are not readable yet".into(),
            });
        }
    }
    Ok(None)
}
