//! Guest time on load: kvmclock keeps the distance to the TSC it had when it was saved.
//!
//! A restore loads each vCPU's TSC and then kvmclock. Linux reads both and assumes they move
//! together: kvmclock is `system_time + (TSC - tsc_timestamp) × scale`, computed from a page the
//! guest saved with its RAM, and Linux uses the TSC directly as its clocksource and for its
//! TSC-deadline timer. On bare-metal KVM the TSC load takes effect and the two agree. A host
//! whose KVM cannot offset the guest's TSC (this development host's paravirtual KVM keeps the
//! host's TSC, whatever is written) leaves the TSC running on across the snapshot's age while
//! kvmclock goes back to the saved instant: the guest's clock then steps back by that age as soon
//! as KVM rewrites the kvmclock page, and a Linux guest restored minutes after its snapshot was
//! taken stalls. So the kvmclock to load is the saved one moved by however far the vCPU's TSC
//! really is from the saved TSC after the load: nothing on bare metal (microseconds), the
//! snapshot's age where the TSC cannot be set.

/// The time-stamp counter MSR.
pub(crate) const IA32_TSC: u32 = 0x10;

/// The kvmclock (ns) to load, given the saved kvmclock and TSC, the TSC the vCPU has after its
/// state was loaded, and the TSC's frequency.
pub(crate) fn clock_following_tsc(
    saved_ns: u64,
    saved_tsc: u64,
    tsc_now: u64,
    tsc_khz: u32,
) -> u64 {
    if tsc_khz == 0 {
        return saved_ns;
    }
    // Cycles to ns in 128 bits: a TSC difference of years still fits.
    let to_ns = |cycles: u64| -> u64 {
        let ns = u128::from(cycles) * 1_000_000 / u128::from(tsc_khz);
        u64::try_from(ns).unwrap_or(u64::MAX)
    };
    if tsc_now >= saved_tsc {
        saved_ns.saturating_add(to_ns(tsc_now - saved_tsc))
    } else {
        saved_ns.saturating_sub(to_ns(saved_tsc - tsc_now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvmclock_moves_with_the_tsc() {
        // 2 GHz: 2,000,000 cycles per ms.
        assert_eq!(clock_following_tsc(5_000, 1_000, 1_000, 2_000_000), 5_000);
        assert_eq!(
            clock_following_tsc(5_000, 1_000, 1_000 + 2_000_000_000, 2_000_000),
            5_000 + 1_000_000_000
        );
        assert_eq!(
            clock_following_tsc(5_000_000, 4_000_000, 2_000_000, 2_000_000),
            4_000_000
        );
        assert_eq!(clock_following_tsc(5, 4_000_000, 0, 2_000_000), 0);
        assert_eq!(clock_following_tsc(7, 0, u64::MAX, 1), u64::MAX);
        assert_eq!(clock_following_tsc(7, 0, 1 << 40, 0), 7);
    }
}
