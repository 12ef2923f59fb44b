//! vmfork as a LibAFL [`Executor`]: each input runs in a vmfork target fork (reset after it),
//! and a map observer records what it reached first — one slot per coverage block, then one
//! per guest exit code, then 256 slots for crash signatures (kind, RIP, stack top, hashed) so a
//! crash objective can keep one input per kind of crash — so LibAFL's feedbacks, mutators,
//! schedulers, corpora and launcher drive vmfork.
//!
//! [`fuzz`] is a complete single-core LibAFL loop over a [`vmfork::fuzz::CoverageBase`]:
//! havoc and token mutations (tokens from the target's comparison constants), a queue
//! scheduler, a max-map feedback, crash and timeout objectives, corpora in memory or on disk.

use libafl::corpus::{Corpus, InMemoryCorpus, OnDiskCorpus};
use libafl::events::launcher::{ClientDescription, Launcher};
use libafl::events::{EventConfig, LlmpRestartingEventManager, SendExiting, SimpleEventManager};
use libafl::executors::{Executor, ExitKind, HasObservers};
use libafl::feedbacks::{CrashFeedback, MaxMapFeedback, TimeoutFeedback};
use libafl::fuzzer::{Evaluator, Fuzzer, StdFuzzer};
use libafl::inputs::{BytesInput, HasTargetBytes};
use libafl::monitors::{NopMonitor, SimpleMonitor};
use libafl::mutators::{havoc_mutations, tokens_mutations, HavocScheduledMutator, Tokens};
use libafl::observers::StdMapObserver;
use libafl::schedulers::QueueScheduler;
use libafl::stages::StdMutationalStage;
use libafl::state::{HasCorpus, HasExecutions, HasMaxSize, HasSolutions, StdState};
use libafl::HasMetadata;
use libafl::{feedback_and_fast, feedback_or_fast};
use libafl_bolts::core_affinity::Cores;
use libafl_bolts::rands::StdRand;
use libafl_bolts::shmem::{ShMemProvider, StdShMemProvider};
use libafl_bolts::tuples::{tuple_list, Merge, RefIndexable};
use libafl_bolts::{ToSlice, ToSliceMut};
use std::time::{Duration, Instant};
use vmfork::fuzz::{CoverageBase, Crash, FuzzConfig, Outcome, Target};
use vmfork::Vm;

/// The map observer's name.
pub const MAP_NAME: &str = "vmfork-coverage";

/// The coverage map observer a [`VmforkExecutor`] fills.
pub type CoverageObserver = StdMapObserver<'static, u8, false>;

/// A LibAFL executor that runs each input in a vmfork target fork.
pub struct VmforkExecutor<OT> {
    target: Target,
    blocks: Vec<u64>,
    observers: (CoverageObserver, OT),
    /// Unique crashes seen, with the execution count that first produced each.
    crashes: Vec<(Crash, u64)>,
}

impl<OT> VmforkExecutor<OT> {
    /// A map observer sized for `base`: its blocks, 256 exit codes, 256 crash signatures.
    pub fn observer(base: &CoverageBase) -> CoverageObserver {
        StdMapObserver::owned(MAP_NAME, vec![0u8; base.blocks().len() + 512])
    }

    /// An executor over a new target of `base` (run it on this thread), filling `observer`
    /// (from [`Self::observer`]); `others` are more observers.
    pub fn new(
        base: &CoverageBase,
        observer: CoverageObserver,
        others: OT,
    ) -> vmfork::Result<Self> {
        Ok(Self {
            target: base.target()?,
            blocks: base.blocks().to_vec(),
            observers: (observer, others),
            crashes: Vec::new(),
        })
    }

    /// Unique crashes (kind, RIP, stack top) and the execution that first found each.
    pub fn crashes(&self) -> &[(Crash, u64)] {
        &self.crashes
    }
}

