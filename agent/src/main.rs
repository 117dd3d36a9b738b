//! The `ferry` binary.

use std::process::ExitCode;

use clap::Parser as _;
use ferry::cli::{Cli, Command, InspectWhat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // kube-client logs every failed API response as an error; during an API outage
    // that is several lines a second. The source reports those failures itself, rate
    // limited and with their cause, so that one module is silenced (RUST_LOG overrides).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "ferry={default_level},kube_client::client::builder=off,warn"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match cli.command {
        Command::Run(args) => ferry::config::RunConfig::resolve(*args).and_then(ferry::run::run),
        Command::Cleanup(bpf) => ferry::run::cleanup(&bpf.bpf_pin_path),
        Command::Inspect {
            what: InspectWhat::Services { json, bpf },
        } => ferry::run::inspect_services(&bpf.bpf_pin_path, json),
        Command::Version => {
            println!("ferry {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry: {err:#}");
            ExitCode::FAILURE
        }
    }
}
