//! The `ferry` binary.

use std::process::ExitCode;

use ferry::cli::{Command, InspectWhat, RunArgs};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = ferry::cli::kube_proxy_compatible_args(std::env::args_os().collect());
    let cli = ferry::cli::parse_from(args).unwrap_or_else(|e| e.exit());
    // klog's --v: 0-2 are kube-proxy's normal levels, 4 its debug.
    let level = match cli.klog_level {
        Some(v) => v.saturating_sub(2).min(2),
        None => cli.verbose,
    };
    let default_level = match level {
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
        Command::Run(args) => run(*args),
        Command::Cleanup(args) => ferry::run::cleanup(&args.bpf.bpf_pin_path, args.kube_proxy),
        Command::Inspect {
            what: InspectWhat::Services { json, address, bpf },
        } => ferry::run::inspect_services(&bpf.bpf_pin_path, address, json),
        Command::Inspect {
            what:
                InspectWhat::Dns {
                    name,
                    record_type,
                    json,
                    address,
                },
        } => ferry::dns::inspect::fetch(address, &name, &record_type).and_then(|i| {
            let text = match json {
                true => serde_json::to_string_pretty(&i)?,
                false => ferry::dns::inspect::render(&i),
            };
            println!("{text}");
            Ok(())
        }),
        Command::Status { json, address } => ferry::status::fetch(address).and_then(|s| {
            let text = match json {
                true => serde_json::to_string_pretty(&s)?,
                false => ferry::status::render(&s, std::time::SystemTime::now()),
            };
            println!("{text}");
            Ok(())
        }),
        Command::Explain {
            service,
            port,
            json,
            address,
        } => explain(&service, port.as_deref(), json, address),
        Command::Monitor {
            rate,
            count,
            json,
            address,
            bpf,
        } => ferry::monitor::run(
            &bpf.bpf_pin_path,
            &ferry::monitor::MonitorOptions {
                rate,
                count,
                json,
                address,
            },
        ),
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

/// `ferry explain`: asks the agent, prints its answer.
fn explain(
    service: &str,
    port: Option<&str>,
    json: bool,
    address: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let service = ferry::explain::parse_service(service).map_err(anyhow::Error::msg)?;
    let explanation = ferry::explain::fetch(address, &service, port)?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&explanation)?),
        false => print!("{}", ferry::explain::render(&explanation)),
    }
    Ok(())
}

/// `ferry run`, or kube-proxy's `--cleanup` / `--init-only` variants of it.
fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.cleanup {
        // kube-proxy's --cleanup removes what any of its modes left, as this does.
        return ferry::run::cleanup(&args.bpf.bpf_pin_path, true);
    }
    let init_only = args.init_only;
    let config = ferry::config::RunConfig::resolve(args)?;
    if init_only {
        config.node_settings.apply();
        return Ok(());
    }
    ferry::run::run(config)
}