impl<EM, I, S, Z, OT> Executor<EM, I, S, Z> for VmforkExecutor<OT>
where
    I: HasTargetBytes,
    S: HasExecutions,
{
    fn run_target(
        &mut self,
        _fuzzer: &mut Z,
        state: &mut S,
        _mgr: &mut EM,
        input: &I,
    ) -> Result<ExitKind, libafl::Error> {
        *state.executions_mut() += 1;
        let bytes = input.target_bytes();
        let bytes = bytes.to_slice();
        let max = self.target.vm().ram().size() as usize;
        let run = self.target.run(&bytes[..bytes.len().min(max)]);
        let execution = match run {
            Ok(e) => e,
            // Too long for the target's input area: not a crash, just nothing.
            Err(vmfork::Error::Invalid(m)) if m.contains("at most") => return Ok(ExitKind::Ok),
            Err(e) => return Err(libafl::Error::unknown(e.to_string())),
        };
        let map = self.observers.0.to_slice_mut();
        for addr in &execution.new_blocks {
            if let Ok(slot) = self.blocks.binary_search(addr) {
                map[slot] = 1;
            }
        }
        Ok(match execution.outcome {
            Outcome::Exit(code) => {
                map[self.blocks.len() + usize::from(code)] = 1;
                ExitKind::Ok
            }
            Outcome::Timeout { .. } => ExitKind::Timeout,
            Outcome::Crash(crash) => {
                let signature = vmfork::fuzz::corpus::hash(crash.signature().as_bytes());
                map[self.blocks.len() + 256 + (signature % 256) as usize] = 1;
                if !self.crashes.iter().any(|(c, _)| *c == crash) {
                    self.crashes.push((crash, *state.executions()));
                }
                ExitKind::Crash
            }
        })
    }
}

impl<OT> HasObservers for VmforkExecutor<OT> {
    type Observers = (CoverageObserver, OT);

    fn observers(&self) -> RefIndexable<&Self::Observers, Self::Observers> {
        RefIndexable::from(&self.observers)
    }

    fn observers_mut(&mut self) -> RefIndexable<&mut Self::Observers, Self::Observers> {
        RefIndexable::from(&mut self.observers)
    }
}

/// What a LibAFL run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub execs: u64,
    pub elapsed: Duration,
    pub corpus_size: usize,
    /// Inputs LibAFL kept as solutions (crashes and timeouts).
    pub solutions: usize,
    /// Unique crashes and the execution that first found each.
    pub crashes: Vec<(Crash, u64)>,
    pub blocks: usize,
    pub blocks_hit: usize,
}

impl Report {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn crash_at(&self, rip: u64) -> Option<&(Crash, u64)> {
        self.crashes.iter().find(|(c, _)| c.rip == rip)
    }
}

fn libafl_err(e: libafl::Error) -> vmfork::Error {
    vmfork::Error::Invalid(format!("LibAFL: {e}"))
}

/// Fuzzes `entry` with LibAFL on this thread, within `config`'s limits (execs, time, stop on
/// crash or at a RIP); corpus and crashes go to `config.corpus_dir` / `config.crashes_dir`
/// when given (LibAFL's on-disk corpora), else stay in memory.
pub fn fuzz(entry: &Vm, config: &FuzzConfig) -> vmfork::Result<Report> {
    let base = CoverageBase::new(entry, config)?;
    let observer = VmforkExecutor::<()>::observer(&base);
    let mut feedback = MaxMapFeedback::new(&observer);
    let mut objective = objective(&observer);
    let rand = StdRand::with_seed(config.seed);
    macro_rules! run_with {
        ($corpus:expr, $solutions:expr) => {{
            let mut state = StdState::new(rand, $corpus, $solutions, &mut feedback, &mut objective)
                .map_err(libafl_err)?;
            drive(&base, config, observer, &mut state, feedback, objective)
        }};
    }
    let io = |e: libafl::Error| libafl_err(e);
    match (&config.corpus_dir, &config.crashes_dir) {
        (Some(c), Some(s)) => run_with!(
            OnDiskCorpus::new(c).map_err(io)?,
            OnDiskCorpus::new(s).map_err(io)?
        ),
        (Some(c), None) => run_with!(OnDiskCorpus::new(c).map_err(io)?, InMemoryCorpus::new()),
        (None, Some(s)) => run_with!(InMemoryCorpus::new(), OnDiskCorpus::new(s).map_err(io)?),
        (None, None) => run_with!(InMemoryCorpus::new(), InMemoryCorpus::new()),
    }
}

