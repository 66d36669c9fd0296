//! Throughput of the chunked transfers over real gRPC on loopback, for large models: a
//! model streamed down (1 MiB chunks, verified by the receiver's `Assembler`) and an update of
//! the same size streamed up (spilled to a file as it arrives, hash checked on the way).
//!
//! ```sh
//! cargo bench -p fedflow-proto --bench transfer -- --mb 500 [--window KIB] [--sink file|null] [--runs R]
//! ```
//!
//! `--window` sets the HTTP/2 flow-control windows (stream and connection, both ends) in KiB
//! (default: tonic's and hyper's own); `--sink null` drops the upload instead of spilling it
//! (to tell the spill's cost from the rest); `--runs` repeats the transfers and reports each.
//! The process allocates with mimalloc, as the coordinator and the client do (run it with
//! `MIMALLOC_PURGE_DELAY=0` for the coordinator's setting).

use std::net::SocketAddr;
use std::time::Instant;

use fedflow_proto::transfer::{
    Assembler, MAX_MESSAGE_BYTES, model_chunks, receive_update_into, sha256_hex, update_chunks,
};
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::federation_server::{Federation, FederationServer};
use fedflow_proto::v1::{
    DownloadModelRequest, EnrolRequest, EnrolResponse, HeartbeatRequest, HeartbeatResponse,
    ModelChunk, NextTaskRequest, NextTaskResponse, UpdateChunk, UpdateHeader, UploadUpdateResponse,
};
use prost::bytes::Bytes;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct TestServer {
    model: Bytes,
    sha: String,
    chunk_bytes: usize,
    /// Spill uploads to a file (else drop them).
    spill: bool,
}

type ChunkStream = tokio_stream::Iter<std::vec::IntoIter<Result<ModelChunk, Status>>>;

#[tonic::async_trait]
impl Federation for TestServer {
    async fn enrol(&self, _: Request<EnrolRequest>) -> Result<Response<EnrolResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn next_task(
        &self,
        _: Request<NextTaskRequest>,
    ) -> Result<Response<NextTaskResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    type DownloadModelStream = ChunkStream;

    async fn download_model(
        &self,
        req: Request<DownloadModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = req.into_inner();
        if req.sha256 != self.sha {
            return Err(Status::not_found("no model with that hash"));
        }
        let chunks = model_chunks(
            "run-1",
            req.round,
            &self.sha,
            &self.model,
            req.offset,
            self.chunk_bytes,
        );
        Ok(Response::new(tokio_stream::iter(
            chunks.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<UploadUpdateResponse>, Status> {
        let mut stream = req.into_inner();
        // Spilled to a file as it arrives, like the coordinator does (or dropped).
        let sink: Box<dyn std::io::Write + Send> = if self.spill {
            let file = tempfile::tempfile().map_err(|e| Status::internal(e.to_string()))?;
            Box::new(std::io::BufWriter::new(file))
        } else {
            Box::new(std::io::sink())
        };
        let (header, _sink) = receive_update_into(&mut stream, sink, 1 << 40, 1 << 20)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(UploadUpdateResponse {
            delta_sha256: header.delta_sha256,
            duplicate: false,
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn decline_task(
        &self,
        _: Request<fedflow_proto::v1::DeclineTaskRequest>,
    ) -> Result<Response<fedflow_proto::v1::DeclineTaskResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn report_evaluation(
        &self,
        _: Request<fedflow_proto::v1::EvaluationReport>,
    ) -> Result<Response<fedflow_proto::v1::EvaluationReportResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }
}

fn payload(n: usize) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The value after `flag` on the command line, parsed.
fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag} takes a value, got {v}"))
        })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = arg(&args, "--mb").unwrap_or(500);
    let window: Option<u32> = arg::<u32>(&args, "--window").map(|k| k * 1024);
    let spill = arg::<String>(&args, "--sink").is_none_or(|s| s != "null");
    let runs: usize = arg(&args, "--runs").unwrap_or(1);
    let n = mb * 1_000_000;
    let model = payload(n);
    let t = Instant::now();
    let sha = sha256_hex(&model);
    let hash_s = t.elapsed().as_secs_f64();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let svc = FederationServer::new(TestServer {
        model: model.clone(),
        sha: sha.clone(),
        chunk_bytes: 1 << 20,
        spill,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window);
    let mut c = FederationClient::new(endpoint.connect().await.unwrap())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let mbs = |s: f64| n as f64 / 1e6 / s;
    println!(
        "payload {mb} MB, 1 MiB chunks, loopback, HTTP/2 windows {}, upload {}",
        window.map_or("tonic's defaults".to_string(), |w| format!(
            "{} KiB",
            w / 1024
        )),
        if spill {
            "spilled to a file"
        } else {
            "dropped"
        }
    );
    println!("  SHA-256 alone: {hash_s:.2} s ({:.0} MB/s)", mbs(hash_s));
    for run in 1..=runs {
        let t = Instant::now();
        let mut stream = c
            .download_model(DownloadModelRequest {
                sha256: sha.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut asm = None;
        while let Some(chunk) = stream.message().await.unwrap() {
            let a = asm.get_or_insert_with(|| {
                Assembler::new(
                    std::io::sink(),
                    &chunk.sha256,
                    chunk.total_bytes,
                    1 << 40,
                    1 << 20,
                )
                .unwrap()
            });
            a.push(chunk.offset, &chunk.data).unwrap();
        }
        asm.expect("chunks arrived")
            .finish()
            .expect("hash verified");
        let down_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let header = UpdateHeader {
            site_id: "bench".into(),
            delta_sha256: sha.clone(),
            total_bytes: n as u64,
            ..Default::default()
        };
        let reply = c
            .upload_update(tokio_stream::iter(update_chunks(header, &model, 1 << 20)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.delta_sha256, sha);
        let up_s = t.elapsed().as_secs_f64();
        println!(
            "  run {run}: download (stream + verify) {down_s:.2} s ({:.0} MB/s); upload (stream + \
             verify{}) {up_s:.2} s ({:.0} MB/s)",
            mbs(down_s),
            if spill { " + spill to file" } else { "" },
            mbs(up_s)
        );
    }
    println!(
        "  peak RSS of this process (both ends + the payload): {:.0} MiB",
        peak_rss_mib()
    );
}
