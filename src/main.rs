mod cli;

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: glibc hands the top of its heap back to the kernel
/// after large frees, so every request's image buffers (hundreds of KB) came back as fresh page
/// faults, 0.3-0.5 ms per upload (`examples/preprocess_cost.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match cli::main_with_args(std::env::args_os().collect()) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
