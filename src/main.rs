mod cli;

use std::process::ExitCode;

/// mimalloc, with large blocks mapped directly: see `fasternet_serve::allocator`.
#[global_allocator]
static ALLOCATOR: fasternet_serve::allocator::ServerAllocator =
    fasternet_serve::allocator::ServerAllocator;

fn main() -> ExitCode {
    match cli::main_with_args(std::env::args_os().collect()) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
