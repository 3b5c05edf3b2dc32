//! The `billsync` binary: the command line lives in [`billsync::cli`].

use std::process::ExitCode;

/// mimalloc: the hot path's small allocations (request, header map, JSON answer) cost less
/// than with the system allocator; see the entitlement figures in docs/benchmarks.md. Set here,
/// in the binary, so that the library's tests, benchmarks and fuzz targets keep their own.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    billsync::cli::main()
}
