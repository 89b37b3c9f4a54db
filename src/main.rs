//! `slg-gateway`: run the gateway (on the embedded default config, or a RON
//! file), or `slg-gateway demo-backend` to run the demo backend alone.

use clap::{Parser, Subcommand};
use slg_gateway::config::Config;
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_gateway::shard::GatewayEvent;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "slg-gateway",
    version,
    about = "Thread-per-core gateway for strategy-game clients"
)]
struct Cli {
    /// RON config file (default: the embedded config/gateway.ron, which
    /// also starts the demo backend in-process).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Client listen address (overrides `listen`; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// HTTP listen address (overrides `http_listen`).
    #[arg(long = "http-listen", value_name = "ADDR")]
    http_listen: Option<String>,
    /// WebSocket listen address (overrides `ws_listen`).
    #[arg(long = "ws-listen", value_name = "ADDR")]
    ws_listen: Option<String>,
    /// Number of shards (overrides `shards`).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config without starting: parse and validate it (TLS files
    /// too), print the effective config with every default filled in and
    /// exit 0; or print one line naming the key at fault and exit 2.
    Check,
    /// Run the demo backend alone (for benchmarks in its own process).
    DemoBackend {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7100")]
        listen: SocketAddr,
    },
}

/// Logs on stderr: plain text (with colours only on a terminal), or one
/// JSON object per line.
fn init_logs(filter: &str, format: slg_gateway::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        slg_gateway::config::LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        slg_gateway::config::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Block until SIGINT or SIGTERM.
fn wait_for_signal() {
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(mut signals) => {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping");
            }
        }
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}; stopping at once");
        }
    }
}

/// Forward SIGINT and SIGTERM to `events`, from a thread of their own.
fn forward_signals(events: flume::Sender<GatewayEvent>) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let event = match sig {
                    signal_hook::consts::SIGHUP => GatewayEvent::Reload(None),
                    // nginx's convention: a live upgrade to the binary this
                    // process was started from.
                    signal_hook::consts::SIGUSR2 => GatewayEvent::Upgrade {
                        binary: None,
                        reply: None,
                    },
                    _ => GatewayEvent::Signal(sig),
                };
                if events.send(event).is_err() {
                    break;
                }
            }
        })?;
    Ok(())
}

/// The config file (or the embedded default) with the command-line
/// overrides applied, validated.
fn load_config(cli: &Cli) -> Result<Config, String> {
    let mut cfg = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::from_ron(slg_gateway::config::DEFAULT_RON, "<embedded gateway.ron>"),
    }
    .map_err(|e| e.to_string())?;
    if let Some(l) = &cli.listen {
        cfg.listen = l.clone();
    }
    if let Some(h) = &cli.http_listen {
        cfg.http_listen = h.clone();
    }
    if let Some(w) = &cli.ws_listen {
        cfg.ws_listen = Some(w.clone());
    }
    if let Some(n) = cli.shards {
        cfg.shards = Some(n);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    // The certificate and key files, read now so a bad one is refused
    // before anything starts (the gateway reads them again when it does).
    cfg.load_tls().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// `slg-gateway check`: the effective config, or the one line at fault.
fn check(cli: &Cli) -> ExitCode {
    let cfg = match load_config(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let pretty = ron::ser::PrettyConfig::new().struct_names(false);
    match ron::ser::to_string_pretty(&cfg, pretty) {
        Ok(text) => {
            let from = cli
                .config
                .as_ref()
                .map_or("<embedded gateway.ron>".to_string(), |p| {
                    p.display().to_string()
                });
            // A closed pipe (`check | head`) is no error of the config.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "// {from}: valid; the effective config, every default filled in:\n{text}"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot print the config: {e}");
            ExitCode::from(1)
        }
    }
}

/// Exit status of a drain that was not clean: forced (deadline or a
/// second signal) or its snapshot could not be written.
const EXIT_FORCED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Check) = cli.command {
        return check(&cli);
    }
    if let Some(Command::DemoBackend { listen }) = cli.command {
        init_logs("info", Default::default());
        return match DemoBackend::start(listen) {
            Ok(demo) => {
                println!("demo backend listening on {}", demo.addr);
                wait_for_signal();
                demo.stop();
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("demo backend: cannot listen on {listen}: {e}");
                ExitCode::from(1)
            }
        };
    }

    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    init_logs(&cfg.log, cfg.log_format);
    let (nofile, _) = slg_gateway::limits::raise_all();
    if let Some(w) = nofile.and_then(|l| {
        slg_gateway::limits::fd_budget_warning(
            l.soft,
            cfg.max_connections,
            cfg.http.max_connections,
        )
    }) {
        tracing::warn!("{w}");
    }

    // The binary to start on an upgrade (read now: once replaced on disk,
    // /proc/self/exe names the deleted file).
    let exe = std::env::current_exe().ok();
    // Started by an upgrade: the old process hands over its listeners and
    // sessions on the inherited channel.
    let inherited = std::env::var(slg_gateway::upgrade::ENV_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    if let Some(fd) = inherited {
        std::env::remove_var(slg_gateway::upgrade::ENV_FD);
        // SAFETY: the old process passed this descriptor, the channel's
        // end, to us alone.
        let mut ch = unsafe { slg_gateway::upgrade::channel::Channel::from_inherited(fd) };
        let shards = cfg.shard_count();
        let gw = match slg_gateway::upgrade::take_over(cfg, &mut ch) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("upgrade: cannot take over: {e}");
                return ExitCode::from(1);
            }
        };
        drop(ch);
        // Under systemd (Type=notify, NotifyAccess=all) the service's main
        // process is this one from now on.
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
        ]);
        return serve(gw, shards, None, &cli, exe);
    }

    let demo = match cfg.demo_backend.as_deref().map(str::parse::<SocketAddr>) {
        None => None,
        Some(Err(_)) => unreachable_config(),
        Some(Ok(addr)) => match DemoBackend::start(addr) {
            Ok(d) => {
                println!("demo backend listening on {}", d.addr);
                Some(d)
            }
            Err(e) => {
                eprintln!("cannot start the demo backend on {addr}: {e}");
                return ExitCode::from(1);
            }
        },
    };
    let shards = cfg.shard_count();
    let gw = match Gateway::start(cfg) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot start the gateway: {e}");
            if let Some(d) = demo {
                d.stop();
            }
            // A config whose files are bad (a TLS certificate) is a config
            // error like any other: status 2.
            let config = matches!(e, slg_gateway::gateway::StartError::Config(_));
            return ExitCode::from(if config { 2 } else { 1 });
        }
    };
    serve(gw, shards, demo, &cli, exe)
}

