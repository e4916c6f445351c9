//! `mimo-quant`: the thin binary over `mimo_quant::cli`.

use clap::Parser;

fn main() {
    let cli = mimo_quant::cli::Cli::parse();
    match mimo_quant::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!(
                "error: {}",
                mimo_runtime::error_text::error_text(e.as_ref())
            );
            std::process::exit(2);
        }
    }
}
