//! Writes the PTX of every kernel source, as NVRTC compiles it at run time, into a folder, for
//! register, shared-memory and spill checks with `ptxas -v` without a GPU:
//! `cargo run --release -p mimo-kernels --example ptxdump -- DIR [ARCH [FILE.cu ...]]` (ARCH:
//! sm_90a; further .cu files are compiled the same way, after common.cuh: the runtime's program
//! is ops.cu followed by attention.cu, so give their concatenation, e.g.
//! `cat crates/runtime/cuda/ops.cu crates/runtime/cuda/attention.cu > /tmp/ops.cu`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: ptxdump DIR [ARCH [FILE.cu ...]]")?;
    let arch = args.next().unwrap_or_else(|| "sm_90a".into());
    std::fs::create_dir_all(&dir)?;
    let mut sources: Vec<(&'static str, String)> = mimo_kernels::cuda::kernel_sources()
        .into_iter()
        .map(|(f, s)| (f, s.to_string()))
        .collect();
    for path in args {
        let name = std::path::Path::new(&path)
            .file_name()
            .ok_or("a .cu path")?
            .to_string_lossy()
            .into_owned();
        sources.push((
            Box::leak(name.into_boxed_str()),
            std::fs::read_to_string(&path)?,
        ));
    }
    for (file, src) in sources {
        let ptx = mimo_kernels::cuda::compile_source(file, &src, &arch)?;
        let out = std::path::Path::new(&dir).join(format!("{file}.ptx"));
        std::fs::write(&out, ptx)?;
        println!("{}", out.display());
    }
    Ok(())
}
