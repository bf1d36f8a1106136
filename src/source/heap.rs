//! Allocator helpers: how the agent's heap is kept small. Safe functions
//! over the glibc calls, which live in the FFI module (the only module
//! allowed `unsafe`).
//!
//! Invariants:
//! - both are no-ops where the allocator is not glibc's;
//! - neither changes what the program computes, only how much freed
//!   memory stays resident.

use super::ffi;

/// Limits glibc malloc to one arena (per-thread caches still serve small
/// allocations without locking). The agent has a handful of threads
/// with small heaps; glibc's default (one arena per contending thread, up
/// to 8 × cores) only keeps freed memory resident. Call at start-up,
/// before any other thread starts.
pub fn limit_arenas() {
    ffi::limit_malloc_arenas();
}

/// Returns freed heap memory to the system. A snapshot round over many
/// domains allocates tens of MiB for a moment; with one malloc arena that
/// memory would otherwise stay resident.
pub fn trim() {
    ffi::trim_heap();
}
