//! Snapshot fuzzing on real KVM: coverage breakpoints find the parser's deepest planted bug
//! where exit-code feedback does not; crashes are told apart and saved; hung inputs time out;
//! the corpus resumes; the harness's crash is found; targets are left pristine.

mod common;

use common::*;
use guests::layout::{mailbox, INPUT, MAILBOX};
use guests::{parser_bug_input, ParserBug, Workload, HARNESS_CRASH_INPUT};
use std::time::Duration;
use vmfork::fuzz::{fuzz, replay, Feedback, FuzzConfig, Outcome};
use vmfork::{Vm, VmConfig};

fn entry(workload: Workload) -> Vm {
    let cfg = VmConfig {
        irqchip: false,
        ..config(16)
    };
    let vm = guest_vm(workload, cfg, &[]).0;
    if workload.announces_ready() {
        vm.run_to_ready(Duration::from_secs(10)).unwrap();
    }
    vm
}

fn fuzz_config(workload: Workload, feedback: Feedback, max_execs: u64) -> FuzzConfig {
    let mut c = FuzzConfig::new(INPUT, MAILBOX + mailbox::INPUT_LEN, 64);
    c.max_execs = max_execs;
    c.max_time = Duration::from_secs(120);
    c.seed = 7;
    c.feedback = feedback;
    c.code = Some(workload.code_range());
    c
}

fn replay_parser(vm: &Vm, input: &[u8]) -> Outcome {
    replay(
        vm,
        &fuzz_config(Workload::Parser, Feedback::ExitCode, 1),
        input,
    )
    .unwrap()
}

#[test]
fn the_parser_exits_by_validity_and_each_planted_bug_crashes_its_own_way() {
    let vm = entry(Workload::Parser);
    assert_eq!(
        replay_parser(&vm, b"V\x01A\x02hiB\x01\x05"),
        Outcome::Exit(0)
    );
    assert_eq!(replay_parser(&vm, b"X"), Outcome::Exit(1));
    assert_eq!(replay_parser(&vm, b"V\x01Z\x00"), Outcome::Exit(1));
    let mut seen = Vec::new();
    for (bug, kind) in [
        (ParserBug::LongName, "triple-fault/#PF"),
        (ParserBug::ZeroCount, "triple-fault/#DE"),
        (ParserBug::DeepChunk, "triple-fault/#UD"),
    ] {
        let Outcome::Crash(crash) = replay_parser(&vm, &parser_bug_input(bug)) else {
            panic!("{bug:?} did not crash");
        };
        assert_eq!(crash.kind, kind, "{bug:?}");
        // Deterministic: the same crash again.
        assert_eq!(
            replay_parser(&vm, &parser_bug_input(bug)),
            Outcome::Crash(crash.clone())
        );
        seen.push(crash.rip);
    }
    seen.dedup();
    assert_eq!(seen.len(), 3, "three bugs, three RIPs: {seen:x?}");
}

fn deep_bug_rip(vm: &Vm) -> u64 {
    match replay_parser(vm, &parser_bug_input(ParserBug::DeepChunk)) {
        Outcome::Crash(c) => c.rip,
        other => panic!("{other:?}"),
    }
}

#[test]
fn coverage_finds_the_deepest_bug_where_exit_codes_do_not() {
    let vm = entry(Workload::Parser);
    let deep = deep_bug_rip(&vm);
    const BUDGET: u64 = 100_000;
    let mut cfg = fuzz_config(Workload::Parser, Feedback::Coverage, BUDGET);
    cfg.stop_at_rip = Some(deep);
    let report = fuzz(&vm, &cfg).unwrap();
    let found = report.crash_at(deep);
    assert!(found.is_some(), "coverage missed the deep bug: {report:?}");
    let found = found.unwrap();
    assert!(found.input.windows(4).any(|w| w == b"DEEP"), "{found:?}");
    assert!(report.blocks_hit > 10, "{report:?}");
    assert!(report.blocks_hit <= report.blocks, "{report:?}");
    eprintln!(
        "coverage: deep bug after {} execs ({} blocks of {}, {} reruns)",
        found.first_exec, report.blocks_hit, report.blocks, report.reruns
    );

    let mut blind = fuzz_config(Workload::Parser, Feedback::ExitCode, BUDGET);
    blind.stop_at_rip = Some(deep);
    let report = fuzz(&vm, &blind).unwrap();
    assert!(report.crash_at(deep).is_none(), "{report:?}");
    assert_eq!(report.blocks, 0);
    // The entry VM was never changed: the bug input still crashes it the same way.
    assert_eq!(deep_bug_rip(&vm), deep);
}

