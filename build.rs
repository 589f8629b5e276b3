//! Only the `cuda` feature needs anything here. llama-cpp-sys-2 asks the linker for the
//! static cuBLAS archives, which the PyPI CUDA wheels (`scripts/cuda-toolchain`) do not
//! ship: the toolchain gives it empty stand-ins, and the shared cuBLAS is linked here,
//! last on the link line (as `-C link-arg`), so the linker keeps it.
fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rustc-link-arg=-lcublas");
    println!("cargo:rustc-link-arg=-lcublasLt");
    // The binaries find cuBLAS in the toolchain they were built with; elsewhere (a GPU
    // machine with its own CUDA 13) through LD_LIBRARY_PATH or the system's paths.
    if let Some(p) = std::env::var_os("CUDA_PATH") {
        println!(
            "cargo:rustc-link-arg=-Wl,-rpath,{}/lib",
            p.to_string_lossy()
        );
    }
}
