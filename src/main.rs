//! `keel`: the command line. Thin: parse arguments, load settings, hand over to a command.

mod commands;

/// jemalloc, so that live (`allocated`) and held (`resident`) bytes can be read and
/// purged on demand (see keel_engine::memory::allocator).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options at initialisation, before any thread exists: background purging
/// threads, and the decay times of `configs/default.yaml`. `memory.*` keys that differ
/// are applied at start-up (see keel_engine::memory::allocator::configure).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = keel_engine::memory::allocator::MALLOC_CONF;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel", version, about = "Streaming embedding engine", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the engine over Arrow Flight until SIGINT/SIGTERM.
    Serve(commands::serve::ServeArgs),
    /// Stream a VCF/BCF, Parquet, Arrow, CSV/TSV or text file to a server (DoExchange or DoPut).
    Produce(commands::produce::ProduceArgs),
    /// The rows of a stored dataset nearest a text, by cosine.
    Search(commands::search::SearchArgs),
    /// Build a stored dataset's nearest-neighbour index (HNSW), used by later searches.
    Index(commands::index::IndexArgs),
    /// Fit a PCA projection on a stored dataset's vectors (for indexes of fewer dimensions).
    Reduce(commands::index::ReduceArgs),
    /// The soak benchmark: drive an engine, sample memory, write a verdict and a picture.
    Soak(commands::soak::SoakArgs),
    /// Check a configuration file (and KEEL_* variables) without starting anything.
    Validate(commands::validate::ValidateArgs),
    /// Embed texts from stdin (one per line) and write JSON lines to stdout.
    Embed(commands::embed::EmbedArgs),
    /// Run one Flight action (health, stats, cleanup, search) and print its JSON answer.
    Action(commands::action::ActionArgs),
    /// Copy a model folder with its weights stored in f16 or bf16 (half the bytes).
    Convert(commands::convert::ConvertArgs),
    /// Render the records of an annotated VCF as texts (one per line) with a template.
    Texts(commands::texts::TextsArgs),
}

fn main() -> ExitCode {
    // Colour only on a terminal: a log written to a file or a pipe stays plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => commands::serve::run(args),
        Command::Validate(args) => commands::validate::run(args),
        Command::Produce(args) => commands::produce::run(args),
        Command::Search(args) => commands::search::run(args),
        Command::Soak(args) => commands::soak::run(args),
        Command::Index(args) => commands::index::run_index(args),
        Command::Reduce(args) => commands::index::run_reduce(args),
        Command::Embed(args) => commands::embed::run(args),
        Command::Texts(args) => commands::texts::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Action(args) => commands::action::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Options every command that loads settings shares.
#[derive(clap::Args)]
pub struct ConfigArgs {
    /// YAML configuration file (see configs/default.yaml); KEEL_* variables override it.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
}
