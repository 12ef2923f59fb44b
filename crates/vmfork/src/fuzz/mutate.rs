//! The built-in mutator: a havoc stack of byte-level mutations, splicing, and the comparison
//! constants found in the target's code. (The `vmfork-libafl` crate lets LibAFL's mutators and
//! schedulers drive vmfork instead.)

/// xorshift64*: small, fast, deterministic; fuzzing needs no cryptographic quality.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Spread small seeds over the state; never zero.
        Self((seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u8; 9] = [0, 1, 0x10, 0x20, 0x21, 0x40, 0x7f, 0x80, 0xff];

/// Returns a mutation of `input` (at most `max` bytes): 1 to 3 stacked mutations, some taking
/// from `tokens` (comparison constants) or `other` (another corpus entry, for splicing).
pub fn mutate(
    rng: &mut Rng,
    input: &[u8],
    other: &[u8],
    tokens: &[Vec<u8>],
    max: usize,
) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(2) + rng.below(2);
    for _ in 0..rounds {
        mutate_once(rng, &mut out, other, tokens, max);
    }
    out.truncate(max);
    out
}

fn mutate_once(rng: &mut Rng, out: &mut Vec<u8>, other: &[u8], tokens: &[Vec<u8>], max: usize) {
    let len = out.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = rng.below(len);
            out[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            out[i] = rng.next_u64() as u8;
        }
        2 if len > 0 => {
            let i = rng.below(len);
            out[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        3 if len > 0 => {
            let i = rng.below(len);
            out[i] = out[i].wrapping_add(if rng.below(2) == 0 { 1 } else { 0xff });
        }
        4 if !tokens.is_empty() && len > 0 => {
            // Overwrite with a comparison constant.
            let token = &tokens[rng.below(tokens.len())];
            let at = rng.below(len);
            for (k, &b) in token.iter().enumerate() {
                if let Some(slot) = out.get_mut(at + k) {
                    *slot = b;
                }
            }
        }
        5 if !tokens.is_empty() && len < max => {
            // Insert a comparison constant.
            let token = &tokens[rng.below(tokens.len())];
            let at = rng.below(len + 1);
            out.splice(at..at, token.iter().copied());
        }
        6 if len > 1 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(8));
            out.drain(at..at + n);
        }
        7 if len > 0 && len < max => {
            // Duplicate a chunk (grows lengths and repeated records).
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(16));
            let chunk: Vec<u8> = out[at..at + n].to_vec();
            let to = rng.below(len + 1);
            out.splice(to..to, chunk);
        }
        8 if !other.is_empty() => {
            // Splice: our head, the other input's tail.
            let cut = rng.below(len + 1);
            let from = rng.below(other.len());
            out.truncate(cut);
            out.extend_from_slice(&other[from..]);
        }
        _ if len < max => {
            let at = rng.below(len + 1);
            let byte = rng.next_u64() as u8;
            out.insert(at, byte);
        }
        _ => out.truncate(rng.below(max.max(1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_the_limit_and_are_reproducible() {
        let tokens = vec![b"DEEP".to_vec(), vec![0x56]];
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        let mut input = b"seed".to_vec();
        for _ in 0..10_000 {
            let x = mutate(&mut a, &input, b"other", &tokens, 32);
            let y = mutate(&mut b, &input, b"other", &tokens, 32);
            assert_eq!(x, y);
            assert!(x.len() <= 32);
            input = x;
        }
    }
}
