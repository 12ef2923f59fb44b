//! `vmfork run`: one VM in the foreground, serial on the terminal.

use crate::guest_args::GuestArgs;
use crate::{interrupt, CliResult};
use clap::Args;
use std::time::{Duration, Instant};
use vmfork::api::{ApiServer, Registry};
use vmfork::devices::SerialSink;
use vmfork::Vm;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Stop the VM after this many seconds (exit status 130).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Serve the control API on this Unix socket (fork, reset, inspect this VM's family). The
    /// process then runs until every VM of the family has exited or been destroyed.
    #[arg(long)]
    pub api_sock: Option<std::path::PathBuf>,
}

/// Exit status when the console's reader went away: 128 + SIGPIPE, as a shell reports a tool
/// killed writing to a closed pipe.
pub const CONSOLE_CLOSED_STATUS: u8 = 141;

pub fn run(args: RunArgs) -> CliResult<u8> {
    let config = args.guest.config()?;
    let spec = args.guest.boot_spec()?;
    let timeout = match args.timeout {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            return Err(format!(
                "--timeout {s} must be a positive number of seconds"
            ))
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    interrupt::install()?;
    let vm = Vm::boot(config, SerialSink::Stdout, &spec).map_err(|e| e.to_string())?;
    args.guest.apply_params(&vm)?;
    let registry = Registry::new(None);
    let vm = registry.add(vm);
    let server = match &args.api_sock {
        Some(path) => Some(ApiServer::start(path, registry.clone()).map_err(|e| e.to_string())?),
        None => None,
    };
    vm.start().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let reason = loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(50)) {
            break reason;
        }
        if vmfork::devices::stdout_closed() {
            // Nobody reads the console any more (`| head`): end as a Unix tool does.
            vm.stop();
            registry.destroy_all();
            return Ok(CONSOLE_CLOSED_STATUS);
        }
        let timed_out = timeout.is_some_and(|t| started.elapsed() >= t);
        if interrupt::interrupted() || timed_out {
            if timed_out {
                eprintln!(
                    "vmfork: stopping the VM after the {:?} timeout",
                    timeout.unwrap_or_default()
                );
            }
            vm.stop();
        }
    };
    if reason.is_fault() {
        eprintln!("vmfork: {reason}");
    }
    if server.is_some() {
        // Forks may outlive the root VM: serve them until they are gone too.
        while registry.any_alive() && !interrupt::interrupted() {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(server);
        registry.destroy_all();
    }
    Ok(reason.status().clamp(0, 255) as u8)
}
