//! Pause points: named places on the read and write paths where a test can stop one
//! operation, run another, and then let the first go on. They make every race of
//! `docs/cache-protocol.md` reproducible without sleeps.
//!
//! In production no hook is installed and each point costs one `None` check.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Where an operation can be paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// A loader has read PostgreSQL and not yet filled any tier.
    AfterDbRead,
    /// A loader is about to fill L2 through the fence.
    BeforeL2Fill,
    /// A loader is about to hand its entry to L1.
    BeforeL1Insert,
    /// A write has committed and not yet touched any cache.
    AfterCommit,
    /// A write has fenced L2 and not yet published the invalidation.
    BeforePublish,
}

type HookFn = dyn Fn(Point, i64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// The installed hook, if any: called at every [`Point`] with the item id.
#[derive(Clone, Default)]
pub struct Hooks(Option<Arc<HookFn>>);

impl Hooks {
    /// Hooks that call `hook` at every point.
    pub fn new<F, Fut>(hook: F) -> Self
    where
        F: Fn(Point, i64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self(Some(Arc::new(move |point, id| Box::pin(hook(point, id)))))
    }

    /// Runs the hook for `point`, if one is installed.
    pub(crate) async fn at(&self, point: Point, id: i64) {
        if let Some(hook) = &self.0 {
            hook(point, id).await;
        }
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hooks(installed)"
        } else {
            "Hooks(none)"
        })
    }
}
