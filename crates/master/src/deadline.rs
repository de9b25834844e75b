//! The deadline of the client request being served (gRPC `grpc-timeout`), so that a master that
//! waits on its behalf (for a live leader, a commit, a forwarded write's answer) answers in time
//! with what it knows, instead of being cut off when the client gives up.
//!
//! A layer around the gRPC server reads the header and runs the handler with the deadline in a
//! task-local; `answer_by` gives the time to answer by, a little before the client's deadline.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures::future::Either;
use tokio::{task::futures::TaskLocalFuture, time::Instant};
use tonic::codegen::{Service, http};

tokio::task_local! {
    static DEADLINE: Instant;
}

/// How much earlier than its client's deadline a master answers (the answer must still travel).
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// When the request being served must be answered by; None without a client deadline (or
/// outside a request: controllers, internal writes).
pub(crate) fn answer_by() -> Option<Instant> {
    let deadline = DEADLINE.try_with(|d| *d).ok()?;
    let margin = ANSWER_MARGIN.min(deadline.saturating_duration_since(Instant::now()) / 4);
    Some(deadline.checked_sub(margin).unwrap_or(deadline))
}

/// The earlier of `at` and the request's answer-by time.
pub(crate) fn bounded(at: Instant) -> Instant {
    answer_by().map_or(at, |by| by.min(at))
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 || !v.is_ascii() {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs every request's handler with its client's deadline in reach of [`answer_by`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DeadlineLayer;

impl<S> tower_layer::Layer<S> for DeadlineLayer {
    type Service = WithDeadline<S>;

    fn layer(&self, inner: S) -> WithDeadline<S> {
        WithDeadline { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct WithDeadline<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for WithDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<TaskLocalFuture<Instant, S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let fut = self.inner.call(req);
        match timeout {
            Some(t) => Either::Left(DEADLINE.scope(Instant::now() + t, fut)),
            None => Either::Right(fut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5000000u"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("-5S"), None);
    }

    #[tokio::test]
    async fn handlers_see_their_clients_deadline() {
        assert_eq!(answer_by(), None, "outside a request");
        let deadline = Instant::now() + Duration::from_secs(5);
        let by = DEADLINE.scope(deadline, async { answer_by() }).await.unwrap();
        assert_eq!(deadline - by, ANSWER_MARGIN);
        // A short deadline keeps most of itself.
        let soon = Instant::now() + Duration::from_millis(400);
        let by = DEADLINE.scope(soon, async { answer_by() }).await.unwrap();
        assert!(soon - by <= Duration::from_millis(100));
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(DEADLINE.scope(deadline, async { bounded(far) }).await, deadline - ANSWER_MARGIN);
    }
}
