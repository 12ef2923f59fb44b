//! vmfork as a LibAFL [`Executor`]: each input runs in a vmfork target fork (reset after it),
//! and a map observer records what it reached first — one slot per coverage block, then one
//! per guest exit code — so LibAFL's feedbacks, mutators, schedulers and corpora drive vmfork.
//!
//! [`fuzz`] is a complete single-core LibAFL loop over a [`vmfork::fuzz::CoverageBase`]:
//! havoc and token mutations (tokens from the target's comparison constants), a queue
//! scheduler, a max-map feedback, crash and timeout objectives, corpora in memory or on disk.

use libafl::corpus::{Corpus, InMemoryCorpus, OnDiskCorpus};
use libafl::events::SimpleEventManager;
use libafl::executors::{Executor, ExitKind, HasObservers};
use libafl::feedback_or_fast;
use libafl::feedbacks::{CrashFeedback, MaxMapFeedback, TimeoutFeedback};
use libafl::fuzzer::{Evaluator, Fuzzer, StdFuzzer};
use libafl::inputs::{BytesInput, HasTargetBytes};
use libafl::monitors::NopMonitor;
use libafl::mutators::{havoc_mutations, tokens_mutations, HavocScheduledMutator, Tokens};
use libafl::observers::StdMapObserver;
use libafl::schedulers::QueueScheduler;
use libafl::stages::StdMutationalStage;
use libafl::state::{HasCorpus, HasExecutions, HasMaxSize, HasSolutions, StdState};
use libafl::HasMetadata;
use libafl_bolts::rands::StdRand;
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
    /// A map observer sized for `base`: its blocks, then 256 exit codes.
    pub fn observer(base: &CoverageBase) -> CoverageObserver {
        StdMapObserver::owned(MAP_NAME, vec![0u8; base.blocks().len() + 256])
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
    let mut objective = feedback_or_fast!(CrashFeedback::new(), TimeoutFeedback::new());
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

type Objective = libafl::feedbacks::FastOrFeedback<CrashFeedback, TimeoutFeedback>;

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
