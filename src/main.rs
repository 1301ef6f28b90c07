//! The `ringlab` binary: parse the command line, run the subcommand, map failure to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ringlab::cli::Cli::parse();
    match ringlab::commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringlab: error: {err}");
            ExitCode::FAILURE
        }
    }
}
