//! Snapshot fuzzing: fork the target once at its entry point, then per input write it into a
//! fork, run to an exit, a crash or a time limit, learn from it, and reset the fork.
//!
//! Feedback is block coverage from one-shot breakpoints ([`coverage`]) or, for comparison, the
//! guest's exit code. Crashes are told apart by kind, RIP and stack top ([`triage`]); inputs
//! that reached something new form the corpus ([`corpus`]); the built-in mutator ([`mutate`])
//! uses the comparison constants found in the code. One target fork per core, each resetting
//! on its own, all sharing one coverage base.

pub mod corpus;
pub mod coverage;
pub mod mutate;
pub mod triage;

use crate::error::{Error, Result};
use crate::{ExitReason, ForkOptions, ThreadTimer, Vm, VmStatus};
use corpus::Corpus;
use coverage::{Breakpoints, Hit};
use mutate::Rng;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use triage::{Crash, Outcome};

/// What makes an input interesting enough to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feedback {
    /// It reached a basic block no input reached before (or a new exit code).
    Coverage,
    /// It made the guest exit with a code not seen before (no breakpoints at all).
    ExitCode,
}

/// Where the target reads its input, what to watch, and how long to fuzz.
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
    /// Stop once a crash at this guest-virtual RIP is found.
    pub stop_at_rip: Option<u64>,
    /// Seed of the mutation RNG (a one-core run is reproducible).
    pub seed: u64,
    pub feedback: Feedback,
    /// Guest-virtual `[start, end)` of the code to cover (coverage feedback).
    pub code: Option<(u64, u64)>,
    /// More entry points for the disassembly (the target's RIP always is one).
    pub entries: Vec<u64>,
    /// Block starts to use instead of disassembling `code`.
    pub blocks: Option<Vec<u64>>,
    /// Guest-virtual addresses whose execution is a crash (a panic routine, say).
    pub crash_sites: Vec<u64>,
    /// Guest exit codes that mean the guest detected a bug (its crash port).
    pub crash_codes: Vec<u8>,
    /// Time limit of one input; a slower input is a timeout, and the run goes on.
    pub timeout: Duration,
    /// Target forks, one per thread.
    pub cores: usize,
    /// Where the corpus lives (read at start: a run resumes where the last one stopped).
    pub corpus_dir: Option<PathBuf>,
    /// Where unique crashes and timeouts are written.
    pub crashes_dir: Option<PathBuf>,
    /// Inputs to start from.
    pub seeds_dir: Option<PathBuf>,
    /// The command that reproduces a saved crash, `{}` standing for the input file.
    pub replay_command: String,
}

impl FuzzConfig {
    /// A one-core, coverage-less configuration for a harness reading input the vmfork way.
    pub fn new(input_addr: u64, input_len_addr: u64, max_input: usize) -> Self {
        Self {
            input_addr,
            input_len_addr,
            max_input,
            max_execs: u64::MAX,
            max_time: Duration::from_secs(60),
            stop_on_crash: false,
            stop_at_rip: None,
            seed: 1,
            feedback: Feedback::ExitCode,
            code: None,
            entries: Vec::new(),
            blocks: None,
            crash_sites: Vec::new(),
            crash_codes: Vec::new(),
            timeout: Duration::from_millis(100),
            cores: 1,
            corpus_dir: None,
            crashes_dir: None,
            seeds_dir: None,
            replay_command: "vmfork fuzz --replay {}".into(),
        }
    }
}

/// A unique crash and what found it.
#[derive(Clone, Debug)]
pub struct CrashRecord {
    pub crash: Crash,
    /// The first input that produced it.
    pub input: Vec<u8>,
    /// The execution (counted over all cores from 1) that first produced it.
    pub first_exec: u64,
    /// How many inputs produced it.
    pub count: u64,
    /// Where it was saved.
    pub saved: Option<PathBuf>,
}

