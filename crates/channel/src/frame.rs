//! Length-delimited protobuf frames: a 4-byte big-endian length, then one encoded message.
//!
//! The codec is generic over [`AsyncRead`] / [`AsyncWrite`] so it can be tested on in-memory
//! pipes; on QUIC it runs over [`quinn::SendStream`] and [`quinn::RecvStream`] (the defaults).

use std::io;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::MAX_FRAME;

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame announced (or would need) more bytes than the limit allows. On receive, nothing
    /// of the frame body was read: the stream is no longer usable.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    /// The frame body is not a valid encoding of the expected message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The QUIC connection is gone; see [`crate::close::classify`] for why.
    #[error("connection lost: {0}")]
    Closed(quinn::ConnectionError),
    /// Any other I/O error on the stream (stream reset or stopped by the peer, ...).
    #[error("stream error: {0}")]
    Io(io::Error),
}

impl FrameError {
    /// True for errors caused by the bytes the peer sent (the peer is broken or hostile), as
    /// opposed to the transport going away.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, FrameError::Oversized { .. } | FrameError::Malformed(_) | FrameError::Truncated)
    }

    /// The connection error behind this frame error, when the connection was lost.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            FrameError::Closed(e) => Some(e),
            _ => None,
        }
    }

    fn from_io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return FrameError::Truncated;
        }
        if let Some(inner) = e.get_ref() {
            if let Some(quinn::ReadError::ConnectionLost(c)) = inner.downcast_ref::<quinn::ReadError>() {
                return FrameError::Closed(c.clone());
            }
            if let Some(quinn::WriteError::ConnectionLost(c)) = inner.downcast_ref::<quinn::WriteError>() {
                return FrameError::Closed(c.clone());
            }
        }
        FrameError::Io(e)
    }
}

/// Writes frames to a stream. Not cancel-safe: dropping a pending [`FrameWriter::send`] may leave
/// half a frame on the stream.
#[derive(Debug)]
pub struct FrameWriter<W = quinn::SendStream> {
    inner: W,
    buf: BytesMut,
    max: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer with the default limit, [`MAX_FRAME`].
    pub fn new(inner: W) -> Self {
        Self::with_max(inner, MAX_FRAME)
    }

    /// A writer refusing to send frames longer than `max` bytes.
    pub fn with_max(inner: W, max: usize) -> Self {
        FrameWriter { inner, buf: BytesMut::new(), max }
    }

    /// Encodes and writes one message as one frame. A message longer than the limit is not sent.
    pub async fn send<M: prost::Message>(&mut self, msg: &M) -> Result<(), FrameError> {
        let len = msg.encoded_len();
        if len > self.max || len > u32::MAX as usize {
            return Err(FrameError::Oversized { len, max: self.max });
        }
        self.buf.clear();
        self.buf.reserve(4 + len);
        self.buf.put_u32(len as u32);
        msg.encode(&mut self.buf).expect("the buffer has room for the whole message");
        self.inner.write_all(&self.buf).await.map_err(FrameError::from_io)?;
        self.inner.flush().await.map_err(FrameError::from_io)?;
        if self.buf.capacity() > 64 * 1024 {
            // Do not keep a large buffer around after one big frame.
            self.buf = BytesMut::new();
        }
        Ok(())
    }

