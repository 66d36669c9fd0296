//! The protocol's edges, over real gRPC on loopback: server reflection in both versions
//! clients speak, requests that are not protobuf at all, and what a site is told when the
//! coordinator's own disk fails (what, not where).

use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_tests::TestCoordinator;
use fedflow_tests::site::{download_bytes, federation_client, header, task_for, upload_bytes};
use prost::bytes::{Buf, BufMut, Bytes};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

const RUN: &str = "[run]\nname = \"p\"\nseed = 3\nrounds = 1\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
    [sampling]\nmin_selected = 1\nmin_available = 1\n\
    [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n";

async fn channel(c: &TestCoordinator) -> Channel {
    Channel::from_shared(c.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_answers_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let c = TestCoordinator::builder(RUN).spawn().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(&c).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a list of services: {answer:?}");
    };
    let v1_names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&c).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap_or_else(|s| panic!("v1alpha reflection: {s:?}"))
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a list of services: {answer:?}");
    };
    let v1alpha_names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();

    for names in [&v1_names, &v1alpha_names] {
        for service in [
            "fedflow.v1.Federation",
            "fedflow.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(names.iter().any(|n| n == service), "{service}: {names:?}");
        }
    }
    assert_eq!(
        v1_names, v1alpha_names,
        "both versions describe the same server"
    );

    // And a symbol resolves to its file in the older version too (what grpcurl asks next).
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "fedflow.v1.Federation".into(),
            ),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    assert!(
        matches!(
            answer.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
                if !f.file_descriptor_proto.is_empty()
        ),
        "{answer:?}"
    );
}

/// A codec sending and receiving raw message bytes: gRPC framing, no protobuf.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Not a protobuf message: field 1 with wire type 7, which does not exist.
const GARBAGE: &[u8] = b"\x0f\xff\xff\xff\xff";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_protobuf_is_an_invalid_argument() {
    let c = TestCoordinator::builder(RUN).spawn().await;
    let mut grpc = tonic::client::Grpc::new(channel(&c).await);
    for method in [
        "/fedflow.v1.Federation/Enrol",
        "/fedflow.v1.Federation/DeclineTask",
        "/fedflow.v1.Admin/GetStatus",
        "/fedflow.v1.Admin/Revoke",
    ] {
        grpc.ready().await.unwrap();
        let s = grpc
            .unary(
                tonic::Request::new(Bytes::from_static(GARBAGE)),
                PathAndQuery::from_static(method),
                Raw,
            )
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{method}: {s:?}");
        assert!(
            s.message().contains("not a valid fedflow.v1."),
            "{method}: {s:?}"
        );
    }
    // A streamed upload whose first message is garbage: refused the same way, by the
    // handler that reads the stream.
    grpc.ready().await.unwrap();
    let s = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter([Bytes::from_static(GARBAGE)])),
            PathAndQuery::from_static("/fedflow.v1.Federation/UploadUpdate"),
            Raw,
        )
        .await
        .map(|r: tonic::Response<Bytes>| r.into_inner())
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("UpdateChunk"), "{s:?}");
    // A well-formed call still works on the same connection.
    let mut site = FederationClient::new(channel(&c).await);
    fedflow_tests::site::enrol(&mut site, "site-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_is_told_what_failed_on_the_coordinator_not_where() {
    let c = TestCoordinator::builder(RUN).spawn().await;
    // The data directory as the coordinator was given it, and as the kernel resolves it.
    let data = [
        c.data.to_string_lossy().into_owned(),
        c.data
            .canonicalize()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    ];
    let names_no_file = |s: &tonic::Status| data.iter().all(|d| !s.message().contains(d.as_str()));
    let mut a = federation_client(c.addr).await;
    let t = task_for(&mut a, "site-a").await;
    let model = download_bytes(&mut a, "site-a", &t).await;

    // An update whose safetensors header describes more bytes than it has: refused, with a
    // reason that names no file of the coordinator's (the upload's spill file).
    let short = Bytes::copy_from_slice(&model[..model.len() - 8]);
    let s = upload_bytes(&mut a, header("site-a", &t, &short), &short)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(names_no_file(&s), "{s:?}");
    assert!(!s.message().contains("upload-"), "{s:?}");

    // The coordinator's spill folder is gone (its disk failed): the upload cannot be stored.
    // The site learns that the coordinator failed and may retry, not where its files are.
    std::fs::remove_dir_all(c.data.join("incoming")).unwrap();
    let delta = Bytes::from(model.clone());
    let s = upload_bytes(&mut a, header("site-a", &t, &delta), &delta)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Internal, "{s:?}");
    assert!(
        s.message()
            .contains("reading or writing one of its files failed"),
        "{s:?}"
    );
    assert!(names_no_file(&s), "{s:?}");
    assert!(!s.message().contains("incoming"), "{s:?}");
}
