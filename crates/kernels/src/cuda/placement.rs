//! Where a launch's blocks land (`Tuning::spread`).
//!
//! In a PDL chain a launch's blocks are placed while the kernel before it drains, and the first
//! SMs to free up take as many blocks as their registers allow: MiMo-7B's 688 two-warp gate/up
//! blocks ran on 95-114 of the H100's 132 SMs, each of those doing up to 8 blocks' share of the
//! stream. With `spread`, one-token dense FP4 products pad their dynamic shared memory so that
//! an SM holds at most `ceil(blocks / SMs)` of their blocks (unless their registers already
//! cap it there: [`resident_blocks`]), and every kernel asks for the same
//! shared-memory carveout ([`SPREAD_CARVEOUT_PERCENT`]), so that the padding, not the driver's
//! per-kernel choice, decides and no SM has to change its split between kernels.
//!
//! The carveout is a trade: shared memory taken from L1 is L1 the streams no longer have. On
//! the H100 (docs/kernels-notes.md round 13) the 100 KiB configuration costs ~0.5 % on its own
//! and the padding then gains ~2 % (MiMo-7B NVFP4 batch 1); 228 KiB (28 KiB of L1) costs 22 %.
//! Products with more blocks per SM than the padding can cap (the lm_head) run `_wide` copies
//! of their kernel that keep the driver's carveout (gemm.rs).

use cudarc::driver::sys::CUfunction_attribute as Attr;
use cudarc::driver::{CudaFunction, LaunchConfig};

use super::context::{GpuContext, Tuning};
use super::error::{drv, CudaError};

/// The preferred shared-memory carveout of every kernel with `spread`, in percent of the most
/// shared memory an SM can have: 43 % of Hopper's 228 KiB is its 100 KiB configuration.
pub const SPREAD_CARVEOUT_PERCENT: u32 = 43;

/// The carveout of the staged 16-token kernels (`_xs`, `Tuning::x_stage`) with `spread`: 57 %
/// of Hopper's 228 KiB is its 132 KiB configuration, three of their ~41 KiB blocks per SM where
/// the 100 KiB one holds two. H100 (bench/results/kernels-h100-tiled-r17.json, call 4): MiMo-7B
/// NVFP4 batch 16 3,682 / 3,680 -> 3,875 / 3,869 tok/s (FP4 head), 4096 x 22016 at 16 tokens
/// 35.9 -> 30.0 us; the driver's own choice gave 3,818 / 3,823, 196 KiB (86 %) 3,571 / 3,567.
pub(crate) const STAGED_CARVEOUT_PERCENT: u32 = 57;

/// Shared memory the system reserves per resident block (sm_80 and later).
const RESERVED_PER_BLOCK: u32 = 1024;

/// The largest even share [`spread_smem`] pads for: past it, rounding to the 128-byte
/// allocation unit no longer tells `cap` blocks from `cap + 1` in the budget.
const MAX_CAP: u32 = 16;

/// Dynamic shared memory a padded launch asks for so that at most `cap = ceil(blocks / sms)`
/// of its blocks fit in `budget` bytes of an SM's shared memory, or None where the launch needs
/// no padding (its own shared memory already caps it that low, or cap > `MAX_CAP`).
///
/// The budget is the carveout's share of the SM's shared memory; the driver rounds it up to a
/// supported configuration (98 KiB asked on Hopper, 100 KiB configured). Each block's share is
/// rounded down to the 128-byte allocation unit, so `cap` blocks fit the budget and `cap + 1`
/// do not fit the configuration for every cap up to `MAX_CAP` (the tests check both).
pub fn spread_smem(
    blocks: u32,
    sms: u32,
    budget: u32,
    static_smem: u32,
    dynamic: u32,
) -> Option<u32> {
    let cap = per_sm(blocks, sms).max(1);
    if cap > MAX_CAP {
        return None;
    }
    let share = budget / cap / 128 * 128;
    let pad = share.checked_sub(RESERVED_PER_BLOCK + static_smem)?;
    (pad > dynamic).then_some(pad)
}

/// Blocks of `threads` threads at `regs` registers each that one SM can hold, shared memory
/// aside (sm_90: 64 K registers allocated per warp in units of 256, 64 warps, 32 blocks).
pub fn resident_blocks(regs: u32, threads: u32) -> u32 {
    let warps = threads.div_ceil(32).max(1);
    let per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    (65_536 / (per_warp * warps)).min(64 / warps).min(32)
}

