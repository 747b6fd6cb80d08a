//! `keel index` and `keel reduce`: build a stored dataset's nearest-neighbour index, and
//! fit a PCA projection on it (the `index` and `reduce` actions), printing the answer.

use anyhow::Context;
use keel_engine::sink::index::IndexReport;
use keel_wire::contract::ReduceResponse;

#[derive(clap::Args)]
pub struct IndexArgs {
    /// The dataset to index.
    #[arg(long)]
    dataset: String,
    /// How the graph keeps vectors: f32, f16, int8 or binary (default: storage.index.quantization).
    #[arg(long)]
    quantization: Option<String>,
    /// Index the dataset's vectors through this PCA projection (made by keel reduce).
    #[arg(long)]
    projection: Option<String>,
    /// Links per node (default: storage.index.connectivity).
    #[arg(long)]
    connectivity: Option<usize>,
    /// Candidates kept while adding (default: storage.index.expansion_add).
    #[arg(long)]
    expansion_add: Option<usize>,
    /// Candidates kept while searching (default: storage.index.expansion_search).
    #[arg(long)]
    expansion_search: Option<usize>,
    /// Candidates rescored against the stored vectors per search (default: storage.index.rescore).
    #[arg(long)]
    rescore: Option<usize>,
    #[command(flatten)]
    server: Server,
}

#[derive(clap::Args)]
pub struct ReduceArgs {
    /// The dataset to fit on.
    #[arg(long)]
    dataset: String,
    /// Dimensions to keep.
    #[arg(long)]
    dimensions: usize,
    /// The projection's name (default: pcaN).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    server: Server,
}

#[derive(clap::Args)]
struct Server {
    /// Server address.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    to: String,
    #[command(flatten)]
    auth: keel_client::flight::ClientAuth,
}

/// Runs one action and returns its decoded answer (no deadline: a build takes minutes).
fn call<T: serde::de::DeserializeOwned>(
    server: &Server,
    action: &str,
    body: serde_json::Value,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = keel_client::flight::connect_with(
            &server.to,
            std::time::Duration::from_secs(10),
            &server.auth,
        )
        .await?;
        keel_client::flight::action(&mut client, action, serde_json::to_vec(&body)?)
            .await
            .with_context(|| action.to_string())
    })
}

pub fn run_index(args: IndexArgs) -> anyhow::Result<()> {
    let mut body = serde_json::json!({ "dataset": args.dataset });
    let options = [
        (
            "quantization",
            args.quantization.map(serde_json::Value::from),
        ),
        ("projection", args.projection.map(serde_json::Value::from)),
        (
            "connectivity",
            args.connectivity.map(serde_json::Value::from),
        ),
        (
            "expansion_add",
            args.expansion_add.map(serde_json::Value::from),
        ),
        (
            "expansion_search",
            args.expansion_search.map(serde_json::Value::from),
        ),
        ("rescore", args.rescore.map(serde_json::Value::from)),
    ];
    for (key, value) in options {
        if let Some(v) = value {
            body[key] = v;
        }
    }
    let report: IndexReport = call(&args.server, "index", body)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "keel index: {} rows of {:?} in a {} graph of {} dimensions, {:.1} MB in memory, built in {:.1} s",
        report.rows,
        report.dataset,
        report.quantization.name(),
        report.dimensions,
        report.memory_bytes as f64 / 1e6,
        report.build_seconds
    );
    Ok(())
}

pub fn run_reduce(args: ReduceArgs) -> anyhow::Result<()> {
    let mut body = serde_json::json!({ "dataset": args.dataset, "dimensions": args.dimensions });
    if let Some(name) = args.name {
        body["name"] = name.into();
    }
    let answer: ReduceResponse = call(&args.server, "reduce", body)?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    eprintln!(
        "keel reduce: projection {:?} of {:?}: {} → {} dimensions keep {:.1} % of the variance ({} rows, {:.1} s)",
        answer.name,
        answer.dataset,
        answer.input_dimensions,
        answer.dimensions,
        100.0 * answer.variance_kept,
        answer.rows,
        answer.seconds
    );
    Ok(())
}