    /// Ends the stream cleanly (the reader then sees `Ok(None)`).
    pub async fn finish(&mut self) -> Result<(), FrameError> {
        self.inner.shutdown().await.map_err(FrameError::from_io)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads frames from a stream. Not cancel-safe: dropping a pending [`FrameReader::recv`] may lose
/// part of a frame, so read from one task (or keep the future alive across `select!` turns).
#[derive(Debug)]
pub struct FrameReader<R = quinn::RecvStream> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the default limit, [`MAX_FRAME`].
    pub fn new(inner: R) -> Self {
        Self::with_max(inner, MAX_FRAME)
    }

    /// A reader refusing frames longer than `max` bytes.
    pub fn with_max(inner: R, max: usize) -> Self {
        FrameReader { inner, buf: Vec::new(), max }
    }

    /// Reads one frame and decodes it as `M`. `Ok(None)` is a clean end of stream (at a frame
    /// boundary); an end inside a frame is [`FrameError::Truncated`].
    pub async fn recv<M: prost::Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let mut header = [0u8; 4];
        let mut filled = 0;
        while filled < header.len() {
            let n = self.inner.read(&mut header[filled..]).await.map_err(FrameError::from_io)?;
            if n == 0 {
                return if filled == 0 { Ok(None) } else { Err(FrameError::Truncated) };
            }
            filled += n;
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > self.max {
            return Err(FrameError::Oversized { len, max: self.max });
        }
        self.buf.clear();
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).await.map_err(FrameError::from_io)?;
        let msg = M::decode(self.buf.as_slice())?;
        if self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
        Ok(Some(msg))
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small prost message for the tests (the channel crate does not depend on berth-api).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Msg {
        #[prost(uint64, tag = "1")]
        seq: u64,
        #[prost(string, tag = "2")]
        text: String,
        #[prost(bytes = "vec", tag = "3")]
        blob: Vec<u8>,
    }

    fn msg(seq: u64, size: usize) -> Msg {
        Msg { seq, text: format!("frame {seq}"), blob: vec![7; size] }
    }

    #[tokio::test]
    async fn round_trip_many_frames_then_clean_end() {
        let (a, b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            for i in 0..100u64 {
                w.send(&msg(i, (i as usize) * 37)).await.unwrap();
            }
            w.send(&Msg::default()).await.unwrap(); // an empty message is a zero-length frame
            w.finish().await.unwrap();
        });
        let mut r = FrameReader::new(b);
        for i in 0..100u64 {
            let got: Msg = r.recv().await.unwrap().unwrap();
            assert_eq!(got, msg(i, (i as usize) * 37));
        }
        let empty: Msg = r.recv().await.unwrap().unwrap();
        assert_eq!(empty, Msg::default());
        assert!(r.recv::<Msg>().await.unwrap().is_none());
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn writer_refuses_oversized_and_sends_nothing() {
        let mut out = Vec::new();
        let mut w = FrameWriter::with_max(&mut out, 100);
        let err = w.send(&msg(1, 200)).await.unwrap_err();
        assert!(matches!(err, FrameError::Oversized { max: 100, len } if len > 200), "{err}");
        assert!(err.to_string().contains("exceeds the limit of 100 bytes"), "{err}");
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn reader_refuses_oversized_before_reading_the_body() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        let mut r = FrameReader::new(wire.as_slice());
        let err = r.recv::<Msg>().await.unwrap_err();
        assert!(matches!(err, FrameError::Oversized { len, max } if len == MAX_FRAME + 1 && max == MAX_FRAME));
        assert!(err.is_protocol_violation());

        // A smaller configured limit applies to otherwise valid frames.
        let mut wire = Vec::new();
        FrameWriter::new(&mut wire).send(&msg(1, 64)).await.unwrap();
        let err = FrameReader::with_max(wire.as_slice(), 16).recv::<Msg>().await.unwrap_err();
        assert!(matches!(err, FrameError::Oversized { max: 16, .. }), "{err}");
    }

    #[tokio::test]
    async fn reader_reports_malformed_body() {
        // Field 1 with wire type 7 does not exist in protobuf.
        let body = [0x0f, 0x01, 0x02];
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let err = FrameReader::new(wire.as_slice()).recv::<Msg>().await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        assert!(err.to_string().starts_with("malformed frame:"), "{err}");
        assert!(err.is_protocol_violation());
    }

    #[tokio::test]
    async fn reader_reports_truncation_in_header_and_body() {
        let mut wire = Vec::new();
        FrameWriter::new(&mut wire).send(&msg(3, 10)).await.unwrap();
        for cut in [1, 3, 4, wire.len() - 1] {
            let err = FrameReader::new(&wire[..cut]).recv::<Msg>().await.unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut at {cut}: {err}");
        }
        assert!(FrameReader::new(&wire[..0]).recv::<Msg>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frames_split_across_tiny_reads() {
        // A duplex with a 3-byte buffer forces every header and body to arrive in pieces.
        let (a, b) = tokio::io::duplex(3);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            for i in 0..5 {
                w.send(&msg(i, 20)).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b);
        for i in 0..5 {
            assert_eq!(r.recv::<Msg>().await.unwrap().unwrap(), msg(i, 20));
        }
        writer.await.unwrap();
        assert!(r.recv::<Msg>().await.unwrap().is_none());
    }
}
