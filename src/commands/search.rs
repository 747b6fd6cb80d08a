//! `keel search`: the rows of a stored dataset nearest a text, by cosine (the `search`
//! action), printed best first.

use std::time::Duration;

use anyhow::Context;
use keel_engine::sink::search::SearchMode;
use keel_wire::contract::SearchResponse;

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
    auth: keel_client::flight::ClientAuth,
    /// exact (score every row), index (the dataset's index) or auto (the index when there is one).
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Candidates rescored against the stored vectors (default: the index's).
    #[arg(long)]
    rescore: Option<usize>,
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
            keel_client::flight::connect_with(&args.to, Duration::from_secs(10), &args.auth)
                .await?;
        let mut body = serde_json::json!({
            "dataset": args.dataset, "text": args.text, "k": args.k, "mode": args.mode,
        });
        if let Some(r) = args.rescore {
            body["rescore"] = r.into();
        }
        let answer: SearchResponse =
            keel_client::flight::action(&mut client, "search", serde_json::to_vec(&body)?)
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
        match answer.mode {
            SearchMode::Index => eprintln!(
                "keel search: {} rows of {:?} through its index ({} rows indexed, {} candidates; {} newer rows scanned)",
                answer.results.len(),
                args.dataset,
                answer.indexed_rows,
                answer.candidates,
                answer.scanned_rows
            ),
            _ => eprintln!(
                "keel search: {} of {} rows of {:?} (exact scan)",
                answer.results.len(),
                answer.scanned_rows,
                args.dataset
            ),
        }
        Ok(())
    })
}
