//! `keel validate`: load and check a configuration without starting anything.

use crate::ConfigArgs;
use keel::config::Settings;

#[derive(clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the effective configuration (file + environment) as YAML-like JSON.
    #[arg(long)]
    print: bool,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.config.as_deref())?;
    if args.print {
        println!("{}", serde_json::to_string_pretty(&settings)?);
    }
    eprintln!("keel validate: configuration is valid");
    Ok(())
}
