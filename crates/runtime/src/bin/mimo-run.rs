//! `mimo-run`: the thin binary over `mimo_runtime::cli`.

use clap::Parser;

fn main() {
    let cli = mimo_runtime::cli::Cli::parse();
    if let Err(e) = mimo_runtime::cli::run(cli) {
        eprintln!(
            "error: {}",
            mimo_runtime::error_text::error_text(e.as_ref())
        );
        std::process::exit(1);
    }
}