/// Serve reloads and upgrades until a signal or `POST /v1/drain`; then
/// drain (any further event forces it). A successful upgrade ends this
/// process at once: the new one holds everything.
fn serve(
    mut gw: Gateway,
    shards: usize,
    demo: Option<DemoBackend>,
    cli: &Cli,
    exe: Option<PathBuf>,
) -> ExitCode {
    // systemd's Type=notify: listening now (nothing without NOTIFY_SOCKET).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    println!(
        "gateway listening on {} (clients), {} (http), {} shards",
        gw.client_addr, gw.http_addr, shards
    );
    if let Some(ws) = gw.ws_addr {
        println!("websocket listening on {ws}");
    }
    if let Err(e) = forward_signals(gw.event_sender()) {
        eprintln!("cannot install signal handlers: {e}");
        let _ = gw.stop();
        return ExitCode::from(1);
    }
    let events = gw.events().clone();
    let mut evacuate = false;
    loop {
        match events.recv() {
            Ok(GatewayEvent::Reload(reply)) => {
                let outcome = load_config(cli).and_then(|c| gw.reload(c));
                if let Err(e) = &outcome {
                    tracing::error!(error = %e, "config reload refused; the running config stays");
                }
                if let Some(tx) = reply {
                    let _ = tx.send(outcome);
                }
            }
            Ok(GatewayEvent::Upgrade { binary, reply }) => {
                let refuse = |why: String| {
                    tracing::error!(error = %why, "upgrade refused");
                    if let Some(tx) = &reply {
                        let _ = tx.send(Err(why));
                    }
                };
                if demo.is_some() {
                    refuse("the demo backend runs in this process and cannot be handed over; run it as `slg-gateway demo-backend`".into());
                    continue;
                }
                let Some(bin) = binary.map(PathBuf::from).or_else(|| exe.clone()) else {
                    refuse("the path of this binary is unknown; name one (?binary=)".into());
                    continue;
                };
                let limits = slg_gateway::upgrade::Deadlines::default();
                if slg_gateway::upgrade::upgrade_to(&gw, &bin, limits, reply).is_ok() {
                    // Everything is the new process's: end without a word
                    // to anyone (the sockets it holds stay open).
                    drop(gw.stop());
                    return ExitCode::SUCCESS;
                }
            }
            Ok(e) => {
                tracing::info!(event = ?e, "stopping");
                evacuate = matches!(e, GatewayEvent::DrainRequested { evacuate: true });
                break;
            }
            Err(_) => {
                tracing::error!("event channel closed; stopping");
                break;
            }
        }
    }
    let outcome = if evacuate {
        gw.drain_evacuating(&events, true)
    } else {
        gw.drain(&events)
    };
    if let Some(d) = demo {
        d.stop();
    }
    match (outcome.clean, &outcome.error) {
        (true, None) => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_FORCED),
    }
}

fn unreachable_config() -> ! {
    // validate() parsed demo_backend already.
    eprintln!("config key `demo_backend`: not an address");
    std::process::exit(2)
}
