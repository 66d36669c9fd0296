//! The signals that stop a long-running command: Ctrl-C and SIGTERM (what Kubernetes and
//! systemd send).

/// Resolves at the first Ctrl-C or SIGTERM.
pub(crate) async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
