//! Training throughput of the attention-flow model: sessions per second for full training
//! steps (forward, backward, AdamW update) at fixed sequence lengths.
//!
//! Run: `cargo bench -p fedflow-common --bench throughput` (optionally with
//! `-- --batch 32,64,256 --seq 20,100 --steps 30 --encoder lstm --reference --dp --device cuda:0`;
//! a GPU needs `--features cuda`, see `bench/cuda/build.sh`). Prints one JSON
//! line per setting; `bench/pytorch_throughput.py` prints the same for PyTorch. `--dp` runs
//! DP-SGD instead (Poisson batches of expected size `--batch`, one backward per session,
//! clipping, noise), over the same data.

use std::time::Instant;

use std::str::FromStr;

use candle_core::Device;
use fedflow_common::data::EncodedSession;
use fedflow_common::device::DeviceChoice;
use fedflow_common::model::{AttentionFlowModel, Batch, EncoderKind, Mode, ModelConfig};
use fedflow_common::train::{
    DpSgdConfig, OptimizerKind, TrainConfig, privacy_units, train, train_dp,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    batches: Vec<usize>,
    seqs: Vec<usize>,
    steps: usize,
    encoder: EncoderKind,
    reference: bool,
    dp: bool,
    device: DeviceChoice,
}

fn list(v: &str, flag: &str) -> Vec<usize> {
    v.split(',')
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{flag} N[,N]")))
        .collect()
}

fn parse_args() -> Args {
    let mut a = Args {
        batches: vec![64],
        seqs: vec![20, 100],
        steps: 30,
        encoder: EncoderKind::Lstm,
        reference: false,
        dp: false,
        device: DeviceChoice::Cpu,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--batch" => a.batches = list(&val(), "--batch"),
            "--device" => a.device = DeviceChoice::from_str(&val()).expect("--device"),
            "--seq" => a.seqs = list(&val(), "--seq"),
            "--steps" => a.steps = val().parse().expect("--steps N"),
            "--encoder" => a.encoder = val().parse().expect("--encoder lstm|gru|transformer"),
            "--reference" => a.reference = true,
            "--dp" => a.dp = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn main() {
    let args = parse_args();
    let device = args.device.open().expect("--device");
    for &seq in &args.seqs {
        for &batch in &args.batches {
            run(&args, &device, seq, batch);
        }
    }
}

fn run(args: &Args, device: &Device, seq: usize, batch_size: usize) {
    let cfg = ModelConfig {
        encoder: args.encoder,
        max_seq_len: seq,
        ..ModelConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let data: Vec<EncodedSession> = (0..batch_size * args.steps)
        .map(|_| EncodedSession {
            events: (0..seq)
                .map(|_| rng.random_range(2..cfg.vocab_size as u32))
                .collect(),
            class: rng.random_range(0..5),
        })
        .collect();
    let mut model = AttentionFlowModel::new(&cfg, device, 0).expect("model");
    model.set_fused(!args.reference);
    // Warm-up: one short pass so allocator and thread pool (or the GPU's kernels) are hot.
    let warm: Vec<&EncodedSession> = data.iter().take(batch_size).collect();
    let batch = Batch::new(&warm, &cfg, device).expect("batch");
    let (loss, _) = model.loss(&batch, &mut Mode::Eval).expect("forward");
    loss.backward().expect("backward");

    let tc = TrainConfig {
        epochs: 1,
        batch_size,
        optimizer: OptimizerKind::Adamw,
        patience: 0,
        length_bucketing: false,
        ..TrainConfig::default()
    };
    let started = Instant::now();
    if args.dp {
        let dp = DpSgdConfig {
            expected_batch_size: batch_size,
            ..DpSgdConfig::default()
        };
        let users: Vec<u32> = (0..data.len() as u32).collect();
        let units = privacy_units(&users, &dp);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        train_dp(&model, &data, &units, &tc, &dp, &mut rng, &mut |_| {}).expect("dp");
    } else {
        train(&model, &data, &[], &tc, &mut |_| {}).expect("train");
    }
    // Training ends by reading the parameters back, so the GPU's queue is drained here.
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"impl\":\"fedflow-candle{}{}\",\"device\":\"{}\",\"encoder\":\"{:?}\",\"batch\":{},\"seq\":{},\"steps\":{},\"threads\":{},\"kernel_threads\":{},\"samples_per_sec\":{:.1}}}",
        if args.reference { "-reference" } else { "" },
        if args.dp { "-dpsgd" } else { "" },
        args.device,
        args.encoder,
        batch_size,
        seq,
        args.steps,
        rayon::current_num_threads(),
        fedflow_common::model::kernel_threads(),
        data.len() as f64 / secs
    );
}
