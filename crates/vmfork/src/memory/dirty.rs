//! A bitmap of dirty pages over a VM's RAM file, fed by KVM's dirty log (guest writes) and by
//! vm-memory's bitmap (the VMM's own writes).

use super::{RamRegion, PAGE_SIZE};

/// One bit per 4 KiB page of the RAM file.
#[derive(Clone, Debug, Default)]
pub struct DirtyPages {
    words: Vec<u64>,
}

impl DirtyPages {
    pub fn new(ram_bytes: u64) -> Self {
        let pages = ram_bytes.div_ceil(PAGE_SIZE) as usize;
        Self {
            words: vec![0; pages.div_ceil(64)],
        }
    }

    /// Adds a per-region bitmap (bit i = page i of `region`), as KVM_GET_DIRTY_LOG returns it.
    pub fn add_region_bitmap(&mut self, region: &RamRegion, bitmap: &[u64]) {
        let first_page = (region.file_offset / PAGE_SIZE) as usize;
        if first_page.is_multiple_of(64) {
            let base = first_page / 64;
            for (i, &word) in bitmap.iter().enumerate() {
                if word != 0 {
                    if let Some(w) = self.words.get_mut(base + i) {
                        *w |= word;
                    }
                }
            }
        } else {
            for (i, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as usize;
                    self.mark(first_page + i * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
    }

    pub fn is_set(&self, page: usize) -> bool {
        self.words
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    pub fn mark(&mut self, page: usize) {
        if let Some(w) = self.words.get_mut(page / 64) {
            *w |= 1 << (page % 64);
        }
    }

    /// File offsets of the dirty pages, in order.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some((i as u64 * 64 + bit) * PAGE_SIZE)
            })
        })
    }

    /// Runs of consecutive dirty pages, ascending: `(first file offset, page count)`. Scans a
    /// word at a time, so a full 1 GiB bitmap takes microseconds.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut open: Option<(u64, u64)> = None;
        for (i, &word) in self.words.iter().enumerate() {
            let base = i as u64 * 64;
            if word == u64::MAX {
                open = Some(match open {
                    Some((start, n)) => (start, n + 64),
                    None => (base, 64),
                });
                continue;
            }
            let mut bits = word;
            let mut at = 0u64;
            while at < 64 {
                if bits & 1 == 0 {
                    if let Some(run) = open.take() {
                        runs.push(run);
                    }
                    let zeros = if bits == 0 {
                        64 - at
                    } else {
                        bits.trailing_zeros() as u64
                    };
                    at += zeros;
                    bits = bits.checked_shr(zeros as u32).unwrap_or(0);
                } else {
                    let ones = (!bits).trailing_zeros() as u64;
                    open = Some(match open {
                        Some((start, n)) => (start, n + ones),
                        None => (base + at, ones),
                    });
                    at += ones;
                    bits = bits.checked_shr(ones as u32).unwrap_or(0);
                }
            }
        }
        runs.extend(open);
        runs.into_iter()
            .map(|(page, n)| (page * PAGE_SIZE, n))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Adds every page of `other` (of the same RAM size).
    pub fn union(&mut self, other: &DirtyPages) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    /// Takes the pages in `[offset, offset+len)` (file offsets) out into a bitmap of their own.
    pub fn take_range(&mut self, offset: u64, len: u64) -> DirtyPages {
        let mut taken = DirtyPages {
            words: vec![0; self.words.len()],
        };
        let first = (offset / PAGE_SIZE) as usize;
        let end = ((offset + len) / PAGE_SIZE) as usize;
        for page in first..end {
            if self.is_set(page) {
                taken.mark(page);
                if let Some(w) = self.words.get_mut(page / 64) {
                    *w &= !(1 << (page % 64));
                }
            }
        }
        taken
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_bitmaps_land_at_file_offsets() {
        let mut d = DirtyPages::new(8 << 20);
        let low = RamRegion {
            guest_addr: 0,
            size: 4 << 20,
            file_offset: 0,
        };
        let high = RamRegion {
            guest_addr: 4 << 30,
            size: 4 << 20,
            file_offset: 4 << 20,
        };
        d.add_region_bitmap(&low, &[0b101]);
        d.add_region_bitmap(&high, &[1 << 63]);
        let offsets: Vec<u64> = d.offsets().collect();
        assert_eq!(offsets, vec![0, 2 * 4096, (4 << 20) + 63 * 4096]);
        assert_eq!(d.count(), 3);
        let odd = RamRegion {
            guest_addr: 0,
            size: 4096 * 10,
            file_offset: 4096 * 3,
        };
        let mut r = DirtyPages::new(1 << 30);
        for p in [0usize, 1, 2, 63, 64, 65, 200, 128 * 64, 128 * 64 + 1] {
            r.mark(p);
        }
        for p in 300..300 + 64 * 3 {
            r.mark(p);
        }
        let expect = crate::memory::page_runs(r.offsets());
        assert_eq!(r.runs(), expect);
        d.clear();
        d.add_region_bitmap(&odd, &[0b11]);
        assert_eq!(d.offsets().collect::<Vec<_>>(), vec![3 * 4096, 4 * 4096]);
    }
}
