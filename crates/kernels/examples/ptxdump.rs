//! Writes the PTX of every kernel source, as NVRTC compiles it at run time, into a folder, for
//! register, shared-memory and spill checks with `ptxas -v` without a GPU:
//! `cargo run --release -p mimo-kernels --example ptxdump -- DIR [ARCH]` (ARCH: sm_90a).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: ptxdump DIR [ARCH]")?;
    let arch = args.next().unwrap_or_else(|| "sm_90a".into());
    std::fs::create_dir_all(&dir)?;
    for (file, src) in mimo_kernels::cuda::kernel_sources() {
        let ptx = mimo_kernels::cuda::compile_source(file, src, &arch)?;
        let out = std::path::Path::new(&dir).join(format!("{file}.ptx"));
        std::fs::write(&out, ptx)?;
        println!("{}", out.display());
    }
    Ok(())
}
