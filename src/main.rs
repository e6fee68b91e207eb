mod cli;

use std::process::ExitCode;

/// mimalloc, with large blocks mapped directly: see `fasternet_serve::allocator`.
#[global_allocator]
static ALLOCATOR: fasternet_serve::allocator::ServerAllocator =
    fasternet_serve::allocator::ServerAllocator;

fn main() -> ExitCode {
    // libjpeg allocates with C malloc, not the allocator above: give its large buffers the
    // same policy (mapped, returned at free) instead of glibc's threshold, which rises to the
    // largest block freed and would leave the next photo's buffers resident in its arenas.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    match cli::main_with_args(std::env::args_os().collect()) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
