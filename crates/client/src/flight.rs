//! Connecting to a Keel server as a Flight client (`keel produce`, `keel search`, the soak).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow_flight::FlightClient;

/// How a client proves itself: a bearer token, and the CA that signed a TLS server's
/// certificate (`grpc+tls://`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientAuth {
    /// Bearer token for a server with `auth.mode` token or basic.
    #[arg(long, env = "KEEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (with grpc+tls://).
    #[arg(long, env = "KEEL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// Connects to `grpc://HOST:PORT` (or `grpc+tcp://`, or `grpc+tls://` for TLS), retrying
/// for up to `timeout` while the server is still starting.
pub async fn connect(to: &str, timeout: Duration) -> anyhow::Result<FlightClient> {
    connect_with(to, timeout, &ClientAuth::default()).await
}

/// [`connect`] with a token and a TLS trust root.
pub async fn connect_with(
    to: &str,
    timeout: Duration,
    auth: &ClientAuth,
) -> anyhow::Result<FlightClient> {
    let tls = to.starts_with("grpc+tls://");
    let uri = to
        .replacen("grpc+tcp://", "http://", 1)
        .replacen("grpc+tls://", "https://", 1)
        .replacen("grpc://", "http://", 1);
    let mut endpoint =
        tonic::transport::Channel::from_shared(uri).with_context(|| format!("bad address {to}"))?;
    if tls {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &auth.tls_ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading the CA {}", ca.display()))?;
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(config)?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                let mut client = FlightClient::new(channel);
                if let Some(token) = &auth.token {
                    client
                        .add_header("authorization", &format!("Bearer {token}"))
                        .context("the token is not a valid header value")?;
                }
                return Ok(client);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "server not up yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("cannot connect to {to}: {e}"),
        }
    }
}

/// Runs a `DoAction` and parses its one JSON result into `T` (the action's typed answer:
/// `keel_engine::stats::Stats`, `SearchResponse`, `CleanupRecord`, ...).
pub async fn action<T: serde::de::DeserializeOwned>(
    client: &mut FlightClient,
    kind: &str,
    body: Vec<u8>,
) -> anyhow::Result<T> {
    use futures::StreamExt;
    let mut results = client
        .do_action(arrow_flight::Action::new(kind.to_string(), body))
        .await?;
    let bytes = results
        .next()
        .await
        .with_context(|| format!("the {kind} action returned nothing"))??;
    serde_json::from_slice(&bytes).with_context(|| format!("the {kind} action's answer"))
}