/// What a fuzzing run found.
#[derive(Clone, Debug, Default)]
pub struct FuzzReport {
    pub execs: u64,
    pub elapsed: Duration,
    /// Unique crashes, in the order found.
    pub crashes: Vec<CrashRecord>,
    /// Inputs that ran past the time limit.
    pub timeouts: u64,
    /// How often each exit code was seen.
    pub exit_codes: BTreeMap<u8, u64>,
    pub corpus_size: usize,
    /// Blocks armed and blocks reached (coverage feedback).
    pub blocks: usize,
    pub blocks_hit: usize,
    /// Inputs run again after a breakpoint that stopped the run (hosts without `int3` exits).
    pub reruns: u64,
    /// Comparison constants the mutator used.
    pub tokens: usize,
}

impl FuzzReport {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The unique crash at `rip`, if found.
    pub fn crash_at(&self, rip: u64) -> Option<&CrashRecord> {
        self.crashes.iter().find(|c| c.crash.rip == rip)
    }
}

/// A fuzzing target has no devices and no interrupts: runs depend on the input alone.
pub fn target_fork_options() -> ForkOptions {
    ForkOptions {
        no_devices: true,
        block_interrupts: true,
        ..ForkOptions::default()
    }
}

/// The coverage base: a fork of the entry with every coverage block and crash site armed.
/// Targets fork from it; a block one of them reaches is taken out for all of them.
pub struct CoverageBase {
    base: Vm,
    breakpoints: Arc<Breakpoints>,
    /// Block starts armed, ascending (a block's index here is its coverage map slot).
    blocks: Vec<u64>,
    tokens: Vec<Vec<u8>>,
    config: FuzzConfig,
}

impl CoverageBase {
    /// Forks `entry` (stopped where the harness is about to read input; not changed) and arms
    /// it: coverage blocks when `config.feedback` is coverage (found by disassembling
    /// `config.code`, or `config.blocks`), and `config.crash_sites` always.
    pub fn new(entry: &Vm, config: &FuzzConfig) -> Result<Self> {
        Self::with_coverage(entry, config, config.feedback == Feedback::Coverage)
    }

    fn with_coverage(entry: &Vm, config: &FuzzConfig, coverage: bool) -> Result<Self> {
        if entry.status() == VmStatus::Running {
            return Err(Error::Invalid(
                "the fuzzing entry VM must be stopped at the harness's entry (pause it first)"
                    .into(),
            ));
        }
        if config.max_input == 0 || config.cores == 0 || config.timeout.is_zero() {
            return Err(Error::Invalid(
                "max input, cores and the per-input timeout must be non-zero".into(),
            ));
        }
        let base = entry.fork(&target_fork_options())?;
        let mut blocks = std::collections::BTreeSet::new();
        let mut tokens = Vec::new();
        if coverage {
            let (start, end) = config.code.ok_or_else(|| {
                Error::Invalid("coverage feedback needs the target's code range".into())
            })?;
            let code = coverage::read_code(&base, start, end)?;
            // The fork may stand before the code (in a boot stub): its start is an entry too.
            let mut entries = vec![base.registers(0)?.regs.rip, start];
            entries.extend(&config.entries);
            let map = coverage::map_code(&code, start, &entries);
            blocks = match &config.blocks {
                Some(given) => given.iter().copied().collect(),
                None => map.blocks,
            };
            tokens = map.tokens.into_iter().collect();
        }
        let breakpoints = Arc::new(Breakpoints::arm(&base, &blocks, &config.crash_sites)?);
        Ok(Self {
            base,
            breakpoints,
            blocks: blocks.into_iter().collect(),
            tokens,
            config: config.clone(),
        })
    }

    /// Block starts armed, ascending.
    pub fn blocks(&self) -> &[u64] {
        &self.blocks
    }

    /// The coverage map slot of the block at `addr`.
    pub fn block_index(&self, addr: u64) -> Option<usize> {
        self.blocks.binary_search(&addr).ok()
    }

    /// Constants the target's code compares with (a mutator dictionary).
    pub fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    /// Blocks reached so far by any target.
    pub fn blocks_hit(&self) -> usize {
        self.breakpoints.counts().1
    }

