//! The shutdown signal, designed in: one future for SIGINT/SIGTERM, turned into a
//! [`CancellationToken`] that every long-running task watches, and the pause such a task
//! takes between rounds, cut short by it. Tests cancel the token themselves instead of
//! sending signals.

use tokio_util::sync::CancellationToken;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
                }
            }
            _ => {
                // Without signal handlers the process still stops on Ctrl-C.
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled when the process is asked to stop.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        signal().await;
        child.cancel();
    });
    token
}

/// Sleeps for `pause`, or until `shutdown` fires if that is sooner. Returns false when the
/// shutdown came first: the caller's loop then ends instead of starting another round.
pub async fn sleep(shutdown: &CancellationToken, pause: std::time::Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(pause) => true,
    }
}
