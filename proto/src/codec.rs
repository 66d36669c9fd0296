//! The codec of fedflow's gRPC *servers*: prost's, except that a request which is not a
//! valid protobuf message is answered `INVALID_ARGUMENT` (the caller sent garbage) instead
//! of prost's `INTERNAL` (which says the server failed).
//!
//! Only the generated servers use it (`build.rs` generates them in a second pass with
//! `codec_path`); clients keep `tonic_prost::ProstCodec`, for which an undecodable
//! *response* is the peer's failure and stays `INTERNAL`.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// A [`Codec`] for servers: encodes responses `T` and decodes requests `U` with prost,
/// answering an undecodable request with `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ServerCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ServerCodec<T, U> {
    fn default() -> Self {
        ServerCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            inner: ProstCodec::<T, U>::raw_decoder(BufferSettings::default()),
        }
    }
}

/// Decodes requests `U` with prost; an undecodable one is `INVALID_ARGUMENT`, naming the
/// message type and what prost found wrong.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|s| {
            let full = std::any::type_name::<U>();
            let name = full.rsplit("::").next().unwrap_or(full);
            Status::invalid_argument(format!(
                "the request is not a valid fedflow.v1.{name} message ({}): send the message \
                 the method expects, encoded as protobuf",
                s.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
