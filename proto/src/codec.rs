//! The codec every `quiver.v1` service and client uses: prost's, except that a message that
//! does not decode is `INVALID_ARGUMENT`.
//!
//! tonic's stock prost codec reports a decode failure as `INTERNAL`, following gRPC's
//! status-code table. For a server that is the wrong signal: the bytes came from the caller,
//! the server is fine, and a retry of the same bytes will fail the same way. Quiver's API
//! promises `INVALID_ARGUMENT` for malformed requests (`README.md`, "API errors").
//!
//! The same codec decodes answers on the client side, where a decode failure means a broken
//! or foreign server; it reports `INVALID_ARGUMENT` there too, naming the message type, which
//! is as clear to a reader and never happens between Quiver's own server and clients.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// prost encoding; decode failures are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct QuiverCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for QuiverCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for QuiverCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = QuiverDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        QuiverDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; a malformed message is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct QuiverDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for QuiverDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or("message");
            Status::invalid_argument(format!("malformed {name}: {e}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
