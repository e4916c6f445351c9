fn main() {
    for (file, src) in mimo_kernels::cuda::kernel_sources() {
        let ptx = mimo_kernels::cuda::compile_source(file, src, "sm_90a").unwrap();
        std::fs::write(format!("/tmp/ptxdump/{file}.ptx"), ptx).unwrap();
    }
}