/// Whether a launch of `blocks` has more per SM than [`spread_smem`] pads for.
pub fn beyond_spread_cap(blocks: u32, sms: u32) -> bool {
    per_sm(blocks, sms) > MAX_CAP
}

/// `ceil(blocks / sms)`: the most blocks of a launch one SM takes when they are spread evenly.
fn per_sm(blocks: u32, sms: u32) -> u32 {
    blocks.div_ceil(sms.max(1))
}

/// `launch` with its dynamic shared memory padded by [`spread_smem`] where `Tuning::spread` is
/// on (the kernel's maximum dynamic shared memory raised past 48 KiB where needed).
pub fn spread_launch(
    gpu: &GpuContext,
    f: &CudaFunction,
    mut launch: LaunchConfig,
) -> Result<LaunchConfig, CudaError> {
    if !gpu.tuning().spread {
        return Ok(launch);
    }
    let (x, y, z) = launch.grid_dim;
    let blocks = x * y * z;
    // Registers that already hold an SM to `ceil(blocks / SMs)` of these blocks leave the padding
    // nothing to spread; it would only keep the next kernel's early blocks off the SM.
    let (bx, by, bz) = launch.block_dim;
    let regs = f
        .get_attribute(Attr::CU_FUNC_ATTRIBUTE_NUM_REGS)
        .map_err(drv("kernel registers"))?;
    if resident_blocks(u32::try_from(regs).unwrap_or(255), bx * by * bz)
        <= per_sm(blocks, gpu.sm_count())
    {
        return Ok(launch);
    }
    let budget = gpu.sm_shared_bytes() / 100 * SPREAD_CARVEOUT_PERCENT;
    let stat = f
        .get_attribute(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_err(drv("kernel shared memory"))?;
    let Some(smem) = spread_smem(
        blocks,
        gpu.sm_count(),
        budget,
        u32::try_from(stat).unwrap_or(0),
        launch.shared_mem_bytes,
    ) else {
        return Ok(launch);
    };
    if smem > 48 * 1024 {
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(drv("kernel dynamic shared memory limit"))?;
    }
    launch.shared_mem_bytes = smem;
    Ok(launch)
}

/// The carveout kernel `name` asks for under `spread`, or None for the driver's choice.
///
/// Prefill attention holds 19-37 KiB of static shared memory per block and runs in no one-token
/// chain: the driver's own carveout gives it more blocks per SM. The `_wide` kernels run the
/// products too wide to pad, which only lose L1 to the carveout. The staged kernels (`_xs`) run
/// batches of 9-16 tokens, not the one-token chains whose neighbours the uniform carveout lets
/// share SMs, and their ~41 KiB blocks want a third block per SM ([`STAGED_CARVEOUT_PERCENT`]).
pub(crate) fn carveout_percent(name: &str) -> Option<u32> {
    if name.starts_with("attention_prefill") || name.ends_with("_wide") {
        None
    } else if name.ends_with("_xs") {
        Some(STAGED_CARVEOUT_PERCENT)
    } else {
        Some(SPREAD_CARVEOUT_PERCENT)
    }
}

/// Prepares a kernel just loaded (named `name`): the carveout of `carveout_percent` where
/// `tuning.spread` is on (at load time: later switches keep it), and with
/// `MIMO_KERNEL_ATTRS=1` a line on stderr with its registers, local (spill) memory and static
/// shared memory as the driver compiled it.
pub fn on_load(tuning: Tuning, name: &str, f: &CudaFunction) -> Result<(), CudaError> {
    if Tuning::env_flag("MIMO_KERNEL_ATTRS") == Some(true) {
        let get = |a| f.get_attribute(a).unwrap_or(-1);
        eprintln!(
            "kernel {name}: {} registers, {} bytes local, {} bytes static shared",
            get(Attr::CU_FUNC_ATTRIBUTE_NUM_REGS),
            get(Attr::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
            get(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
        );
    }
    if tuning.spread {
        if let Some(pct) = carveout_percent(name) {
            f.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                pct as i32,
            )
            .map_err(drv("kernel shared memory carveout"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOPPER_SM: u32 = 233_472;
    const BUDGET: u32 = HOPPER_SM / 100 * SPREAD_CARVEOUT_PERCENT;
    const CONFIG: u32 = 100 * 1024;

    /// Blocks of a launch padded to `pad` (plus its static shared memory) that fit `bytes`.
    fn fit(bytes: u32, pad: u32, static_smem: u32) -> u32 {
        let per = (pad + static_smem + RESERVED_PER_BLOCK).div_ceil(128) * 128;
        bytes / per
    }

    #[test]
    fn resident_blocks_by_registers() {
        // 16 warps at 128 registers fill the 64 K registers; 2-warp blocks at 128 fit 8.
        assert_eq!(resident_blocks(128, 512), 1);
        assert_eq!(resident_blocks(128, 64), 8);
        // 88 registers: 2,816 per warp, 4-warp blocks 11,264: 5 per SM.
        assert_eq!(resident_blocks(88, 128), 5);
        // Few registers: the warp (64) and block (32) limits.
        assert_eq!(resident_blocks(16, 32), 32);
        assert_eq!(resident_blocks(16, 1024), 2);
    }

    #[test]
    fn carveouts_by_kernel_name() {
        assert_eq!(carveout_percent("attention_prefill_d128"), None);
        assert_eq!(carveout_percent("fp4_gemm_nv_m2_t1_g2_wide"), None);
        assert_eq!(carveout_percent("fp4_gemm_nv_m2_t2_g1_xs"), Some(57));
        assert_eq!(carveout_percent("fp4_gemm_sw_nv_t2_g1_xs"), Some(57));
        assert_eq!(carveout_percent("fp4_gemm_nv_m2_t1_g2"), Some(43));
        assert_eq!(carveout_percent("fp4_mm_nv_t4"), Some(43));
    }

    #[test]
    fn padding_caps_blocks_per_sm_at_the_even_share() {
        const { assert!(BUDGET <= CONFIG) };
        for blocks in 1..=MAX_CAP * 132 {
            for stat in [0, 256, 5808] {
                let cap = blocks.div_ceil(132);
                let Some(pad) = spread_smem(blocks, 132, BUDGET, stat, 512) else {
                    // Only a block whose static memory exceeds the share goes unpadded.
                    assert!(
                        BUDGET / cap < stat + RESERVED_PER_BLOCK + 640,
                        "{blocks} {stat}"
                    );
                    continue;
                };
                // Whole allocation units with the static part.
                assert!(
                    pad > 512 && (pad + stat) % 128 == 0,
                    "{blocks} {stat}: {pad}"
                );
                // Both the budget and the configuration the driver gives for it hold exactly
                // `cap` blocks.
                assert_eq!(fit(BUDGET, pad, stat), cap, "{blocks} blocks, budget");
                assert_eq!(fit(CONFIG, pad, stat), cap, "{blocks} blocks, 100 KiB");
            }
        }
        // MiMo-7B's gate/up: 688 blocks, 6 per SM, so 115 of 132 SMs.
        let pad = spread_smem(688, 132, BUDGET, 0, 0).unwrap();
        assert_eq!(fit(CONFIG, pad, 0), 6);
    }

    #[test]
    fn no_padding_where_the_kernel_needs_more_or_the_share_is_too_small() {
        // 6 per SM allow ~15.2 KiB each: a block of 40 KiB is capped lower already.
        assert_eq!(spread_smem(688, 132, BUDGET, 0, 40 * 1024), None);
        assert_eq!(spread_smem(688, 132, BUDGET, 20 * 1024, 0), None);
        // Static shared memory counts against the share.
        let with = spread_smem(688, 132, BUDGET, 4096, 0).unwrap();
        let without = spread_smem(688, 132, BUDGET, 0, 0).unwrap();
        assert_eq!(without - with, 4096);
        // The lm_head's 4,748 blocks: 36 per SM is past the cap the rounding can hold.
        assert_eq!(spread_smem(4748, 132, BUDGET, 0, 0), None);
        // The `_wide` kernels (gemm.rs) take exactly the launches left unpadded for their cap.
        for blocks in 1..=20 * 132 {
            assert_eq!(
                beyond_spread_cap(blocks, 132),
                spread_smem(blocks, 132, BUDGET, 0, 0).is_none(),
                "{blocks} blocks"
            );
        }
        // No SM count reads as one SM rather than dividing by zero.
        assert_eq!(
            spread_smem(2, 0, BUDGET, 0, 0),
            spread_smem(2, 1, BUDGET, 0, 0)
        );
    }
}
