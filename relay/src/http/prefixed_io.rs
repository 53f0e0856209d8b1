//! [`PrefixedIo`]: a stream that first returns the bytes read past the request head while sniffing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose first reads return `prefix` (bytes already read from `inner` while sniffing).
///
/// The prefix is a slice of the sniffing buffer (2 KiB): once it is read (or if it starts empty)
/// it is dropped, so a long-lived connection does not keep that buffer pinned.
pub struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> PrefixedIo<S> {
    /// Wraps `inner` so that `prefix` is read first.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        let prefix = if prefix.is_empty() { Bytes::new() } else { prefix };
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prefixed_io_reads_the_prefix_then_the_stream_and_releases_the_sniff_buffer() {
        use tokio::io::AsyncReadExt;
        let sniff = Bytes::from(vec![9u8; 2048]);
        let keep = sniff.clone();
        let prefix = sniff.slice(2040..);
        drop(sniff);
        let mut io = PrefixedIo::new(prefix, &b"after"[..]);
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"\x09\x09\x09\x09\x09\x09\x09\x09after");
        assert!(keep.is_unique(), "the connection still pins the sniff buffer");

        // An empty prefix (nothing read past the head) holds nothing from the start.
        let mut sniff = Bytes::from(vec![9u8; 2048]);
        let keep = sniff.clone();
        sniff.advance(2048);
        let _io = PrefixedIo::new(sniff, &b""[..]);
        assert!(keep.is_unique());
    }
}
