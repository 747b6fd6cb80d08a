//! `keel action`: run one Flight action against a server and print its JSON answer.
//!
//! For scripts and probes without a Flight client of their own: `keel action health`
//! exits 0 once the server is up and warm (a Kubernetes readiness probe, the device
//! check), `keel action stats` prints the figures, `keel action cleanup --body
//! '{"level":"full"}'` asks for a cleanup.

use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(clap::Args)]
pub struct ActionArgs {
    /// The action: health, stats, cleanup, search or heap-profile (docs/FLIGHT.md).
    name: String,
    /// The action's JSON body.
    #[arg(long, default_value = "")]
    body: String,
    /// Server address.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    to: String,
    #[command(flatten)]
    auth: keel_client::flight::ClientAuth,
    /// Keep retrying for up to this many seconds while the server is starting or answers
    /// Unavailable (a GPU engine compiling its kernels); 0 = one try.
    #[arg(long, default_value_t = 0)]
    wait: u64,
}

pub fn run(args: ActionArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(args.wait);
        let connect_wait = Duration::from_secs(args.wait.max(10));
        let mut client =
            keel_client::flight::connect_with(&args.to, connect_wait, &args.auth).await?;
        loop {
            let answer: anyhow::Result<serde_json::Value> = keel_client::flight::action(
                &mut client,
                &args.name,
                args.body.clone().into_bytes(),
            )
            .await;
            match answer {
                Ok(value) => {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline && unavailable(&e) => {
                    tracing::debug!(error = %e, "not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("the {} action", args.name)),
            }
        }
    })
}

fn unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<arrow_flight::error::FlightError>()
            .is_some_and(|f| {
                matches!(f, arrow_flight::error::FlightError::Tonic(s) if s.code() == tonic::Code::Unavailable)
            })
    })
}
