//! Throughput of the content-hash options for large transfers, on this CPU: SHA-256 over the
//! whole stream (what the model identity is today; `sha2` picks SHA extensions at run time
//! where the CPU has them), SHA-256 over 1 MiB chunk digests computed in parallel (a tree
//! hash), and BLAKE3 on one thread and on all (its SIMD picked at run time).
//!
//! ```sh
//! cargo bench -p fedflow-proto --bench hash -- --mb 256
//! # the portable paths (a CPU without SHA extensions or SIMD):
//! cargo bench -p fedflow-proto --bench hash --features soft-hash-bench -- --mb 256
//! ```

use std::time::Instant;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;

fn best_of<F: FnMut() -> [u8; 32]>(runs: usize, mut f: F) -> (f64, [u8; 32]) {
    let mut best = f64::INFINITY;
    let mut out = [0u8; 32];
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, out)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args
        .iter()
        .position(|a| a == "--mb")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    // Deterministic, incompressible-looking bytes.
    let mut data = vec![0u8; mb << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let threads = rayon::current_num_threads();
    let rate = |s: f64| (mb as f64) * 1.048_576 / s;
    let (t, _) = best_of(3, || Sha256::digest(&data).into());
    println!("sha256 stream:               {:>8.0} MB/s", rate(t));
    let (t, _) = best_of(3, || {
        let digests: Vec<[u8; 32]> = data
            .par_chunks(CHUNK)
            .map(|c| Sha256::digest(c).into())
            .collect();
        let mut h = Sha256::new();
        for d in &digests {
            h.update(d);
        }
        h.finalize().into()
    });
    println!(
        "sha256 of 1 MiB digests ({threads} thr): {:>8.0} MB/s",
        rate(t)
    );
    let (t, _) = best_of(3, || *blake3::hash(&data).as_bytes());
    println!("blake3, one thread:          {:>8.0} MB/s", rate(t));
    let (t, _) = best_of(3, || {
        *blake3::Hasher::new()
            .update_rayon(&data)
            .finalize()
            .as_bytes()
    });
    println!("blake3, {threads} threads:          {:>8.0} MB/s", rate(t));
}