    /// A new target fork, which runs inputs on the calling thread only (its time limit kicks
    /// this thread).
    pub fn target(&self) -> Result<Target> {
        let target = self.base.fork(&target_fork_options())?;
        let (blocks, _) = self.breakpoints.counts();
        if blocks > 0 || !self.config.crash_sites.is_empty() {
            target.set_breakpoint_exits(true)?;
        }
        Ok(Target {
            target,
            timer: ThreadTimer::for_this_thread()?,
            thread: std::thread::current().id(),
            breakpoints: Arc::clone(&self.breakpoints),
            config: self.config.clone(),
            reruns: 0,
        })
    }
}

/// What one input did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    pub outcome: Outcome,
    /// Blocks this input reached before any other input did.
    pub new_blocks: Vec<u64>,
}

/// One target fork: runs an input, learns what it did, resets.
pub struct Target {
    target: Vm,
    timer: ThreadTimer,
    thread: std::thread::ThreadId,
    breakpoints: Arc<Breakpoints>,
    config: FuzzConfig,
    reruns: u64,
}

/// The most a single input may be run again for breakpoint stops before this is an error.
const MAX_RERUNS: u64 = 100_000;

impl Target {
    /// Inputs run again after a breakpoint stopped them (hosts without `int3` exits).
    pub fn reruns(&self) -> u64 {
        self.reruns
    }

    /// The target VM (reset between inputs).
    pub fn vm(&self) -> &Vm {
        &self.target
    }

    /// Runs `input` to its outcome and resets the target.
    pub fn run(&mut self, input: &[u8]) -> Result<Execution> {
        if std::thread::current().id() != self.thread {
            return Err(Error::Invalid(
                "a fuzzing target runs inputs on the thread that made it".into(),
            ));
        }
        if input.len() > self.config.max_input {
            return Err(Error::Invalid(format!(
                "the input has {} bytes, the target takes at most {}",
                input.len(),
                self.config.max_input
            )));
        }
        let (outcome, new_blocks) = self.execute(input)?;
        Ok(Execution {
            outcome,
            new_blocks,
        })
    }

    fn load(&self, input: &[u8]) -> Result<()> {
        self.target.ram().write(self.config.input_addr, input)?;
        self.target
            .ram()
            .write_u64(self.config.input_len_addr, input.len() as u64)
    }

    /// Runs one input to its outcome and resets the target; also returns the blocks it
    /// reached first.
    fn execute(&mut self, input: &[u8]) -> Result<(Outcome, Vec<u64>)> {
        let mut new_blocks = Vec::new();
        let mut reruns = 0;
        // Sites this input stopped at (and had taken out): a second stop one byte after the
        // same site is a real fault there.
        let mut stopped_at_sites = Vec::new();
        self.load(input)?;
        let outcome = loop {
            let exit = self
                .target
                .run_inline_for(self.config.timeout, &self.timer)?;
            let stopped_at = match &exit {
                // KVM handed the `int3` to the VMM: the vCPU is on it.
                ExitReason::Breakpoint { rip, .. } => Some((*rip, false)),
                // The guest took the `int3` itself and had nowhere to go: the fault is one byte
                // after the breakpoint. (Another target may have taken the site out meanwhile,
                // so the byte there is not checked; a real fault just after a site shows as
                // a second stop at it.)
                ExitReason::TripleFault(d)
                    if d.regs.rip > 0
                        && self.breakpoints.is_site(d.regs.rip - 1)
                        && !stopped_at_sites.contains(&(d.regs.rip - 1)) =>
                {
                    stopped_at_sites.push(d.regs.rip - 1);
                    Some((d.regs.rip - 1, true))
                }
                _ => None,
            };
            if let Some((addr, must_rerun)) = stopped_at {
                match self.breakpoints.take(&self.target, addr)? {
                    Some(Hit::Crash) => {
                        break Outcome::Crash(Crash {
                            kind: "crash-site".into(),
                            rip: addr,
                            stack_top: self.stack_top(),
                        })
                    }
                    Some(hit) => {
                        if hit == Hit::NewBlock {
                            new_blocks.push(addr);
                        }
                        if must_rerun {
                            reruns += 1;
                            if reruns > MAX_RERUNS {
                                return Err(Error::Invalid(format!(
                                    "breakpoint at {addr:#x} keeps stopping the target"
                                )));
                            }
                            self.target.reset()?;
                            self.load(input)?;
                        }
                        continue;
                    }
                    None => {}
                }
            }
            break match exit {
                ExitReason::GuestExit(code) if self.config.crash_codes.contains(&code) => {
                    let rip = self.target.registers(0)?.regs.rip;
                    Outcome::Crash(Crash {
                        kind: format!("crash-code/{code}"),
                        rip,
                        stack_top: self.stack_top(),
                    })
                }
                ExitReason::GuestExit(code) => Outcome::Exit(code),
                ExitReason::Stopped => Outcome::Timeout {
                    rip: self.target.registers(0)?.regs.rip,
                },
                other => Outcome::Crash(triage::classify(&self.target, &other)),
            };
        };
        self.reruns += reruns;
        // A clean exit or a timeout leaves the guest where a CPL3-confined guest can be; a
        // crash (triple fault, KVM error) may not.
        match outcome {
            Outcome::Crash(_) => self.target.reset()?,
            _ => self.target.reset_quick()?,
        };
        Ok((outcome, new_blocks))
    }

