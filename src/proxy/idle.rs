//! Bodies that fail when their sender goes quiet for too long.
//!
//! A body is a stream the proxy waits on: a primary that sends an answer's
//! head and then nothing, or a client that sends a request head and then
//! dribbles (or never sends) its body, would hold a connection for ever.
//! [`IdleTimeout`] wraps such a body and fails it once the sender has sent
//! nothing for a while; the failure then travels like any broken body (a
//! reset to the client for an answer, an error answer for a request body
//! icerelay reads whole).
//!
//! Only time spent *waiting on the sender* counts: the clock starts when the
//! reader asks for more and nothing is there, not when the last chunk was
//! delivered, so a slow reader (backpressure) never trips it. The timer is
//! made on the first wait and re-armed only when it fires, so a body that is
//! always there (an empty `GET` body, a fast stream) costs no timer at all.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::time::{Instant, Sleep};

/// Whose silence a body's failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// The primary's answer (`[primary] body_idle_timeout`).
    Primary,
    /// A client's request body (`header_read_timeout`).
    Client,
}

/// The sender of a body went quiet.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .who {
    Stalled::Primary => format!("the primary sent no data for {}; the answer was cut off ([primary] body_idle_timeout)", humantime::format_duration(*.timeout)),
    Stalled::Client => format!("the client sent no request body data for {} (header_read_timeout)", humantime::format_duration(*.timeout)),
})]
pub struct BodyStalled {
    who: Stalled,
    timeout: Duration,
}

/// A body that fails after `timeout` of waiting on its sender.
#[derive(Debug)]
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    who: Stalled,
    /// When the reader started waiting for the next frame; `None` right after one.
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, timeout: Duration, who: Stalled) -> Self {
        Self { inner, timeout, who, waiting_since: None, timer: None }
    }
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting_since = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + this.timeout;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // The timer may be older than this wait: when it fires early it is
        // moved to the real deadline, and only a deadline really passed fails.
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(Some(Err(Box::new(BodyStalled { who: this.who, timeout: this.timeout }))));
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_quiet_sender_fails_but_a_slow_reader_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let mut body = IdleTimeout::new(stream, Duration::from_millis(200), Stalled::Client);
        tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await.expect("send");
        // The reader comes back late (backpressure): the wait starts now.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(body.frame().await.expect("frame").is_ok());
        tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).await.expect("send");
        assert!(body.frame().await.expect("frame").is_ok(), "a frame that is there is never late");
        let started = Instant::now();
        let e = body.frame().await.expect("a failure").expect_err("stalled");
        assert!(Instant::now() - started >= Duration::from_millis(200), "not before the deadline");
        assert!(e.to_string().contains("header_read_timeout"), "{e}");
        drop(tx);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
