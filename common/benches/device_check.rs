//! The GPU path against the CPU on a small model: for each encoder, the logits of one batch,
//! a short training run (AdamW, dropout) and a short DP-SGD run, started from the same
//! parameters with the same seeds on both devices, must agree within float tolerance.
//!
//! Run: `cargo bench -p fedflow-common --features cuda --bench device_check -- --device cuda:0`
//! (or the binary that `bench/cuda/build.sh` leaves, on a machine with a GPU). Prints one JSON
//! line per check and exits with status 1 if any check fails. With `--device cpu` it compares
//! the CPU's fused LSTM kernel with the CPU's candle-op path, which checks the bench itself.
//!
//! The CPU side uses the fused LSTM kernel, the GPU side candle's CUDA ops: the two compute
//! the same function in a different order, so they agree to rounding, not bit for bit.
//! Dropout masks and DP noise are drawn from the same seeded host streams on both sides.

use std::str::FromStr;

use candle_core::Device;
use fedflow_common::data::EncodedSession;
use fedflow_common::device::DeviceChoice;
use fedflow_common::model::{AttentionFlowModel, Batch, EncoderKind, Mode, ModelConfig};
use fedflow_common::params::ParamSet;
use fedflow_common::train::{
    DpSgdConfig, OptimizerKind, TrainConfig, privacy_units, train, train_dp,
};
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};

/// Largest |a - b| over all parameters of two sets with the same names and shapes.
fn max_abs_diff(a: &ParamSet, b: &ParamSet) -> f64 {
    a.iter()
        .map(|(name, ta)| {
            let tb = b.get(name).expect("same parameters");
            let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let vb = tb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            va.iter()
                .zip(&vb)
                .map(|(x, y)| (x - y).abs() as f64)
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

fn params(model: &AttentionFlowModel) -> ParamSet {
    ParamSet::from_varmap(model.varmap()).expect("parameters")
}

fn sessions(cfg: &ModelConfig, n: usize, seed: u64) -> Vec<EncodedSession> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| EncodedSession {
            events: (0..rng.random_range(3..=cfg.max_seq_len))
                .map(|_| rng.random_range(2..cfg.vocab_size as u32))
                .collect(),
            class: rng.random_range(0..5),
        })
        .collect()
}

struct Check {
    ok: bool,
}

impl Check {
    fn report(&mut self, encoder: EncoderKind, check: &str, diff: f64, moved: f64, tol: f64) {
        let ok = diff.is_finite() && diff <= tol;
        self.ok &= ok;
        println!(
            "{{\"check\":\"{check}\",\"encoder\":\"{encoder:?}\",\"max_abs_diff\":{diff:e},\"moved\":{moved:e},\"tolerance\":{tol:e},\"ok\":{ok}}}"
        );
    }
}

fn main() {
    let mut device = "cuda:0".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--device" => device = it.next().expect("--device cpu|cuda:N"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let choice = DeviceChoice::from_str(&device).expect("--device");
    let dev = choice.open().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    println!("{{\"device\":\"{choice}\"}}");
    let mut check = Check { ok: true };
    for encoder in [
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ] {
        let cfg = ModelConfig {
            encoder,
            max_seq_len: 24,
            ..ModelConfig::default()
        };
        let data = sessions(&cfg, 256, 1);
        let cpu = AttentionFlowModel::new(&cfg, &Device::Cpu, 7).expect("model");
        // candle's ops on the device (and on the CPU, for `--device cpu`): never the kernel.
        let mut other = AttentionFlowModel::new(&cfg, &dev, 7).expect("model");
        other.set_fused(false);
        check.report(
            encoder,
            "init",
            max_abs_diff(&params(&cpu), &params(&other)),
            0.0,
            0.0,
        );

        let refs: Vec<&EncodedSession> = data.iter().take(64).collect();
        let logits = |m: &AttentionFlowModel, d: &Device| {
            let batch = Batch::new(&refs, &cfg, d).expect("batch");
            m.forward(&batch, &mut Mode::Eval)
                .expect("forward")
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (logits(&cpu, &Device::Cpu), logits(&other, &dev));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        check.report(encoder, "logits", diff, 0.0, 1e-4);

        let start = params(&cpu);
        let tc = TrainConfig {
            epochs: 1,
            batch_size: 64,
            optimizer: OptimizerKind::Adamw,
            patience: 0,
            seed: 3,
            ..TrainConfig::default()
        };
        train(&cpu, &data, &[], &tc, &mut |_| {}).expect("train on the CPU");
        train(&other, &data, &[], &tc, &mut |_| {}).expect("train on the device");
        let moved = max_abs_diff(&start, &params(&cpu));
        check.report(
            encoder,
            "train",
            max_abs_diff(&params(&cpu), &params(&other)),
            moved,
            2e-4,
        );

        let dp = DpSgdConfig {
            expected_batch_size: 64,
            ..DpSgdConfig::default()
        };
        let users: Vec<u32> = (0..data.len() as u32).collect();
        let units = privacy_units(&users, &dp);
        let before = params(&cpu);
        train_dp(
            &cpu,
            &data,
            &units,
            &tc,
            &dp,
            &mut ChaCha20Rng::seed_from_u64(5),
            &mut |_| {},
        )
        .expect("DP-SGD on the CPU");
        train_dp(
            &other,
            &data,
            &units,
            &tc,
            &dp,
            &mut ChaCha20Rng::seed_from_u64(5),
            &mut |_| {},
        )
        .expect("DP-SGD on the device");
        check.report(
            encoder,
            "dp-sgd",
            max_abs_diff(&params(&cpu), &params(&other)),
            max_abs_diff(&before, &params(&cpu)),
            2e-4,
        );
    }
    println!("{{\"all_ok\":{}}}", check.ok);
    if !check.ok {
        std::process::exit(1);
    }
}
