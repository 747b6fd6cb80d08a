//! Settings: every actor's configuration, composed, loaded once and validated once.
//!
//! Sources, later ones winning: `configs/default.yaml` semantics built into the types'
//! defaults → the YAML file given with `--config` → environment variables
//! `KEEL_<SECTION>__<KEY>` (e.g. `KEEL_EMBEDDER__WORKERS=2`). Unknown keys are errors that
//! name the key, so a typo never silently falls back to a default. Nothing downstream
//! re-reads configuration: commands get the validated [`Settings`].

use std::path::Path;

use anyhow::Context;
use keel_actors::embedding::config::EmbedderConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub embedder: EmbedderConfig,
}

impl Settings {
    /// Loads `file` (if given) with environment overrides, then validates.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!("configuration file {} does not exist", file.display());
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Yaml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("KEEL")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| match file {
                Some(f) => format!(
                    "invalid configuration in {} or KEEL_* variables",
                    f.display()
                ),
                None => "invalid configuration in KEEL_* variables".to_string(),
            })?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.embedder.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
    }

    #[test]
    fn every_shipped_config_loads_and_validates() {
        let mut seen = 0;
        for entry in std::fs::read_dir(configs_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Settings::load(Some(&path)).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }

    #[test]
    fn default_yaml_spells_out_the_built_in_defaults() {
        let loaded = Settings::load(Some(&configs_dir().join("default.yaml"))).unwrap();
        assert_eq!(loaded, Settings::default());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let dir = std::env::temp_dir().join(format!("keel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("typo.yaml");
        std::fs::write(&file, "embedder:\n  wrokers: 2\n").unwrap();
        let err = format!("{:#}", Settings::load(Some(&file)).unwrap_err());
        assert!(err.contains("wrokers"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected_with_their_key() {
        let dir = std::env::temp_dir().join(format!("keel-config-v-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("zero.yaml");
        std::fs::write(&file, "embedder:\n  max_batch_rows: 0\n").unwrap();
        let err = format!("{:#}", Settings::load(Some(&file)).unwrap_err());
        assert!(err.contains("embedder.max_batch_rows"), "{err}");
    }
}
