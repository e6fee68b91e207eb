//! The server's allocator: mimalloc for everything small, the operating system directly for
//! large blocks.
//!
//! mimalloc keeps freed memory for reuse (glibc's malloc handed the top of its heap back after
//! large frees, so every request's image buffers came back as fresh page faults: 0.3-0.5 ms per
//! upload, `examples/preprocess_cost.rs`). But memory it keeps is still resident: a burst of
//! 16 MB request bodies freed a few milliseconds apart left more resident than the requests
//! ever held at once, which breaks the memory budget's sum (`server::memory`). Blocks of
//! [`LARGE`] bytes or more (bodies, decoded photos) are therefore mapped and unmapped directly:
//! the page faults cost about 1% of decoding such an image, and a freed block stops counting
//! at once.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;

/// Blocks from this size on bypass mimalloc. A 224x224 input tensor (588 KiB) stays below.
pub const LARGE: usize = 1 << 20;

pub struct ServerAllocator;

#[cfg(target_os = "linux")]
mod os {
    /// Page size assumed for alignment: mmap returns page-aligned memory, and no Rust
    /// allocation here asks for more than 4 KiB alignment through this path.
    pub const PAGE: usize = 4096;

    /// # Safety
    /// `size` is non-zero.
    pub unsafe fn map(size: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        }
    }

    /// # Safety
    /// `ptr` came from [`map`] or [`remap`] with this `size`, and is not used afterwards.
    pub unsafe fn unmap(ptr: *mut u8, size: usize) {
        // SAFETY: the caller passes a mapping of exactly this size.
        unsafe { libc::munmap(ptr.cast(), size) };
    }

    /// # Safety
    /// `ptr` came from [`map`] or [`remap`] with `old` bytes; on success it is not used again.
    pub unsafe fn remap(ptr: *mut u8, old: usize, new: usize) -> *mut u8 {
        // SAFETY: the caller passes a mapping of `old` bytes; MREMAP_MAYMOVE keeps its contents.
        let p = unsafe { libc::mremap(ptr.cast(), old, new, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        }
    }
}

#[cfg(target_os = "linux")]
fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= os::PAGE
}

#[cfg(not(target_os = "linux"))]
fn is_large(_: &Layout) -> bool {
    false
}

// SAFETY: every block is freed by the allocator that made it: a block's layout (which the
// caller must pass unchanged to dealloc and realloc) decides which one, and `is_large` gives
// the same answer for the same layout. Mapped blocks are page-aligned, which satisfies every
// alignment `is_large` admits, and zero-filled.
unsafe impl GlobalAlloc for ServerAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_large(&layout) {
            // SAFETY: LARGE is non-zero.
            return unsafe { os::map(layout.size()) };
        }
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_large(&layout) {
            // SAFETY: LARGE is non-zero; fresh anonymous mappings are zero-filled.
            return unsafe { os::map(layout.size()) };
        }
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if is_large(&layout) {
            // SAFETY: a large layout's block was mapped with this size by `alloc`.
            return unsafe { os::unmap(ptr, layout.size()) };
        }
        // SAFETY: a small layout's block came from mimalloc.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size > 0 and that it makes a valid layout with
        // this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_large(&layout), is_large(&new_layout)) {
            // SAFETY: both blocks are mimalloc's.
            (false, false) => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
            #[cfg(target_os = "linux")]
            // SAFETY: the old block is a mapping of layout.size() bytes.
            (true, true) => unsafe { os::remap(ptr, layout.size(), new_size) },
            _ => {
                // Between the two allocators: a new block, a copy, the old block freed.
                // SAFETY: new_layout is valid (above); the copy covers the smaller block.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}
