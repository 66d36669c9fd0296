//! The agent's prediction speed: single-session `POST /v1/predict` latency over HTTP on
//! loopback (p50, p99; one connection per request, as the test client opens them) and batch
//! throughput (256 sessions per request over HTTP, and the model alone), for the default
//! model (embedding 64, two LSTM layers of 64) at sequence lengths 20 and 100; the model
//! alone's single-session latency beside it. The PyTorch side: `bench/run.sh serving`.
//!
//! `cargo bench -p fedflow-client --bench serving`

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use fedflow_client::agent::http::{AgentState, ApiLimits, router};
use fedflow_client::agent::serving::{Served, ServedModel};
use fedflow_client::agent::store::FeedbackStore;
use fedflow_common::data::{EncodedSession, Vocab};
use fedflow_common::model::{AttentionFlowModel, ModelConfig, save_model};
use fedflow_common::synth::EVENT_NAMES;
use fedflow_tests::http::request;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vocab = Vocab::from_events(EVENT_NAMES).unwrap();
    let cfg = ModelConfig {
        vocab_size: vocab.len(),
        ..ModelConfig::default()
    };
    let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 1).unwrap();
    save_model(&dir.path().join("v1"), &model, &vocab).unwrap();
    let served = Arc::new(Served::default());
    served.swap(ServedModel::load(&dir.path().join("v1"), 1, &vocab).unwrap());
    let state = Arc::new(AgentState::new(
        Arc::new(FeedbackStore::open(dir.path().join("store")).unwrap()),
        served.clone(),
        vocab.clone(),
        ApiLimits {
            max_body_bytes: 16 << 20,
            ..ApiLimits::default()
        },
    ));
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
        addr
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    println!(
        "{:>6} {:>10} {:>10} {:>14} {:>14} {:>16} {:>16}",
        "length",
        "p50 ms",
        "p99 ms",
        "model p50 ms",
        "model p99 ms",
        "HTTP batch s/s",
        "model batch s/s"
    );
    for len in [20usize, 100] {
        let session = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<&'static str> {
            (0..len)
                .map(|_| EVENT_NAMES[rng.random_range(0..EVENT_NAMES.len())])
                .collect()
        };
        let one = json!({"sessions": [{"events": session(&mut rng)}]}).to_string();
        let batch: Vec<Vec<&str>> = (0..256).map(|_| session(&mut rng)).collect();
        let batch_body = json!({
            "sessions": batch.iter().map(|e| json!({"events": e})).collect::<Vec<_>>()
        })
        .to_string();
        let mut lat = rt.block_on(async {
            for _ in 0..100 {
                request(addr, "POST", "/v1/predict", &[], one.as_bytes()).await;
            }
            let mut lat = Vec::with_capacity(2_000);
            for _ in 0..2_000 {
                let t = Instant::now();
                let r = request(addr, "POST", "/v1/predict", &[], one.as_bytes()).await;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(r.status, 200);
            }
            lat
        });
        lat.sort_by(f64::total_cmp);
        let http_rate = rt.block_on(async {
            let t = Instant::now();
            for _ in 0..20 {
                let r = request(addr, "POST", "/v1/predict", &[], batch_body.as_bytes()).await;
                assert_eq!(r.status, 200);
            }
            20.0 * 256.0 / t.elapsed().as_secs_f64()
        });
        let encoded: Vec<EncodedSession> = batch
            .iter()
            .map(|e| EncodedSession {
                events: e.iter().map(|n| vocab.encode(n)).collect(),
                class: 0,
            })
            .collect();
        let m = served.current().unwrap();
        let single: Vec<EncodedSession> = encoded[..1].to_vec();
        for _ in 0..100 {
            m.probabilities(&single).unwrap();
        }
        let mut model_lat: Vec<f64> = (0..2_000)
            .map(|_| {
                let t = Instant::now();
                m.probabilities(&single).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        model_lat.sort_by(f64::total_cmp);
        let t = Instant::now();
        for _ in 0..20 {
            m.probabilities(&encoded).unwrap();
        }
        let model_rate = 20.0 * 256.0 / t.elapsed().as_secs_f64();
        println!(
            "{len:>6} {:>10.3} {:>10.3} {:>14.3} {:>14.3} {http_rate:>16.0} {model_rate:>16.0}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&model_lat, 0.5),
            percentile(&model_lat, 0.99)
        );
    }
}
