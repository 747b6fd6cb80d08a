//! `keel search`: the rows of a stored dataset nearest a text, by cosine (the `search`
//! action), printed best first.

use std::time::Duration;

use anyhow::Context;
use keel::flight::actions::SearchResponse;

#[derive(clap::Args)]
pub struct SearchArgs {
    /// The text to search for, e.g. "BRCA1 frameshift_variant".
    text: String,
    /// The dataset to search (stored with `keel produce --dataset NAME`).
    #[arg(long)]
    dataset: String,
    /// How many rows to return (at most the server's server.search_max_k, 1000 by default).
    #[arg(short, long, default_value_t = 10)]
    k: usize,
    /// Server address.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    to: String,
    #[command(flatten)]
    auth: keel::flight::client::ClientAuth,
    /// Print the whole JSON answer instead of one line per row.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SearchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client =
            keel::flight::client::connect_with(&args.to, Duration::from_secs(10), &args.auth)
                .await?;
        let body = serde_json::json!({ "dataset": args.dataset, "text": args.text, "k": args.k });
        let answer: SearchResponse =
            keel::flight::client::action(&mut client, "search", serde_json::to_vec(&body)?)
                .await
                .context("search")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
        for hit in &answer.results {
            let text = hit["text"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| hit.to_string());
            println!(
                "{:.4}  row {:>8}  {text}",
                hit["score"].as_f64().unwrap_or(f64::NAN),
                hit["row"]
            );
        }
        eprintln!(
            "keel search: {} of {} rows of {:?}",
            answer.results.len(),
            answer.scanned_rows,
            args.dataset
        );
        Ok(())
    })
}
