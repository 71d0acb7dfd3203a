//! The spans a traced request records below its own: each cache tier's lookup, each
//! PostgreSQL query, each upstream attempt (the gateway's). The gateway exports them over
//! OTLP when `trace.otlp_endpoint` is set.
//!
//! A traced request runs inside [`Recorder::scope`]; the code it calls asks [`start`]
//! for a span's start time, which is `None` unless some request could be recording (one
//! relaxed load when export is off: nothing is allocated and no clock is read), and hands
//! the finished span to [`record`].

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// Set once an exporter exists in this process: before that, no span is timed.
static EXPORTING: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    static CURRENT: Recorder;
}

/// The spans one traced request recorded so far. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<ChildSpan>>>);

/// A finished span below the request's own.
#[derive(Debug, Clone)]
pub struct ChildSpan {
    /// Its name, after OpenTelemetry's conventions (`SELECT items`, `GET`).
    pub name: Cow<'static, str>,
    /// A call to another service (OpenTelemetry's `CLIENT` kind) rather than work in
    /// process (`INTERNAL`).
    pub client: bool,
    pub span_id: u64,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Attributes, named after OpenTelemetry's semantic conventions where one exists.
    pub attributes: Vec<(&'static str, Value)>,
    /// The operation failed (the span's status is `Error`).
    pub failed: bool,
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Value {
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

impl Recorder {
    /// Runs `fut` as a traced request: the spans it records land here.
    pub fn scope<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> + use<F> {
        CURRENT.scope(self.clone(), fut)
    }

    /// The spans recorded so far, leaving none.
    pub fn take(&self) -> Vec<ChildSpan> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Turns span timing on for this process (the exporter calls it once it exists).
pub fn enable() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// The start time of a span, when the task runs a traced request.
#[inline]
pub fn start() -> Option<SystemTime> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    CURRENT.try_with(|_| SystemTime::now()).ok()
}

/// A new span id (never 0, which means none).
pub fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

/// Records the span `finish` describes, which started at `started`: nothing when that
/// is `None` (the request is not traced).
#[inline]
pub fn record(started: Option<SystemTime>, finish: impl FnOnce(SystemTime) -> ChildSpan) {
    let Some(started) = started else {
        return;
    };
    let span = finish(started);
    let _ = CURRENT.try_with(|recorder| {
        recorder
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(span);
    });
}

impl ChildSpan {
    /// A span of work in process named `name`, from `start` to now.
    pub fn internal(name: &'static str, start: SystemTime) -> Self {
        Self {
            name: Cow::Borrowed(name),
            client: false,
            span_id: new_span_id(),
            start,
            end: SystemTime::now(),
            attributes: Vec::new(),
            failed: false,
        }
    }

    /// A call to another service named `name`, from `start` to now.
    pub fn client(name: impl Into<Cow<'static, str>>, start: SystemTime) -> Self {
        Self {
            client: true,
            name: name.into(),
            ..Self::internal("", start)
        }
    }

    /// Marked failed when `failed` is.
    #[must_use]
    pub fn failed(mut self, failed: bool) -> Self {
        self.failed |= failed;
        self
    }

    /// With the attribute `key` = `value`.
    #[must_use]
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }
}

impl From<&'static str> for Value {
    fn from(value: &'static str) -> Self {
        Self::Str(Cow::Borrowed(value))
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Self::Str(Cow::Owned(value))
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Self {
        Self::Bool(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_scoped_task_records_and_only_once_enabled() {
        let recorder = Recorder::default();
        let traced = || async {
            let started = start();
            record(started, |at| ChildSpan::internal("lookup", at));
            started.is_some()
        };
        // Enabled or not, a task outside a scope records nothing and reads no clock.
        assert!(!traced().await);
        enable();
        assert!(!traced().await);
        assert!(recorder.scope(traced()).await);
        let spans = recorder.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, "lookup");
        assert!(spans[0].start <= spans[0].end);
        assert!(recorder.take().is_empty());
    }
}
