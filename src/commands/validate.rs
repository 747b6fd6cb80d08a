//! `keel validate`: load and check a configuration without starting anything.

use crate::ConfigArgs;
use keel_server::config::Settings;

#[derive(clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the effective configuration (file + environment) as YAML-like JSON.
    #[arg(long)]
    print: bool,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.config.as_deref())?;
    if args.print {
        println!("{}", serde_json::to_string_pretty(&settings)?);
    }
    eprintln!("keel validate: configuration is valid");
    // What `backend: auto` picks on this machine (it opens no model).
    let choice = settings.embedder.resolve_backend();
    if choice.configured == keel_engine::embedder::config::Backends::Auto {
        println!(
            "embedder.backend: auto picks {} on this machine: {}",
            choice.picked.name(),
            choice.why
        );
    }
    // With the model at hand, the peak its memory can reach (docs/OPERATIONS.md): what a
    // container's memory limit is sized from.
    let dir = &settings.embedder.model_dir;
    if let (Ok(spec), Ok(weights)) = (
        keel_model::ModelSpec::from_dir(dir),
        std::fs::metadata(dir.join("model.safetensors")),
    ) {
        let bound = keel_client::soak::report::memory_bound(&settings, weights.len(), &spec);
        println!(
            "memory bound: {bound} bytes ({} MB) peak RSS with this configuration and model; \
             Keel budgets half of a container's memory limit: give it at least {} MiB",
            bound / 1_000_000,
            (2 * bound).div_ceil(1 << 20)
        );
    }
    Ok(())
}
