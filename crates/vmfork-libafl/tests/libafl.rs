//! LibAFL drives vmfork forks: its havoc and token mutators, queue scheduler and max-map
//! feedback over vmfork's coverage breakpoints find the planted parser's deepest bug, on real
//! KVM; its on-disk corpora fill.

use guests::layout::{mailbox, INPUT, MAILBOX};
use guests::{parser_bug_input, ParserBug, Workload};
use std::time::Duration;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::fuzz::{replay, Feedback, FuzzConfig, Outcome};
use vmfork::{Vm, VmConfig};

fn parser() -> Vm {
    let cfg = VmConfig {
        mem_bytes: 16 << 20,
        irqchip: false,
        ..VmConfig::default()
    };
    let vm = Vm::boot(
        cfg,
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(Workload::Parser.elf())),
    )
    .unwrap();
    vm.run_to_ready(Duration::from_secs(10)).unwrap();
    vm
}

fn config() -> FuzzConfig {
    let mut c = FuzzConfig::new(INPUT, MAILBOX + mailbox::INPUT_LEN, 64);
    c.feedback = Feedback::Coverage;
    c.code = Some(Workload::Parser.code_range());
    c.max_time = Duration::from_secs(120);
    c.seed = 3;
    c
}

fn bug_rip(vm: &Vm, bug: ParserBug) -> u64 {
    match replay(vm, &config(), &parser_bug_input(bug)).unwrap() {
        Outcome::Crash(c) => c.rip,
        other => panic!("{other:?}"),
    }
}

#[test]
fn libafl_with_vmfork_coverage_finds_a_planted_bug_and_keeps_its_corpora_on_disk() {
    let vm = parser();
    // Three records deep (the deepest takes LibAFL's generic havoc far more executions than a
    // debug-build test should spend; `vmfork bench fuzz` reports it).
    let target = bug_rip(&vm, ParserBug::ZeroCount);
    let dir = std::env::temp_dir().join(format!("vmfork-libafl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config();
    cfg.max_execs = 100_000;
    cfg.stop_at_rip = Some(target);
    cfg.corpus_dir = Some(dir.join("corpus"));
    cfg.crashes_dir = Some(dir.join("crashes"));
    let report = vmfork_libafl::fuzz(&vm, &cfg).unwrap();
    eprintln!("{report:?}");
    let (crash, exec) = report.crash_at(target).expect("LibAFL found the bug");
    assert_eq!(crash.kind, "triple-fault/#DE");
    assert!(*exec <= report.execs);
    assert!(report.blocks_hit > 5 && report.blocks_hit <= report.blocks);
    assert!(report.corpus_size > 3, "{report:?}");
    assert!(report.solutions >= 1);
    // LibAFL's on-disk corpora hold the inputs it kept and the crash it found.
    let files = |d: &str| {
        std::fs::read_dir(dir.join(d))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    assert!(files("corpus") >= report.corpus_size, "{}", files("corpus"));
    assert!(files("crashes") >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_executor_needs_a_code_range_for_coverage() {
    let vm = parser();
    let mut cfg = config();
    cfg.code = None;
    let err = vmfork_libafl::fuzz(&vm, &cfg).unwrap_err().to_string();
    assert!(err.contains("code range"), "{err}");
}
