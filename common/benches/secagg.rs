//! What secure aggregation (`fedflow_common::secagg`, SecAgg+) costs, in one process with
//! real keys and signatures: per phase, the CPU time of one site (mean over the sites) and
//! of the coordinator, and the bytes each message carries, at several federation sizes,
//! with a share of the sites dropping after they sent their shares (so the coordinator
//! also rebuilds pairwise secrets).
//!
//! Bytes are the messages' payloads (names, keys, signatures, ciphertexts, masked values
//! packed at the ring's width), totalled over the sites and, for "down", over what every
//! recipient is sent; protobuf framing adds a few bytes per field.
//!
//! Run: `cargo bench -p fedflow-common --bench secagg -- [--sites 10,100,1000]
//! [--dimension 73000] [--bits 32] [--drop 0.05]`. Prints one JSON line per federation
//! size, then a table. No network is involved: what a round adds on the wire is the bytes
//! column plus four round trips (advertise, share, confirm, unmask) besides the upload.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use fedflow_common::secagg::{
    Advertisement, Aggregator, Context, EcdsaSigner, EcdsaVerifier, Params, SiteSession,
};

struct Args {
    sites: Vec<usize>,
    dimension: usize,
    bits: u32,
    drop: f64,
}

fn args() -> Args {
    let mut a = Args {
        sites: vec![10, 100, 1000],
        dimension: 73_000,
        bits: 32,
        drop: 0.05,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--sites" => {
                a.sites = value()
                    .split(',')
                    .map(|s| s.parse().expect("--sites: a list of counts"))
                    .collect()
            }
            "--dimension" => a.dimension = value().parse().expect("--dimension: a count"),
            "--bits" => a.bits = value().parse().expect("--bits: 1 to 64"),
            "--drop" => a.drop = value().parse().expect("--drop: a fraction"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// SecAgg+'s logarithmic degree (Bell et al. 2020 use k = O(log n)): about 3·log2(n), even,
/// or the complete graph for small federations.
fn degree(n: usize) -> usize {
    let k = (3.0 * (n as f64).log2()).ceil() as usize;
    let k = k + k % 2;
    if k >= n - 1 { 0 } else { k }
}

#[derive(Default)]
struct Phase {
    site: Duration,
    sites: usize,
    coordinator: Duration,
    bytes_up: usize,
    bytes_down: usize,
}

impl Phase {
    fn site_ms(&self) -> f64 {
        self.site.as_secs_f64() * 1e3 / self.sites.max(1) as f64
    }
}

/// An advertisement's bytes on the wire (name, three 32-byte keys, the signature).
fn ad_bytes(ad: &Advertisement) -> usize {
    ad.site.len() + 96 + ad.signature.len()
}

fn time<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *total += t.elapsed();
    out
}

fn run(n: usize, a: &Args) -> BTreeMap<&'static str, Phase> {
    let params = Params {
        modulus_bits: a.bits,
        dimension: a.dimension,
        degree: degree(n),
        threshold: 0.6,
        min_sites: 3,
    };
    let ctx = Context {
        run_id: "bench".into(),
        round: 1,
        nonce: [7; 32],
    };
    let value_bytes = (a.bits as usize).div_ceil(8);
    let mut ph: BTreeMap<&'static str, Phase> = BTreeMap::new();
    let mut verifier = EcdsaVerifier::default();
    let signers: Vec<(String, EcdsaSigner)> = (0..n)
        .map(|i| {
            let name = format!("site-{i:04}");
            let (s, _) = EcdsaSigner::generate().unwrap();
            verifier.insert(name.clone(), s.public_key());
            (name, s)
        })
        .collect();
    let mut agg = Aggregator::new(ctx.clone(), params, Box::new(verifier.clone())).unwrap();

    let p = ph.entry("0 advertise").or_default();
    let mut sessions = Vec::new();
    for (name, signer) in signers {
        let (s, ad) = time(&mut p.site, || {
            SiteSession::new(ctx.clone(), params, name, Box::new(signer)).unwrap()
        });
        p.bytes_up += ad_bytes(&ad);
        time(&mut p.coordinator, || agg.advertise(ad).unwrap());
        sessions.push(s);
    }
    p.sites = n;
    let roster = time(&mut p.coordinator, || agg.roster().unwrap());
    p.bytes_down = roster.advertisements.iter().map(ad_bytes).sum::<usize>() * n;

    let p = ph.entry("1 share").or_default();
    let mut shared = Vec::new();
    // The sites' own work runs on all cores (each site's time is still its own); the
    // coordinator's, in order on one.
    let done: Vec<_> = sessions
        .into_par_iter()
        .map(|s| {
            let t = Instant::now();
            let out = s.share(&roster, &verifier).unwrap();
            (out, t.elapsed())
        })
        .collect();
    for (i, ((s, envelopes), took)) in done.into_iter().enumerate() {
        p.site += took;
        p.bytes_up += envelopes
            .iter()
            .map(|e| e.ciphertext.len() + e.from.len() + e.to.len())
            .sum::<usize>();
        let name = format!("site-{i:04}");
        time(&mut p.coordinator, || agg.share(&name, envelopes).unwrap());
        shared.push((name, s));
    }
    p.sites = n;

    let dropped = (n as f64 * a.drop).round() as usize;
    let input: Vec<u64> = (0..a.dimension as u64).map(|v| v % 1000).collect();
    let mut mailbox_bytes = 0;
    let p = ph.entry("2 mask").or_default();
    let mut masked = Vec::new();
    for (k, (name, s)) in shared.into_iter().enumerate() {
        let mail = time(&mut p.coordinator, || agg.mailbox(&name).unwrap());
        mailbox_bytes += mail.iter().map(|e| e.ciphertext.len()).sum::<usize>();
        let (s, m) = time(&mut p.site, || s.mask(&mail, &input).unwrap());
        p.sites += 1;
        if k < dropped {
            continue;
        }
        p.bytes_up += m.values.len() * value_bytes;
        time(&mut p.coordinator, || agg.masked_input(m).unwrap());
        masked.push(s);
    }
    ph.get_mut("1 share").unwrap().bytes_down = mailbox_bytes;

    let p = ph.entry("3 confirm").or_default();
    let survivors = time(&mut p.coordinator, || agg.survivors().unwrap());
    p.bytes_down = survivors.iter().map(|s| s.len()).sum::<usize>() * masked.len();
    let mut confirmed = Vec::new();
    for s in masked {
        let (s, sig) = time(&mut p.site, || s.confirm(&survivors).unwrap());
        p.bytes_up += sig.signature.len() + sig.site.len();
        time(&mut p.coordinator, || agg.confirm(sig).unwrap());
        confirmed.push(s);
        p.sites += 1;
    }

    let p = ph.entry("4 unmask").or_default();
    let sigs = agg.signatures();
    p.bytes_down = sigs
        .iter()
        .map(|s| s.site.len() + s.signature.len())
        .sum::<usize>()
        * confirmed.len();
    let done: Vec<_> = confirmed
        .into_par_iter()
        .map(|s| {
            let t = Instant::now();
            let u = s.unmask(&sigs, &verifier).unwrap();
            (u, t.elapsed())
        })
        .collect();
    for (u, took) in done {
        p.site += took;
        p.bytes_up += u.shares.len() * 32;
        time(&mut p.coordinator, || agg.unmasking(u).unwrap());
        p.sites += 1;
    }
    let sum = time(&mut p.coordinator, || agg.finish().unwrap());
    let survivors = (n - dropped) as u64;
    assert!(
        sum.iter()
            .enumerate()
            .all(|(i, &v)| v == (i as u64 % 1000) * survivors),
        "the unmasked sum is the plain sum"
    );
    ph
}