    fn stack_top(&self) -> u64 {
        let Ok(regs) = self.target.registers(0) else {
            return 0;
        };
        let mut word = [0u8; 8];
        match self.target.read_virtual(0, regs.regs.rsp, &mut word) {
            Ok(()) => u64::from_le_bytes(word),
            Err(_) => 0,
        }
    }
}

/// What the workers share.
struct Shared {
    corpus: Corpus,
    exit_codes: BTreeMap<u8, u64>,
    crashes: Vec<CrashRecord>,
    timeouts: u64,
    timeout_sites: HashSet<u64>,
    store: triage::CrashStore,
    error: Option<Error>,
}

/// Fuzzes the harness `entry` (a stopped VM at the point where the harness reads its input;
/// it is not changed): forks a coverage base from it, arms breakpoints there, forks one target
/// per core from that, and runs inputs until a limit is reached.
pub fn fuzz(entry: &Vm, config: &FuzzConfig) -> Result<FuzzReport> {
    let setup = CoverageBase::new(entry, config)?;
    let mut seeds = Vec::new();
    for dir in [&config.corpus_dir, &config.seeds_dir]
        .into_iter()
        .flatten()
    {
        if dir.exists() || Some(dir) == config.seeds_dir.as_ref() {
            seeds.extend(corpus::read_inputs(dir, config.max_input)?);
        }
    }
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    let shared = Mutex::new(Shared {
        corpus: Corpus::new(config.corpus_dir.as_deref())?,
        exit_codes: BTreeMap::new(),
        crashes: Vec::new(),
        timeouts: 0,
        timeout_sites: HashSet::new(),
        store: triage::CrashStore::new(config.crashes_dir.as_deref(), &config.replay_command)?,
        error: None,
    });
    let execs = AtomicU64::new(0);
    let reruns = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let seeds = &seeds;
    let run = Run {
        setup: &setup,
        config,
        seeds,
        shared: &shared,
        execs: &execs,
        reruns: &reruns,
        stop: &stop,
        start,
    };
    std::thread::scope(|scope| {
        for worker in 0..config.cores {
            let run = &run;
            scope.spawn(move || {
                if let Err(e) = run.work(worker) {
                    run.stop.store(true, Ordering::Relaxed);
                    lock(run.shared).error.get_or_insert(e);
                }
            });
        }
    });
    let mut shared = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = shared.error.take() {
        return Err(e);
    }
    let (blocks, blocks_hit) = setup.breakpoints.counts();
    Ok(FuzzReport {
        execs: execs.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        crashes: shared.crashes,
        timeouts: shared.timeouts,
        exit_codes: shared.exit_codes,
        corpus_size: shared.corpus.len(),
        blocks,
        blocks_hit,
        reruns: reruns.load(Ordering::Relaxed),
        tokens: setup.tokens.len(),
    })
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the workers of one run share.
struct Run<'a> {
    setup: &'a CoverageBase,
    config: &'a FuzzConfig,
    seeds: &'a [Vec<u8>],
    shared: &'a Mutex<Shared>,
    execs: &'a AtomicU64,
    reruns: &'a AtomicU64,
    stop: &'a AtomicBool,
    start: Instant,
}

