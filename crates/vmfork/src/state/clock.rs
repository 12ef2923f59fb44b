//! Guest time on load: how far the TSC a loaded vCPU really has is from the one saved.
//!
//! A restore (like a fork and a reset) loads each vCPU's TSC, then kvmclock, at their saved
//! values: the guest does not see the time the snapshot spent on disk. Bare-metal KVM applies
//! the TSC load. A host whose KVM cannot offset a guest's TSC (this development host's
//! paravirtual KVM keeps the host's TSC, whatever is written) leaves the guest's TSC ahead by the
//! snapshot's age, while kvmclock is back at the saved instant; a Linux guest that took the TSC
//! as its clocksource then sees its time jump by that age, and a kernel with a periodic tick
//! replays every missed tick in its timer interrupt (minutes of ticks at emulated ring-0 speed:
//! a restored VM that never catches up). A guest on kvm-clock (`clocksource=kvm-clock`) does
//! not jump. vmfork cannot fix the TSC on such a host; it measures the jump so it can say so.

/// The time-stamp counter MSR.
pub(crate) const IA32_TSC: u32 = 0x10;

/// How far (ns) a TSC of `tsc_now` is ahead of `saved_tsc` (negative: behind), at `tsc_khz`.
pub(crate) fn tsc_jump_ns(saved_tsc: u64, tsc_now: u64, tsc_khz: u32) -> i64 {
    if tsc_khz == 0 {
        return 0;
    }
    let cycles = i128::from(tsc_now) - i128::from(saved_tsc);
    let ns = cycles * 1_000_000 / i128::from(tsc_khz);
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_differences_in_ns() {
        // 2 GHz: 2,000,000 cycles per ms.
        assert_eq!(tsc_jump_ns(1_000, 1_000, 2_000_000), 0);
        assert_eq!(
            tsc_jump_ns(1_000, 1_000 + 2_000_000_000, 2_000_000),
            1_000_000_000
        );
        assert_eq!(tsc_jump_ns(4_000_000, 2_000_000, 2_000_000), -1_000_000);
        assert_eq!(tsc_jump_ns(0, u64::MAX, 1), i64::MAX);
        assert_eq!(tsc_jump_ns(u64::MAX, 0, 1), i64::MIN);
        assert_eq!(tsc_jump_ns(0, 1 << 40, 0), 0);
    }
}
