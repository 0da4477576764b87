//! A seeded mutation loop for fuzz entry points, so each parser's fuzz target also runs on
//! every test run without a nightly toolchain: byte flips, interesting values, truncation and
//! extension of a valid seed, deterministic from the seed's length. Test support only; it does
//! no I/O and allocates only the mutated copies.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Feed `target` the seed, the empty input, and `rounds` mutations of the seed.
pub fn mutate(seed: &[u8], rounds: usize, target: fn(&[u8])) {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.len() as u64);
    target(seed);
    target(&[]);
    for _ in 0..rounds {
        let mut d = seed.to_vec();
        for _ in 0..1 + r.below(8) {
            if d.is_empty() {
                d.push(0);
            }
            let i = r.below(d.len());
            match r.below(6) {
                0 => d[i] ^= 1 << r.below(8),
                1 => d[i] = [0, 1, 0x7f, 0x80, 0xff][r.below(5)],
                2 => {
                    let v = [0u64, 1, u64::MAX, 1 << 63, 0xfff, 1 << 40][r.below(6)];
                    let end = (i + 8).min(d.len());
                    d[i..end].copy_from_slice(&v.to_be_bytes()[..end - i]);
                }
                3 => d.truncate(i),
                4 => d.extend((0..r.below(64)).map(|_| r.next() as u8)),
                _ => d[i] = r.next() as u8,
            }
        }
        target(&d);
    }
}
