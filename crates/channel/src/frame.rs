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
/// Reads frames. [`FrameReader::recv`] is cancel-safe: a frame read in part when its future is
/// dropped (a `select!` taking another branch) is completed by the next call, because what was
/// read so far is kept in the reader, not in the future. The body buffer grows as the body's
/// bytes arrive (never more than [`GROW_STEP`] past them), so a peer that announces a large frame and sends
/// nothing makes the reader allocate nothing.
#[derive(Debug)]
pub struct FrameReader<R = quinn::RecvStream> {
    inner: R,
    header: [u8; 4],
    /// Header bytes read so far.
    header_read: usize,
    /// The body of the frame being read (valid up to `body_read`).
    buf: Vec<u8>,
    body_read: usize,
    max: usize,
}

/// How far ahead of the bytes received the body buffer grows.
pub const GROW_STEP: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the default limit, [`MAX_FRAME`].
    pub fn new(inner: R) -> Self {
        Self::with_max(inner, MAX_FRAME)
    }

    /// A reader refusing frames longer than `max` bytes.
    pub fn with_max(inner: R, max: usize) -> Self {
        FrameReader { inner, header: [0; 4], header_read: 0, buf: Vec::new(), body_read: 0, max }
    }

    /// Changes the limit for the frames not begun yet (a session raises it once its peer is
    /// authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Reads one frame and decodes it as `M`. `Ok(None)` is a clean end of stream (at a frame
    /// boundary); an end inside a frame is [`FrameError::Truncated`]. Cancel-safe (see the type).
    pub async fn recv<M: prost::Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        while self.header_read < self.header.len() {
            let n = self.inner.read(&mut self.header[self.header_read..]).await.map_err(FrameError::from_io)?;
            if n == 0 {
                return if self.header_read == 0 { Ok(None) } else { Err(FrameError::Truncated) };
            }
            self.header_read += n;
        }
        let len = u32::from_be_bytes(self.header) as usize;
        if len > self.max {
            return Err(FrameError::Oversized { len, max: self.max });
        }
        while self.body_read < len {
            if self.body_read == self.buf.len() {
                // Doubling (few copies for a large frame), but never more than GROW_STEP past
                // the bytes received.
                let grown = (self.buf.len() * 2).max(4096).min(self.body_read + GROW_STEP).min(len);
                self.buf.reserve_exact(grown - self.buf.len());
                self.buf.resize(grown, 0);
            }
            let n = self.inner.read(&mut self.buf[self.body_read..]).await.map_err(FrameError::from_io)?;
            if n == 0 {
                return Err(FrameError::Truncated);
            }
            self.body_read += n;
        }
        let decoded = M::decode(&self.buf[..len]);
        self.header_read = 0;
        self.body_read = 0;
        self.buf.clear();
        if self.buf.capacity() > GROW_STEP {
            self.buf = Vec::new();
        }
        Ok(Some(decoded?))
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

    /// A `recv` dropped in the middle of a frame (a `select!` taking another branch) loses
    /// nothing: the next `recv` returns the whole frame, and the stream stays in step.
    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut wire = Vec::new();
        let mut w = FrameWriter::new(&mut wire);
        w.send(&msg(1, 5000)).await.unwrap();
        w.send(&msg(2, 10)).await.unwrap();
        let mut r = FrameReader::new(b);
        // Two bytes of the header, then a cancelled recv; the rest of the header and part of the
        // body, another cancelled recv; then the rest.
        for (from, to) in [(0, 2), (2, 3000)] {
            a.write_all(&wire[from..to]).await.unwrap();
            let cancelled = tokio::time::timeout(std::time::Duration::from_millis(50), r.recv::<Msg>()).await;
            assert!(cancelled.is_err(), "a partial frame cannot be complete");
        }
        a.write_all(&wire[3000..]).await.unwrap();
        assert_eq!(r.recv::<Msg>().await.unwrap().unwrap(), msg(1, 5000));
        assert_eq!(r.recv::<Msg>().await.unwrap().unwrap(), msg(2, 10));
    }

    /// A header announcing a large frame, with no body behind it, allocates nothing like the
    /// announced size.
    #[tokio::test]
    async fn an_announced_size_is_not_allocated_before_the_bytes_arrive() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&(MAX_FRAME as u32).to_be_bytes()).await.unwrap();
        a.write_all(&[1, 2, 3]).await.unwrap();
        let mut r = FrameReader::new(b);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), r.recv::<Msg>()).await;
        assert!(pending.is_err());
        assert!(r.buf.capacity() <= GROW_STEP, "{} bytes allocated for 3 received", r.buf.capacity());
        drop(a);
        assert!(matches!(r.recv::<Msg>().await.unwrap_err(), FrameError::Truncated));
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
