//! The fused kernels' determinism: the same bits whatever the number of threads.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::tests::{refs, sessions, tiny};
use super::*;

/// Set (to an output file) in the child processes of the bit-identity tests.
const KERNEL_BITS_ENV: &str = "FEDFLOW_TEST_KERNEL_BITS_OUT";

/// A fused encoder's logits and every parameter gradient for a batch large enough to span
/// several row chunks, as raw `f32` bits, preceded by the kernel thread count.
fn fused_bits(encoder: EncoderKind) -> Vec<u32> {
    let cfg = ModelConfig {
        hidden_size: 24,
        ..tiny(encoder)
    };
    let data = sessions(70, cfg.vocab_size, 12, 21);
    let batch = Batch::new(&refs(&data), &cfg, &Device::Cpu).unwrap();
    let mut model = AttentionFlowModel::new(&cfg, &Device::Cpu, 5).unwrap();
    model.set_fused(true);
    let (loss, logits) = model.loss(&batch, &mut Mode::Eval).unwrap();
    let grads = loss.backward().unwrap();
    let mut out = vec![super::kernels::kernel_threads() as u32];
    let mut push = |t: &Tensor| {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        out.extend(v.iter().map(|x| x.to_bits()));
    };
    push(&logits);
    let map = model.varmap().data().lock().unwrap();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for n in names {
        push(grads.get(&map[n]).expect("every parameter gets a gradient"));
    }
    out
}

#[test]
fn fused_lstm_is_bit_identical_for_any_kernel_thread_count() {
    bit_identical(
        EncoderKind::Lstm,
        "model::kernel_tests::fused_lstm_is_bit_identical_for_any_kernel_thread_count",
    );
}

#[test]
fn fused_gru_is_bit_identical_for_any_kernel_thread_count() {
    bit_identical(
        EncoderKind::Gru,
        "model::kernel_tests::fused_gru_is_bit_identical_for_any_kernel_thread_count",
    );
}

/// The fused kernels' pool is sized once per process from `FEDFLOW_KERNEL_THREADS`, so
/// the test (`name`) re-executes itself with 1 and with 2 kernel threads and compares the
/// two children's forward and backward results bit for bit.
fn bit_identical(encoder: EncoderKind, name: &str) {
    if let Ok(out) = std::env::var(KERNEL_BITS_ENV) {
        let bits: Vec<u8> = fused_bits(encoder)
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        std::fs::write(out, bits).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |threads: u32| {
        let out = dir.path().join(format!("bits-{threads}"));
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1"])
            .env(KERNEL_BITS_ENV, &out)
            .env("FEDFLOW_KERNEL_THREADS", threads.to_string())
            .output()
            .unwrap();
        assert!(status.status.success(), "child with {threads}: {status:?}");
        let bytes = std::fs::read(&out).unwrap();
        let bits: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            bits[0], threads,
            "the child ran with the asked thread count"
        );
        bits[1..].to_vec()
    };
    let (one, two) = (run(1), run(2));
    assert!(one.len() > 1000, "only {} values compared", one.len());
    let differ = one.iter().zip(&two).filter(|(a, b)| a != b).count();
    assert_eq!(one.len(), two.len());
    assert_eq!(differ, 0, "{differ} of {} values differ", one.len());
}

/// The kernels' matmul gives the same bits whatever number of threads it is given.
#[test]
fn kernel_matmul_is_bit_identical_for_any_thread_count() {
    use super::kernels::{MatRef, matmul_into};
    let (m, k, n) = (96, 257, 130);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let lhs: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let rhs: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let run = |threads: usize| {
        let mut dst = vec![0.5f32; m * n];
        pool.install(|| {
            matmul_into(
                &mut dst,
                n,
                MatRef::dense(&lhs, m, k),
                MatRef::dense(&rhs, k, n),
                true,
                threads,
            )
        });
        dst.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
    };
    let one = run(1);
    for threads in [2, 3, 4] {
        assert_eq!(one, run(threads), "{threads} threads");
    }
    // And it computed the product (plus the 0.5 it accumulated onto).
    let want: f32 = 0.5 + (0..k).map(|i| lhs[i] * rhs[i * n]).sum::<f32>();
    assert!((f32::from_bits(one[0]) - want).abs() < 1e-3);
}
