//! Connecting to the coordinator over mutual TLS: the certificate bundle and the connection
//! helpers live in [`fedflow_proto::tls`] (operators' tools use them too).

pub use fedflow_proto::tls::*;

impl From<TlsError> for crate::Error {
    fn from(e: TlsError) -> Self {
        crate::Error::Usage(e.0)
    }
}