/// A crash or timeout that is new on the map (a new crash signature, or new blocks).
type Objective = libafl::feedbacks::FastAndFeedback<
    libafl::feedbacks::FastOrFeedback<CrashFeedback, TimeoutFeedback>,
    MaxMapFeedback<CoverageObserver, CoverageObserver>,
>;

fn objective(observer: &CoverageObserver) -> Objective {
    feedback_and_fast!(
        feedback_or_fast!(CrashFeedback::new(), TimeoutFeedback::new()),
        MaxMapFeedback::with_name("vmfork-objective", observer)
    )
}

fn drive<C, SC>(
    base: &CoverageBase,
    config: &FuzzConfig,
    observer: CoverageObserver,
    state: &mut StdState<C, BytesInput, StdRand, SC>,
    feedback: MaxMapFeedback<CoverageObserver, CoverageObserver>,
    objective: Objective,
) -> vmfork::Result<Report>
where
    C: Corpus<BytesInput>,
    SC: Corpus<BytesInput>,
{
    let mut mgr = SimpleEventManager::new(NopMonitor::new());
    let mut fuzzer = StdFuzzer::new(QueueScheduler::new(), feedback, objective);
    let mut executor = VmforkExecutor::new(base, observer, ())?;
    state.add_metadata(Tokens::from(base.tokens().to_vec()));
    state.set_max_size(config.max_input);
    let start = Instant::now();
    let mut seeds = vec![BytesInput::new(Vec::new())];
    for dir in [&config.seeds_dir, &config.corpus_dir]
        .into_iter()
        .flatten()
    {
        if dir.exists() {
            for bytes in vmfork::fuzz::corpus::read_inputs(dir, config.max_input)? {
                seeds.push(BytesInput::new(bytes));
            }
        }
    }
    for seed in seeds {
        fuzzer
            .evaluate_input(state, &mut executor, &mut mgr, &seed)
            .map_err(libafl_err)?;
    }
    if state.corpus().count() == 0 {
        // Every seed crashed or hung: keep the empty input to mutate from.
        fuzzer
            .add_input(state, &mut executor, &mut mgr, BytesInput::new(Vec::new()))
            .map_err(libafl_err)?;
    }
    let mutator = HavocScheduledMutator::new(havoc_mutations().merge(tokens_mutations()));
    let mut stages = tuple_list!(StdMutationalStage::new(mutator));
    while *state.executions() < config.max_execs && start.elapsed() < config.max_time {
        fuzzer
            .fuzz_one(&mut stages, &mut executor, state, &mut mgr)
            .map_err(libafl_err)?;
        let found = executor.crashes();
        if (config.stop_on_crash && !found.is_empty())
            || config
                .stop_at_rip
                .is_some_and(|rip| found.iter().any(|(c, _)| c.rip == rip))
        {
            break;
        }
    }
    Ok(Report {
        execs: *state.executions(),
        elapsed: start.elapsed(),
        corpus_size: state.corpus().count(),
        solutions: state.solutions().count(),
        crashes: executor.crashes().to_vec(),
        blocks: base.blocks().len(),
        blocks_hit: base.blocks_hit(),
    })
}

/// The state of one LibAFL client process of [`fuzz_on_cores`].
pub type ClientState =
    StdState<InMemoryCorpus<BytesInput>, BytesInput, StdRand, OnDiskCorpus<BytesInput>>;

type ClientManager = LlmpRestartingEventManager<
    (),
    BytesInput,
    ClientState,
    <StdShMemProvider as ShMemProvider>::ShMem,
    StdShMemProvider,
>;

/// What a launched run left behind (the broker prints its monitor's last status line).
#[derive(Clone, Debug, Default)]
pub struct LaunchReport {
    /// Files LibAFL wrote in the crashes directory (crashes and timeouts, all clients).
    pub solutions: usize,
}

