//! Upgraded connections (WebSocket and other `Upgrade`s) tunnelled to upstreams. A
//! tunnel outlives the HTTP connection that asked for it — hyper hands the socket over
//! and that connection's task ends — so the listeners' drain never sees it. Tunnels are
//! tracked here instead: shutdown waits for them until its deadline, then cuts them.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinSet;
use tokio::time::Instant;

/// The open tunnels of one server. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tunnels {
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Tunnels {
    /// Runs `tunnel` as a task of its own, tracked until it ends.
    pub(crate) fn spawn(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        // Reap the tunnels that ended, so the set holds only open ones.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(tunnel);
    }

    /// Waits until every tunnel has ended or `deadline` has passed, then cuts those
    /// still open. Called once the listeners have drained: no request is left that
    /// could open another.
    pub async fn close_by(&self, deadline: Instant) {
        let mut tasks =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        while tasks.try_join_next().is_some() {}
        if tasks.is_empty() {
            return;
        }
        tracing::info!(
            open = tasks.len(),
            "Waiting for upgraded connections to end."
        );
        let all_ended = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all_ended).await.is_err() {
            tracing::warn!(
                open = tasks.len(),
                "Shutdown deadline passed; cutting upgraded connections."
            );
            tasks.shutdown().await;
        }
    }
}