fn main() {
    let a = args();
    println!(
        "# secagg: dimension {}, {}-bit ring, {:.0}% of sites drop after sharing",
        a.dimension,
        a.bits,
        a.drop * 100.0
    );
    let mut table = Vec::new();
    for &n in &a.sites {
        let t = Instant::now();
        let ph = run(n, &a);
        let wall = t.elapsed().as_secs_f64();
        let site_ms: f64 = ph.values().map(Phase::site_ms).sum();
        let coord_s: f64 = ph.values().map(|p| p.coordinator.as_secs_f64()).sum();
        let up: usize = ph.values().map(|p| p.bytes_up).sum();
        let phases: Vec<String> = ph
            .iter()
            .map(|(name, p)| {
                format!(
                    "{{\"phase\":\"{name}\",\"site_ms\":{:.3},\"coordinator_ms\":{:.1},\"bytes_up\":{},\"bytes_down\":{}}}",
                    p.site_ms(),
                    p.coordinator.as_secs_f64() * 1e3,
                    p.bytes_up,
                    p.bytes_down
                )
            })
            .collect();
        println!(
            "{{\"sites\":{n},\"degree\":{},\"dimension\":{},\"bits\":{},\"site_cpu_ms\":{site_ms:.1},\"coordinator_cpu_s\":{coord_s:.2},\"bytes_up_per_site\":{},\"wall_s\":{wall:.1},\"phases\":[{}]}}",
            degree(n),
            a.dimension,
            a.bits,
            up / n,
            phases.join(",")
        );
        let extra_up = (up - ph["2 mask"].bytes_up) / n;
        table.push(format!(
            "| {n} | {} | {site_ms:.1} | {coord_s:.2} | {} | {extra_up} |",
            if degree(n) == 0 {
                "complete".to_string()
            } else {
                degree(n).to_string()
            },
            up / n
        ));
    }
    println!(
        "| sites | degree | site CPU (ms) | coordinator CPU (s) | bytes up per site | of which not the masked input |"
    );
    println!("|---|---|---|---|---|---|");
    for row in table {
        println!("{row}");
    }
}
