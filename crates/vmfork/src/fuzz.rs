//! A KF/x-style snapshot fuzzing loop: fork the target once at its entry point, then per input
//! write it into the fork, run to the exit, record the outcome, reset.
//!
//! The feedback is the guest's exit code: an input that reaches an exit code not seen before
//! joins the corpus (a stand-in for coverage that needs no instrumentation).

use crate::error::{Error, Result};
use crate::{ExitReason, Vm};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where the target reads its input, and how long to fuzz.
#[derive(Clone, Debug)]
pub struct FuzzConfig {
    /// Guest-physical address the input bytes are written to.
    pub input_addr: u64,
    /// Guest-physical address of the little-endian u64 input length.
    pub input_len_addr: u64,
    /// Largest input.
    pub max_input: usize,
    /// Stop after this many executions...
    pub max_execs: u64,
    /// ...or after this long, whichever comes first.
    pub max_time: Duration,
    /// Stop at the first crash.
    pub stop_on_crash: bool,
    /// Seed of the mutation RNG (runs are reproducible).
    pub seed: u64,
}

/// What a fuzzing run found.
#[derive(Clone, Debug, Default)]
pub struct FuzzReport {
    pub execs: u64,
    pub elapsed: Duration,
    /// Inputs that crashed the guest, with the crash.
    pub crashes: Vec<(Vec<u8>, String)>,
    /// How often each exit code was seen.
    pub exit_codes: BTreeMap<u8, u64>,
    pub corpus_size: usize,
}

impl FuzzReport {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// xorshift64*: small, fast, deterministic; fuzzing needs no cryptographic quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &[u8], max: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    match rng.below(4) {
        0 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] = rng.next() as u8;
        }
        1 if out.len() < max => out.push(rng.next() as u8),
        2 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] ^= 1 << rng.below(8);
        }
        _ if out.len() < max => {
            let i = rng.below(out.len() + 1);
            out.insert(i, rng.next() as u8);
        }
        _ => out.truncate(rng.below(max)),
    }
    out
}

/// Fuzzes `target`, a fork made at the harness's entry point (it is reset between inputs).
pub fn fuzz(target: &Vm, config: &FuzzConfig) -> Result<FuzzReport> {
    if !target.is_fork() {
        return Err(Error::Invalid(
            "the fuzzing target must be a fork (it is reset after every input)".into(),
        ));
    }
    let mut rng = Rng(config.seed | 1);
    let mut corpus: Vec<Vec<u8>> = vec![Vec::new()];
    let mut report = FuzzReport::default();
    let start = Instant::now();
    while report.execs < config.max_execs && start.elapsed() < config.max_time {
        let parent = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, parent, config.max_input);
        target.ram().write(config.input_addr, &input)?;
        target
            .ram()
            .write_u64(config.input_len_addr, input.len() as u64)?;
        let outcome = target.run_inline()?;
        report.execs += 1;
        match outcome {
            ExitReason::GuestExit(code) => {
                let seen = report.exit_codes.entry(code).or_insert(0);
                if *seen == 0 {
                    corpus.push(input);
                }
                *seen += 1;
            }
            crash if crash.is_fault() => {
                report.crashes.push((input, crash.summary()));
                if config.stop_on_crash {
                    target.reset()?;
                    break;
                }
            }
            other => return Err(Error::Invalid(format!("fuzz target stopped: {other}"))),
        }
        target.reset()?;
    }
    report.elapsed = start.elapsed();
    report.corpus_size = corpus.len();
    Ok(report)
}
