//! `kairos-agent`: parses the command line and hands over to the library.

use clap::Parser;

fn main() {
    kairos_sys::exec::default_sigpipe();
    let cli = kairos_agent::cli::Cli::parse();
    let code = match kairos_agent::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kairos-agent: {e:#}");
            kairos_agent::cli::exit::FAILURE
        }
    };
    std::process::exit(code);
}
