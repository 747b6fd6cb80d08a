//! Connecting to a Keel server as a Flight client (`keel produce`, `keel search`, the soak).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow_flight::FlightClient;

/// Connects to `grpc://HOST:PORT` (or `grpc+tcp://`), retrying for up to `timeout` while
/// the server is still starting.
pub async fn connect(to: &str, timeout: Duration) -> anyhow::Result<FlightClient> {
    let uri = to
        .replacen("grpc+tcp://", "http://", 1)
        .replacen("grpc://", "http://", 1);
    let endpoint =
        tonic::transport::Channel::from_shared(uri).with_context(|| format!("bad address {to}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(FlightClient::new(channel)),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "server not up yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("cannot connect to {to}: {e}"),
        }
    }
}

/// Runs a `DoAction` and parses its one JSON result.
pub async fn action_json(
    client: &mut FlightClient,
    kind: &str,
    body: Vec<u8>,
) -> anyhow::Result<serde_json::Value> {
    use futures::StreamExt;
    let mut results = client
        .do_action(arrow_flight::Action::new(kind.to_string(), body))
        .await?;
    let bytes = results
        .next()
        .await
        .with_context(|| format!("the {kind} action returned nothing"))??;
    Ok(serde_json::from_slice(&bytes)?)
}