#[test]
fn crashes_are_deduplicated_saved_and_replayable_on_two_cores() {
    let vm = entry(Workload::Parser);
    let dir = temp_dir("fuzz-crashes");
    let mut cfg = fuzz_config(Workload::Parser, Feedback::Coverage, 60_000);
    cfg.cores = 2;
    cfg.crashes_dir = Some(dir.join("crashes"));
    cfg.corpus_dir = Some(dir.join("corpus"));
    cfg.replay_command = "vmfork fuzz --target parser --replay {}".into();
    let report = fuzz(&vm, &cfg).unwrap();
    assert!(!report.crashes.is_empty(), "{report:?}");
    let mut signatures: Vec<_> = report.crashes.iter().map(|c| c.crash.clone()).collect();
    signatures.sort();
    signatures.dedup();
    assert_eq!(signatures.len(), report.crashes.len(), "duplicates kept");
    let total: u64 = report.crashes.iter().map(|c| c.count).sum();
    assert!(total >= report.crashes.len() as u64);
    for record in &report.crashes {
        let path = record.saved.as_ref().expect("saved");
        let input = std::fs::read(path).unwrap();
        assert_eq!(input, record.input);
        let text = std::fs::read_to_string(path.with_extension("txt")).unwrap();
        assert!(
            text.contains(&format!("--replay {}", path.display())),
            "{text}"
        );
        assert_eq!(
            replay_parser(&vm, &input),
            Outcome::Crash(record.crash.clone())
        );
    }
    // The corpus is on disk, and a second run starts from it: its seeds alone reach at least
    // as many blocks as the first run had found when it wrote them.
    let files = std::fs::read_dir(dir.join("corpus")).unwrap().count();
    assert_eq!(files, report.corpus_size);
    let mut again = fuzz_config(Workload::Parser, Feedback::Coverage, files as u64);
    again.corpus_dir = Some(dir.join("corpus"));
    let resumed = fuzz(&vm, &again).unwrap();
    assert!(
        resumed.blocks_hit >= report.blocks_hit.saturating_sub(report.crashes.len() * 2),
        "resumed {} blocks, first run {}",
        resumed.blocks_hit,
        report.blocks_hit
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_hung_input_times_out_and_the_run_goes_on() {
    let vm = entry(Workload::Spin);
    let mut cfg = fuzz_config(Workload::Spin, Feedback::ExitCode, 4);
    cfg.timeout = Duration::from_millis(30);
    let dir = temp_dir("fuzz-timeouts");
    cfg.crashes_dir = Some(dir.clone());
    let report = fuzz(&vm, &cfg).unwrap();
    assert_eq!(report.execs, 4);
    assert_eq!(report.timeouts, 4);
    assert!(report.crashes.is_empty());
    // Saved once per place the guest was stopped (its loop is `pause; jmp`): input and text.
    let saved = std::fs::read_dir(&dir).unwrap().count();
    assert!(saved == 2 || saved == 4, "{saved} files");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzzing_the_harness_finds_its_crash_and_leaves_the_entry_untouched() {
    let vm = entry(Workload::Harness);
    let before = ram_hash(&vm);
    let mut cfg = fuzz_config(Workload::Harness, Feedback::ExitCode, 500_000);
    cfg.stop_on_crash = true;
    cfg.max_input = 16;
    let report = fuzz(&vm, &cfg).unwrap();
    assert_eq!(report.crashes.len(), 1, "{report:?}");
    let record = &report.crashes[0];
    assert!(record.input.starts_with(HARNESS_CRASH_INPUT), "{record:?}");
    assert_eq!(record.crash.kind, "triple-fault/#UD");
    for code in 0..HARNESS_CRASH_INPUT.len() as u8 {
        assert!(report.exit_codes.contains_key(&code), "{report:?}");
    }
    assert_eq!(ram_hash(&vm), before);
}

#[test]
fn crash_codes_and_crash_sites_are_crashes() {
    let vm = entry(Workload::Parser);
    // Exit code 1 (malformed) declared a crash code: the first input is a crash.
    let mut cfg = fuzz_config(Workload::Parser, Feedback::ExitCode, 1);
    cfg.crash_codes = vec![1];
    match replay(&vm, &cfg, b"nope").unwrap() {
        Outcome::Crash(c) => assert_eq!(c.kind, "crash-code/1"),
        other => panic!("{other:?}"),
    }
    // The deep bug's ud2 named as a crash site: reaching it is a crash-site crash there.
    let deep = deep_bug_rip(&vm);
    let mut cfg = fuzz_config(Workload::Parser, Feedback::ExitCode, 1);
    cfg.crash_sites = vec![deep];
    match replay(&vm, &cfg, &parser_bug_input(ParserBug::DeepChunk)).unwrap() {
        Outcome::Crash(c) => {
            assert_eq!(c.kind, "crash-site");
            assert_eq!(c.rip, deep);
        }
        other => panic!("{other:?}"),
    }
    // A valid input is not affected by the armed site.
    assert_eq!(replay(&vm, &cfg, b"V\x01").unwrap(), Outcome::Exit(0));
}

#[test]
fn bad_fuzzing_setups_are_refused() {
    let vm = entry(Workload::Parser);
    let mut cfg = fuzz_config(Workload::Parser, Feedback::Coverage, 1);
    cfg.code = None;
    let err = fuzz(&vm, &cfg).unwrap_err().to_string();
    assert!(err.contains("code range"), "{err}");
    let mut cfg = fuzz_config(Workload::Parser, Feedback::Coverage, 1);
    cfg.code = Some((0x10, 0x10));
    assert!(fuzz(&vm, &cfg).is_err());
    let mut cfg = fuzz_config(Workload::Parser, Feedback::ExitCode, 1);
    cfg.cores = 0;
    assert!(fuzz(&vm, &cfg).is_err());
    let cfg = fuzz_config(Workload::Parser, Feedback::ExitCode, 1);
    let err = replay(&vm, &cfg, &[0u8; 65]).unwrap_err().to_string();
    assert!(err.contains("at most 64"), "{err}");
    // A running VM is no entry (spin runs until stopped).
    let running = entry(Workload::Spin);
    running.start().unwrap();
    let err = fuzz(&running, &cfg).unwrap_err().to_string();
    assert!(err.contains("stopped"), "{err}");
    running.stop();
}

/// Everything in a vCPU's state that a reset must bring back (the TSC and other clocks run on).
fn comparable(vm: &Vm) -> (String, u64) {
    let mut state = vm.vcpu_state(0).unwrap();
    // IA32_TSC and the kvmclock MSRs.
    state
        .msrs
        .retain(|m| m.index != 0x10 && m.index != 0x4b56_4d01 && m.index != 0x4b56_4d00);
    (format!("{state:?}"), ram_hash(vm))
}

#[test]
fn the_quick_reset_restores_what_a_full_reset_does_for_a_cpl3_target() {
    let vm = entry(Workload::Parser);
    let opts = vmfork::fuzz::target_fork_options();
    let fresh = vm.fork(&opts).unwrap();
    let expected = comparable(&fresh);
    let target = vm.fork(&opts).unwrap();
    let inputs: [&[u8]; 4] = [b"V\x01A\x02hiB\x01\x05", b"X", b"V\x03A\x01xC\x04DEEX", b""];
    for round in 0..3 {
        for input in inputs {
            target.ram().write(INPUT, input).unwrap();
            target
                .ram()
                .write_u64(MAILBOX + mailbox::INPUT_LEN, input.len() as u64)
                .unwrap();
            let exit = target.run_inline().unwrap();
            assert!(matches!(exit, vmfork::ExitReason::GuestExit(_)), "{exit:?}");
            let stats = target.reset_quick().unwrap();
            assert!(stats.quick, "a CPL3 parser at its ready point is confined");
            assert!(stats.pages_restored >= 1, "the input page at least");
            assert_eq!(
                comparable(&target),
                expected,
                "round {round} input {input:?}"
            );
        }
    }
    // A fork at the boot entry (ring 0) is not confined: the quick reset is the full one.
    let boot = guest_vm(
        Workload::Parser,
        VmConfig {
            irqchip: false,
            ..config(16)
        },
        &[],
    )
    .0;
    let at_boot = boot.fork(&opts).unwrap();
    assert_eq!(
        at_boot.run_inline().unwrap(),
        vmfork::ExitReason::GuestExit(1)
    );
    assert!(!at_boot.reset_quick().unwrap().quick);
}