impl Run<'_> {
    /// Worker `worker`: its own target fork, inputs until a limit.
    fn work(&self, worker: usize) -> Result<()> {
        let mut runner = self.setup.target()?;
        let result = self.fuzz_with(worker, &mut runner);
        self.reruns.fetch_add(runner.reruns, Ordering::Relaxed);
        result
    }

    fn fuzz_with(&self, worker: usize, runner: &mut Target) -> Result<()> {
        let Run {
            setup,
            config,
            seeds,
            shared,
            execs,
            stop,
            start,
            ..
        } = *self;
        let mut rng = Rng::new(config.seed.wrapping_add(worker as u64));
        // Each worker runs its share of the seeds first, so their coverage is known.
        let mut my_seeds = seeds.iter().skip(worker).step_by(config.cores);
        loop {
            if stop.load(Ordering::Relaxed)
                || execs.load(Ordering::Relaxed) >= config.max_execs
                || start.elapsed() >= config.max_time
            {
                break;
            }
            let (input, is_seed) = match my_seeds.next() {
                Some(seed) => (seed.clone(), true),
                None => {
                    let s = lock(shared);
                    // Until some input is kept (every seed so far crashed or hung), mutate nothing.
                    // Half the picks go to the newest entries: the inputs that got deepest last.
                    let pick = |rng: &mut Rng| match s.corpus.len() {
                        0 => &[][..],
                        n if rng.below(2) == 0 => s.corpus.get(n - 1 - rng.below(n.min(4))),
                        n => s.corpus.get(rng.below(n)),
                    };
                    let parent = pick(&mut rng);
                    let other = pick(&mut rng);
                    let input =
                        mutate::mutate(&mut rng, parent, other, &setup.tokens, config.max_input);
                    (input, false)
                }
            };
            let (outcome, new_blocks) = runner.execute(&input)?;
            let exec = execs.fetch_add(1, Ordering::Relaxed) + 1;
            let mut s = lock(shared);
            match outcome {
                Outcome::Exit(code) => {
                    let seen = s.exit_codes.entry(code).or_insert(0);
                    *seen += 1;
                    let new_code = *seen == 1;
                    if is_seed || !new_blocks.is_empty() || new_code {
                        s.corpus.add(&input)?;
                    }
                }
                Outcome::Timeout { rip } => {
                    s.timeouts += 1;
                    if s.timeout_sites.insert(rip) {
                        let what = format!("timeout after {:?} at rip {rip:#x}", config.timeout);
                        s.store.save(&format!("timeout-{rip:x}"), &input, &what)?;
                    }
                }
                Outcome::Crash(crash) => {
                    if let Some(known) = s.crashes.iter_mut().find(|c| c.crash == crash) {
                        known.count += 1;
                    } else {
                        let what = format!("crash: {crash}");
                        let saved = s.store.save(&crash.signature(), &input, &what)?;
                        if config.stop_on_crash || config.stop_at_rip == Some(crash.rip) {
                            stop.store(true, Ordering::Relaxed);
                        }
                        s.crashes.push(CrashRecord {
                            crash,
                            input: input.clone(),
                            first_exec: exec,
                            count: 1,
                            saved,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one input against `entry` the way [`fuzz`] would (crash sites armed, no coverage
/// breakpoints), deterministically: what a saved crash does, again.
pub fn replay(entry: &Vm, config: &FuzzConfig, input: &[u8]) -> Result<Outcome> {
    if input.len() > config.max_input {
        return Err(Error::Invalid(format!(
            "the input has {} bytes, the target takes at most {}",
            input.len(),
            config.max_input
        )));
    }
    let setup = CoverageBase::with_coverage(entry, config, false)?;
    let mut runner = setup.target()?;
    Ok(runner.execute(input)?.0)
}
