//! Signals: SIGTERM (ECS, Kubernetes, `docker stop`) and SIGINT (Ctrl-C) start a graceful
//! shutdown; a second signal exits at once.
//!
//! The handlers are installed before anything that can block, so a signal that arrives
//! while the process is still starting is not lost (as PID 1 in a container, an
//! unhandled SIGTERM would otherwise be ignored until the SIGKILL).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Installed signal handlers.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// The OS refused to install a handler.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first signal; a second one exits the process at once.
    pub async fn first(mut self) {
        let name = self.next().await;
        tracing::info!(
            signal = name,
            "Shutting down gracefully; send it again to exit at once."
        );
        tokio::spawn(async move {
            let name = self.next().await;
            tracing::warn!(signal = name, "Second signal: exiting now.");
            std::process::exit(130);
        });
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
