//! Chunked transfers over real gRPC on loopback: a model streamed down, updates streamed up,
//! hashes verified by the receiver, message-size limits enforced by tonic on both ends.
//!
//! The server here implements only the two transfer calls (the coordinator is tested in its
//! own crate); everything else answers `unimplemented`.

use std::net::SocketAddr;

use fedflow_proto::transfer::{
    Assembler, MAX_MESSAGE_BYTES, model_chunks, receive_update, sha256_hex, update_chunks,
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

struct TestServer {
    model: Bytes,
    sha: String,
    chunk_bytes: usize,
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
        let (_header, bytes) = receive_update(&mut stream, 64 << 20, 1 << 20)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(UploadUpdateResponse {
            delta_sha256: sha256_hex(&bytes),
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

async fn serve(model: Bytes, chunk_bytes: usize) -> (SocketAddr, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sha = sha256_hex(&model);
    let svc = FederationServer::new(TestServer {
        model,
        sha: sha.clone(),
        chunk_bytes,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(4 * MAX_MESSAGE_BYTES);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, sha)
}

async fn client(addr: SocketAddr) -> FederationClient<tonic::transport::Channel> {
    FederationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn payload(n: usize) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn a_model_larger_than_one_message_streams_down_and_verifies() {
    let model = payload(5 * (1 << 20) + 12345);
    let (addr, sha) = serve(model.clone(), 1 << 20).await;
    let mut c = client(addr).await;
    let mut stream = c
        .download_model(DownloadModelRequest {
            round: 2,
            sha256: sha.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut asm = None;
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        let a = asm.get_or_insert_with(|| {
            Assembler::new(
                Vec::new(),
                &chunk.sha256,
                chunk.total_bytes,
                1 << 30,
                1 << 20,
            )
            .unwrap()
        });
        assert_eq!(chunk.round, 2);
        a.push(chunk.offset, &chunk.data).unwrap();
        chunks += 1;
    }
    assert_eq!(chunks, 6);
    assert_eq!(asm.unwrap().finish().unwrap(), model.to_vec());
}

#[tokio::test]
async fn updates_stream_up_and_a_corrupted_one_is_refused() {
    let (addr, _) = serve(payload(10), 1 << 20).await;
    let mut c = client(addr).await;
    let delta = payload(3 * (1 << 20) + 7);
    let header = UpdateHeader {
        round: 1,
        delta_sha256: sha256_hex(&delta),
        total_bytes: delta.len() as u64,
        ..Default::default()
    };
    let msgs = update_chunks(header.clone(), &delta, 1 << 20);
    let ack = c
        .upload_update(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.delta_sha256, sha256_hex(&delta));

    let mut corrupted = delta.to_vec();
    corrupted[2 << 20] ^= 0xff;
    let msgs = update_chunks(header, &Bytes::from(corrupted), 1 << 20);
    let err = c.upload_update(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("hash mismatch"), "{}", err.message());
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_by_the_receiver() {
    // The server sends 2 MiB chunks; the client accepts at most one 1 MiB chunk per message.
    let model = payload(3 << 20);
    let (addr, sha) = serve(model, 2 << 20).await;
    let mut c = client(addr).await;
    let mut stream = c
        .download_model(DownloadModelRequest {
            sha256: sha,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
}
