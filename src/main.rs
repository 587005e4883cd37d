//! `xks-proxy`: see `xks-proxy --help`. All logic lives in the library.

fn main() -> std::process::ExitCode {
    xks_proxy::cli::main()
}
