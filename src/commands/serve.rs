//! `keel serve`: the engine behind an Arrow Flight endpoint, until SIGINT or SIGTERM.

use crate::ConfigArgs;
use keel_server::app;
use keel_server::config::Settings;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keel-io")
        .build()?;
    runtime.block_on(async move {
        let listen = settings.server.listen;
        let metrics = settings.metrics.clone();
        let http = settings.http.clone();
        let running = app::start(settings)?;
        let listener = app::bind(listen).await?;
        let metrics = match metrics.enabled {
            true => {
                let l = app::bind(metrics.listen).await?;
                let address = l.local_addr()?;
                tracing::info!(%address, "metrics on http://{address}/metrics");
                Some(l)
            }
            false => None,
        };
        let running = match http.enabled {
            true => {
                let l = app::bind(http.listen).await?;
                let address = l.local_addr()?;
                tracing::info!(%address, "HTTP front on http://{address}/v1/embeddings");
                running.with_http(l)
            }
            false => running,
        };
        tracing::info!(address = %listener.local_addr()?, "keel serving Arrow Flight");
        running.serve(listener, metrics, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
