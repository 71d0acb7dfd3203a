//! A timer for a deadline that moves on with every request.
//!
//! Connections keep one timer each for a deadline that each request pushes later (the
//! listener's idle and header clocks and its call back after an answer, an upstream
//! connection's response head). Re-arming
//! a tokio timer per request updates its wheel every time; waking once per period to
//! find that the deadline has moved costs far less.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};

/// Polls `timer` for `deadline`: ready once `deadline` has passed. The timer is moved
/// earlier at once, but later only when it fires before `deadline`.
pub(crate) fn poll_deadline(
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if deadline < timer.deadline() {
        timer.as_mut().reset(deadline);
    }
    loop {
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
}
