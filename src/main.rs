//! `xks-proxy`: see `xks-proxy --help`. All logic lives in the library.

/// jemalloc with its background purging thread: memory that a burst of
/// connections took (TLS and HTTP buffers of clients that never
/// authenticate, for instance) goes back to the system within seconds after
/// they close, where glibc's malloc kept it fragmented in its arenas.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    xks_proxy::cli::main()
}
