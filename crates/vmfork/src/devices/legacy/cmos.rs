//! The CMOS real-time clock and NVRAM at ports 0x70/0x71 (an MC146818, as Linux's `rtc_cmos`
//! and early time setup read it): the clock registers show the host's UTC, in BCD and 24-hour
//! mode unless the guest sets status register B otherwise; the other registers are 128 bytes of
//! NVRAM that persist through forks, snapshots and resets. Writes to the clock registers are
//! kept as NVRAM but do not move the clock (as Cloud Hypervisor's CMOS does).

use super::super::{lock, Persist};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// The index port; the data port is one above.
pub const CMOS_BASE: u16 = 0x70;
pub(crate) const CMOS_LEN: u16 = 2;
const NVRAM_BYTES: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Status B: binary (not BCD) values; 24-hour mode.
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;
/// Status A at power-on: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const A_POWER_ON: u8 = 0x26;
/// Status D: the RAM and time are valid.
const D_VALID: u8 = 0x80;

/// The CMOS as forks and snapshots carry it: the selected register and the NVRAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosRegisters {
    pub index: u8,
    pub nvram: Vec<u8>,
}

impl Default for CmosRegisters {
    fn default() -> Self {
        let mut nvram = vec![0; NVRAM_BYTES];
        nvram[STATUS_A as usize] = A_POWER_ON;
        nvram[STATUS_B as usize] = B_24H;
        nvram[STATUS_D as usize] = D_VALID;
        Self { index: 0, nvram }
    }
}

/// The CMOS on the port bus.
pub struct Cmos(Mutex<CmosRegisters>);

impl Cmos {
    /// In `state` (the power-on state is [`CmosRegisters::default`]).
    pub fn power_on(state: CmosRegisters) -> Self {
        Self(Mutex::new(state))
    }

    /// Loaded from saved state, checked.
    pub fn new(state: CmosRegisters) -> crate::Result<Self> {
        check(&state)?;
        Ok(Self(Mutex::new(state)))
    }
}

fn check(state: &CmosRegisters) -> crate::Result<()> {
    if state.nvram.len() != NVRAM_BYTES || usize::from(state.index) >= NVRAM_BYTES {
        return Err(crate::devices::DeviceError::state(format!(
            "CMOS state has {} NVRAM bytes and register {:#x} selected (128 bytes, 0-0x7f)",
            state.nvram.len(),
            state.index
        )));
    }
    Ok(())
}

/// (year, month 1-12, day 1-31, weekday 1-7 with Sunday 1, hour, minute, second) of `secs`
/// since the Unix epoch, UTC (the civil-from-days algorithm).
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u64;
    // 1970-01-01 was a Thursday (weekday 5 counting Sunday as 1).
    let weekday = (days + 4) % 7 + 1;
    (
        year,
        month,
        day,
        weekday,
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
    )
}

impl CmosRegisters {
    fn clock_register(&self, reg: u8, now: u64) -> Option<u8> {
        let (year, month, day, weekday, hour, minute, second) = civil(now);
        let b = self.nvram[STATUS_B as usize];
        let value = match reg {
            SECONDS => second,
            MINUTES => minute,
            HOURS if b & B_24H == 0 => {
                // 12-hour mode: 1-12, bit 7 for PM (applied after BCD).
                let h = hour % 12;
                let shown = if h == 0 { 12 } else { h };
                let encoded = if b & B_BINARY == 0 {
                    bcd(shown)
                } else {
                    shown as u8
                };
                return Some(encoded | if hour >= 12 { 0x80 } else { 0 });
            }
            HOURS => hour,
            WEEKDAY => weekday,
            DAY => day,
            MONTH => month,
            YEAR => year % 100,
            CENTURY => year / 100,
            _ => return None,
        };
        Some(if b & B_BINARY == 0 {
            bcd(value)
        } else {
            value as u8
        })
    }

    fn read(&self, now: u64) -> u8 {
        let reg = self.index;
        match reg {
            // Never in an update: a reader need not wait.
            STATUS_A => self.nvram[STATUS_A as usize] & 0x7f,
            // No interrupts are raised, so none are pending.
            STATUS_C => 0,
            STATUS_D => D_VALID,
            _ => self
                .clock_register(reg, now)
                .unwrap_or(self.nvram[usize::from(reg)]),
        }
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Persist for Cmos {
    type State = CmosRegisters;

    fn save(&self) -> CmosRegisters {
        lock(&self.0).clone()
    }

    fn load(&self, state: &CmosRegisters) -> crate::Result<()> {
        check(state)?;
        *lock(&self.0) = state.clone();
        Ok(())
    }
}

impl DevicePio for Cmos {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let regs = lock(&self.0);
        let value = match offset {
            0 => regs.index,
            _ => regs.read(host_now()),
        };
        data.fill(value);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        let mut regs = lock(&self.0);
        match offset {
            // Bit 7 of the index masks NMIs on a PC; there is nothing to mask here.
            0 => regs.index = byte & 0x7f,
            _ => {
                let reg = usize::from(regs.index);
                if reg != STATUS_C as usize && reg != STATUS_D as usize {
                    regs.nvram[reg] = byte;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_come_out_as_the_calendar_has_them() {
        assert_eq!(civil(0), (1970, 1, 1, 5, 0, 0, 0));
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(civil(951_827_696), (2000, 2, 29, 3, 12, 34, 56));
        // 2026-11-30 23:59:59 UTC, a Monday.
        assert_eq!(civil(1_796_083_199), (2026, 11, 30, 2, 23, 59, 59));
    }

    #[test]
    fn the_clock_reads_in_bcd_or_binary_and_nvram_keeps_what_is_written() {
        let regs = CmosRegisters::default();
        let now = 1_796_083_199; // 2026-11-30 23:59:59
        let at = |regs: &CmosRegisters, reg: u8| {
            let mut r = regs.clone();
            r.index = reg;
            r.read(now)
        };
        assert_eq!(at(&regs, SECONDS), 0x59);
        assert_eq!(at(&regs, HOURS), 0x23);
        assert_eq!(at(&regs, YEAR), 0x26);
        assert_eq!(at(&regs, CENTURY), 0x20);
        assert_eq!(at(&regs, MONTH), 0x11);
        let mut binary = regs.clone();
        binary.nvram[STATUS_B as usize] = B_24H | B_BINARY;
        assert_eq!(at(&binary, SECONDS), 59);
        assert_eq!(at(&binary, DAY), 30);
        let mut twelve = regs.clone();
        twelve.nvram[STATUS_B as usize] = 0;
        assert_eq!(at(&twelve, HOURS), 0x80 | 0x11, "11 PM");
        assert_eq!(at(&regs, STATUS_D), D_VALID);
        let cmos = Cmos::new(regs).unwrap();
        cmos.pio_write(PioAddress(CMOS_BASE), 0, &[0x80 | 0x40]);
        cmos.pio_write(PioAddress(CMOS_BASE), 1, &[0xab]);
        let mut byte = [0];
        cmos.pio_read(PioAddress(CMOS_BASE), 1, &mut byte);
        assert_eq!(byte, [0xab]);
        let saved = cmos.save();
        assert_eq!((saved.index, saved.nvram[0x40]), (0x40, 0xab));
        let mut bad = saved.clone();
        bad.nvram.truncate(10);
        assert!(cmos.load(&bad).is_err());
        assert!(Cmos::new(bad).is_err());
    }
}
