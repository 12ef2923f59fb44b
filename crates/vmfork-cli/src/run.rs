//! `vmfork run`: one VM in the foreground, serial on the terminal.

use crate::guest_args::GuestArgs;
use crate::{interrupt, CliResult};
use clap::Args;
use std::time::{Duration, Instant};
use vmfork::devices::SerialSink;
use vmfork::Vm;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Stop the VM after this many seconds (exit status 130).
    #[arg(long)]
    pub timeout: Option<f64>,
}

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
    vm.start().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let reason = loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(50)) {
            break reason;
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
    Ok(reason.status().clamp(0, 255) as u8)
}
