//! A hand-made site: the `Federation` protocol one call at a time, for tests that need to
//! control (or tamper with) what a site sends. Under mutual TLS pass `""` as the site id: the
//! certificate names the site.

use std::net::SocketAddr;
use std::time::Duration;

use fedflow_common::hash::sha256_hex;
use fedflow_common::params::ParamSet;
use fedflow_proto::transfer::{MAX_MESSAGE_BYTES, update_chunks};
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    DownloadModelRequest, EnrolRequest, EnrolResponse, HeartbeatRequest, Metrics, NextTaskRequest,
    SiteState, Task, UpdateHeader, UploadUpdateResponse, next_task_response,
};
use prost::bytes::Bytes;
use tonic::transport::Channel;

/// Bytes per upload chunk: small, so that even a tiny model's update spans several chunks.
pub const CHUNK_BYTES: usize = 4096;

/// A plaintext `Federation` client for `addr`, with fedflow's message limits.
pub async fn federation_client(addr: SocketAddr) -> FederationClient<Channel> {
    FederationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Enrols `site` with the vocabulary of a [`crate::TestCoordinator`] built without
/// another one ([`crate::coordinator::default_vocab`]); panics if the coordinator refuses.
/// For a coordinator with another vocabulary, use [`enrol_with`].
pub async fn enrol(c: &mut FederationClient<Channel>, site: &str) -> EnrolResponse {
    enrol_with(c, site, &crate::coordinator::default_vocab_sha256()).await
}

/// Enrols `site` saying its data uses the vocabulary with SHA-256 `vocab_sha256` (see
/// [`crate::TestCoordinator::vocab_sha256`]); panics if the coordinator refuses.
pub async fn enrol_with(
    c: &mut FederationClient<Channel>,
    site: &str,
    vocab_sha256: &str,
) -> EnrolResponse {
    c.enrol(EnrolRequest {
        site_id: site.into(),
        vocab_sha256: vocab_sha256.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("enrolling {site:?}: {s:?}"))
    .into_inner()
}

/// Long-polls (bounded) until `site` gets a task: the coordinator's answer, not a timer,
/// decides when the test goes on.
pub async fn next_task(c: &mut FederationClient<Channel>, site: &str) -> Task {
    for _ in 0..120 {
        let r = c
            .next_task(NextTaskRequest {
                site_id: site.into(),
                wait_ms: 5_000,
            })
            .await
            .unwrap_or_else(|s| panic!("polling for {site:?}: {s:?}"))
            .into_inner();
        if let Some(next_task_response::Outcome::Task(t)) = r.outcome {
            return t;
        }
    }
    panic!("{site:?} got no task in ten minutes of polling");
}

/// [`enrol`]s `site`, then waits for its task with [`next_task`].
pub async fn task_for(c: &mut FederationClient<Channel>, site: &str) -> Task {
    enrol(c, site).await;
    next_task(c, site).await
}

/// [`enrol_with`] the vocabulary `vocab_sha256`, then waits for its task with [`next_task`].
pub async fn task_for_with(
    c: &mut FederationClient<Channel>,
    site: &str,
    vocab_sha256: &str,
) -> Task {
    enrol_with(c, site, vocab_sha256).await;
    next_task(c, site).await
}

/// Downloads task `t`'s model, checking it hashes to what the task announces; the bytes.
pub async fn download_bytes(c: &mut FederationClient<Channel>, site: &str, t: &Task) -> Vec<u8> {
    let sha = t
        .model
        .as_ref()
        .expect("a training task names its model")
        .sha256
        .clone();
    let mut stream = c
        .download_model(DownloadModelRequest {
            site_id: site.into(),
            task_id: t.task_id.clone(),
            run_id: t.run_id.clone(),
            round: t.round,
            sha256: sha.clone(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(
        sha256_hex(&bytes),
        sha,
        "the model downloaded is the one announced"
    );
    bytes
}

/// Downloads task `t`'s model (see [`download_bytes`]) as parameters.
pub async fn download(c: &mut FederationClient<Channel>, site: &str, t: &Task) -> ParamSet {
    ParamSet::from_safetensors_bytes(&download_bytes(c, site, t).await).unwrap()
}

/// The header of a well-formed update of `bytes` for task `t`: weight 10, plausible metrics
/// from 10 training examples. Tests tamper with it to make it ill-formed.
pub fn header(site: &str, t: &Task, bytes: &[u8]) -> UpdateHeader {
    UpdateHeader {
        site_id: site.into(),
        task_id: t.task_id.clone(),
        run_id: t.run_id.clone(),
        round: t.round,
        nonce: t.nonce.clone(),
        base_model_sha256: t
            .model
            .as_ref()
            .expect("a training task names its model")
            .sha256
            .clone(),
        delta_sha256: sha256_hex(bytes),
        total_bytes: bytes.len() as u64,
        weight: 10.0,
        site_dp_unclipped: false,
        encoding: String::new(),
        metrics: Some(Metrics {
            train_examples: 10,
            validation_examples: 2,
            train_loss: 1.0,
            validation_loss: 1.0,
            validation_accuracy: 0.5,
            validation_macro_f1: 0.4,
            epochs_run: 1,
            train_seconds: 0.1,
        }),
    }
}

/// Uploads `bytes` under `header`, in [`CHUNK_BYTES`] chunks.
pub async fn upload_bytes(
    c: &mut FederationClient<Channel>,
    header: UpdateHeader,
    bytes: &Bytes,
) -> Result<UploadUpdateResponse, tonic::Status> {
    c.upload_update(tokio_stream::iter(update_chunks(
        header,
        bytes,
        CHUNK_BYTES,
    )))
    .await
    .map(tonic::Response::into_inner)
}

/// Uploads `delta` for task `t` under [`header`]; `edit` may tamper with the header first.
pub async fn upload(
    c: &mut FederationClient<Channel>,
    site: &str,
    t: &Task,
    delta: &ParamSet,
    edit: impl FnOnce(&mut UpdateHeader),
) -> Result<UploadUpdateResponse, tonic::Status> {
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    let mut h = header(site, t, &bytes);
    edit(&mut h);
    upload_bytes(c, h, &bytes).await
}

/// Heartbeats sent in the background for one task; they stop when this is dropped (or
/// [`Heartbeats::stop`]ped), so the site then goes silent.
#[derive(Debug)]
pub struct Heartbeats {
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeats {
    /// Stops the heartbeats: from now on the site is silent.
    pub fn stop(self) {}
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps `site` alive while it works on task `t`: calls `Heartbeat` (state training) once
/// before returning (so the coordinator has it when this returns), then in the background as
/// often as the coordinator's last answer says (`next_heartbeat_ms`), the way a real client
/// does. A failed background heartbeat is retried at the same pace.
pub async fn heartbeat(c: &FederationClient<Channel>, site: &str, t: &Task) -> Heartbeats {
    let mut c = c.clone();
    let req = HeartbeatRequest {
        site_id: site.into(),
        task_id: t.task_id.clone(),
        state: SiteState::Training as i32,
        ..Default::default()
    };
    let first = c
        .heartbeat(req.clone())
        .await
        .unwrap_or_else(|s| panic!("heartbeat of {site:?}: {s:?}"))
        .into_inner();
    let mut every = Duration::from_millis(first.next_heartbeat_ms.max(1).into());
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Ok(r) = c.heartbeat(req.clone()).await {
                let ms = r.into_inner().next_heartbeat_ms;
                if ms > 0 {
                    every = Duration::from_millis(ms.into());
                }
            }
        }
    });
    Heartbeats { task }
}