/// Fuzzes with LibAFL's `Launcher`: an LLMP broker (this process) and one client process per
/// core, pinned to it, sharing new inputs over LLMP. Each client calls `make_entry` to build
/// its own entry VM (VM file descriptors do not survive `fork`, so this process must not have
/// created a VM before), then its own coverage base and target fork, and fuzzes for
/// `config.max_time`, then exits; the broker (a process of its own) prints its monitor's last
/// status line and ends with them. Crashes and timeouts that are new on the map go to
/// `config.crashes_dir` (required: LibAFL's clients keep them there).
pub fn fuzz_on_cores<F>(
    make_entry: F,
    config: &FuzzConfig,
    cores: usize,
) -> vmfork::Result<LaunchReport>
where
    F: Fn() -> vmfork::Result<Vm>,
{
    let crashes = config.crashes_dir.clone().ok_or_else(|| {
        vmfork::Error::Invalid("LibAFL on several cores needs a crashes directory".into())
    })?;
    if cores == 0 {
        return Err(vmfork::Error::Invalid("no cores to fuzz on".into()));
    }
    let core_list = Cores::from((0..cores).collect::<Vec<usize>>());
    // A free port for the broker.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| vmfork::Error::Invalid(format!("no free port for the LibAFL broker: {e}")))?;
    let status = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = std::sync::Arc::clone(&status);
    let monitor = SimpleMonitor::new(move |line: &str| {
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = line.to_string();
    });
    let err = |e: vmfork::Error| libafl::Error::unknown(e.to_string());
    let run_client = |state: Option<ClientState>,
                      mut mgr: ClientManager,
                      client: ClientDescription|
     -> Result<(), libafl::Error> {
        let entry = make_entry().map_err(err)?;
        let base = CoverageBase::new(&entry, config).map_err(err)?;
        let observer = VmforkExecutor::<()>::observer(&base);
        let mut feedback = MaxMapFeedback::new(&observer);
        let mut objective = objective(&observer);
        let mut state = match state {
            Some(state) => state,
            None => StdState::new(
                StdRand::with_seed(config.seed.wrapping_add(client.id() as u64)),
                InMemoryCorpus::new(),
                OnDiskCorpus::new(&crashes)?,
                &mut feedback,
                &mut objective,
            )?,
        };
        let mut fuzzer = StdFuzzer::new(QueueScheduler::new(), feedback, objective);
        let mut executor = VmforkExecutor::new(&base, observer, ()).map_err(err)?;
        state.add_metadata(Tokens::from(base.tokens().to_vec()));
        state.set_max_size(config.max_input);
        if state.must_load_initial_inputs() {
            fuzzer.add_input(
                &mut state,
                &mut executor,
                &mut mgr,
                BytesInput::new(Vec::new()),
            )?;
        }
        let mutator = HavocScheduledMutator::new(havoc_mutations().merge(tokens_mutations()));
        let mut stages = tuple_list!(StdMutationalStage::new(mutator));
        let start = Instant::now();
        while start.elapsed() < config.max_time && *state.executions() < config.max_execs {
            fuzzer.fuzz_one(&mut stages, &mut executor, &mut state, &mut mgr)?;
        }
        mgr.send_exiting()?;
        Ok(())
    };
    let broker_pid = std::process::id();
    let shmem = StdShMemProvider::new().map_err(libafl_err)?;
    let launched = Launcher::builder()
        .shmem_provider(shmem)
        .configuration(EventConfig::from_name("vmfork"))
        .monitor(monitor)
        .run_client(run_client)
        .cores(&core_list)
        .broker_port(port)
        .stdout_file(Some("/dev/null"))
        .build()
        .launch::<BytesInput, ClientState>();
    // Client processes come back here too once their fuzzing is over: they end now.
    if std::process::id() != broker_pid {
        let last = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !last.is_empty() {
            // The broker: its monitor's last word.
            println!("LibAFL broker: {last}");
        }
        std::process::exit(match launched {
            Ok(()) | Err(libafl::Error::ShuttingDown) => 0,
            Err(_) => 1,
        });
    }
    match launched {
        Ok(()) | Err(libafl::Error::ShuttingDown) => {}
        Err(e) => return Err(libafl_err(e)),
    }
    let solutions = std::fs::read_dir(&crashes)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0);
    Ok(LaunchReport { solutions })
}
