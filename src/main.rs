//! The `ringlab` binary: parse the command line, run the subcommand, map failure to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ringlab::cli::Cli::parse();
    match ringlab::commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringlab: error: {err}");
            if ringlab::cli::exit_status(&err) == 2 {
                eprintln!("\nFor more information, try '--help'.");
            }
            ExitCode::from(ringlab::cli::exit_status(&err))
        }
    }
}
