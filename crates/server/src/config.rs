//! Settings: every actor's configuration, composed, loaded once and validated once.
//!
//! Sources, later ones winning: the built-in defaults (which `configs/default.yaml` spells
//! out, checked by a test) → the YAML file given with `--config` → environment variables
//! `KEEL_<SECTION>__<KEY>` (e.g. `KEEL_SERVER__LISTEN=0.0.0.0:50051`). Unknown keys are
//! errors that name the key, so a typo never silently falls back to a default. Nothing
//! downstream re-reads configuration: commands get the validated [`Settings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use keel_engine::cache::config::CacheConfig;
use keel_engine::embedder::config::EmbedderConfig;
use keel_engine::ingest::config::IngestConfig;
use keel_engine::memory::config::MemoryConfig;
use keel_engine::sink::config::StorageConfig;
use keel_engine::supervisor::config::SupervisorConfig;
use serde::{Deserialize, Serialize};

/// `server:` section: the Flight endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the Flight service listens on.
    pub listen: SocketAddr,
    /// Largest gRPC message accepted or sent (one record batch from pyarrow is one message).
    pub max_message_bytes: usize,
    /// Streams (DoExchange and DoPut) open at once; more get ResourceExhausted.
    pub max_streams: usize,
    /// A stream that sends nothing for this long is ended with DeadlineExceeded.
    pub idle_timeout_ms: u64,
    /// On SIGINT/SIGTERM, open streams get this long to finish before the server stops.
    pub shutdown_grace_ms: u64,
    /// Most rows one `search` action may return (its `k`).
    pub search_max_k: usize,
    /// TLS: PEM certificate chain and private key (both, or neither for plain text).
    pub tls: TlsConfig,
}

/// `server.tls:`: the server's certificate and key, PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A secret from the configuration: usable, never printed (`Debug`, `keel validate
/// --print`, soak reports and logs show `<redacted>`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every call is let in.
    #[default]
    None,
    /// Every call carries `authorization: Bearer TOKEN` with a configured token.
    Token,
    /// `Handshake` with basic credentials returns a bearer token for the other calls
    /// (configured tokens are accepted too).
    Basic,
}

/// A user for `auth.mode: basic`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicUser {
    pub username: String,
    pub password: Secret,
}

/// `auth:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Bearer tokens accepted.
    pub tokens: Vec<Secret>,
    /// A file of bearer tokens, one per line (added to `tokens`).
    pub token_file: Option<PathBuf>,
    /// Users for basic authentication.
    pub users: Vec<BasicUser>,
    /// A file of `username:password` lines (added to `users`).
    pub users_file: Option<PathBuf>,
    /// Tokens issued by `Handshake` expire after this many seconds.
    pub token_ttl_s: u64,
    /// Most issued tokens kept at once; beyond it the oldest is dropped.
    pub max_issued_tokens: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            tokens: Vec::new(),
            token_file: None,
            users: Vec::new(),
            users_file: None,
            token_ttl_s: 86_400,
            max_issued_tokens: 100_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".parse().expect("a valid address"),
            max_message_bytes: 64 * 1024 * 1024,
            max_streams: 64,
            idle_timeout_ms: 300_000,
            shutdown_grace_ms: 10_000,
            search_max_k: 1000,
            tls: TlsConfig::default(),
        }
    }
}

/// `metrics:` section: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics`, `/health` and `/ready` over HTTP.
    pub enabled: bool,
    /// Address of the HTTP endpoint.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9464".parse().expect("a valid address"),
        }
    }
}

/// `http:` section: the HTTP front (OpenAI's embeddings API, TEI's `/embed`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve the HTTP front beside Flight.
    pub enabled: bool,
    /// Address of the HTTP front.
    pub listen: SocketAddr,
    /// The model name clients send and get back (`model`); `None`: the model folder's name.
    pub model_name: Option<String>,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most texts in one request (and never more than `ingest.max_in_flight_rows`).
    pub max_inputs: usize,
    /// A request that cannot be answered within this long (the engine saturated) gets 503
    /// with `Retry-After`.
    pub queue_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8080".parse().expect("a valid address"),
            model_name: None,
            max_body_bytes: 4 << 20,
            max_inputs: 2048,
            queue_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub ingest: IngestConfig,
    pub embedder: EmbedderConfig,
    pub cache: CacheConfig,
    pub supervisor: SupervisorConfig,
    pub storage: StorageConfig,
    pub memory: MemoryConfig,
    pub metrics: MetricsConfig,
    pub http: HttpConfig,
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
                .try_parsing(true)
                .source(Some(keel_env()?)),
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

    /// Every rule, the cross-field ones included, checked once before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.embedder.validate()?;
        self.ingest.validate().map_err(anyhow::Error::msg)?;
        self.cache.validate().map_err(anyhow::Error::msg)?;
        self.supervisor.validate().map_err(anyhow::Error::msg)?;
        self.storage.validate().map_err(anyhow::Error::msg)?;
        self.memory.validate().map_err(anyhow::Error::msg)?;
        let h = &self.http;
        if h.max_inputs == 0 {
            anyhow::bail!("http.max_inputs: must be at least 1");
        }
        if h.max_body_bytes < 1024 {
            anyhow::bail!("http.max_body_bytes: {} is below 1 KiB", h.max_body_bytes);
        }
        if h.queue_timeout_ms == 0 {
            anyhow::bail!("http.queue_timeout_ms: must be at least 1");
        }
        let s = &self.server;
        if s.max_message_bytes < 1024 * 1024 {
            anyhow::bail!(
                "server.max_message_bytes: {} is below 1 MiB",
                s.max_message_bytes
            );
        }
        if s.max_streams == 0 {
            anyhow::bail!("server.max_streams: must be at least 1");
        }
        if s.idle_timeout_ms == 0 {
            anyhow::bail!("server.idle_timeout_ms: must be at least 1");
        }
        match (&s.tls.cert, &s.tls.key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                for (name, path) in [("cert", cert), ("key", key)] {
                    if !path.is_file() {
                        anyhow::bail!("server.tls.{name}: {} is not a file", path.display());
                    }
                }
            }
            _ => anyhow::bail!("server.tls: set both cert and key, or neither"),
        }
        if self.auth.token_ttl_s == 0 {
            anyhow::bail!("auth.token_ttl_s: must be at least 1");
        }
        if self.auth.max_issued_tokens == 0 {
            anyhow::bail!("auth.max_issued_tokens: must be at least 1");
        }
        if s.search_max_k == 0 {
            anyhow::bail!("server.search_max_k: must be at least 1");
        }
        if self.ingest.micro_batch_rows > self.ingest.slice_rows {
            anyhow::bail!(
                "ingest.micro_batch_rows ({}) must not exceed ingest.slice_rows ({})",
                self.ingest.micro_batch_rows,
                self.ingest.slice_rows
            );
        }
        Ok(())
    }
}

/// Sections of [`Settings`], for telling configuration variables from others.
const SECTIONS: [&str; 10] = [
    "server",
    "auth",
    "ingest",
    "embedder",
    "cache",
    "supervisor",
    "storage",
    "memory",
    "metrics",
    "http",
];

/// The `KEEL_<SECTION>__<KEY>` variables. Other `KEEL_*` variables belong to scripts and
/// are left alone, except a section with a single underscore (`KEEL_SERVER_LISTEN`),
/// which is a typo and an error.
fn keel_env() -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for (key, value) in std::env::vars() {
        let Some(rest) = key.strip_prefix("KEEL_") else {
            continue;
        };
        if rest.contains("__") {
            out.insert(key, value);
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        if let Some(section) = SECTIONS
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        {
            let field = &rest[section.len() + 1..];
            anyhow::bail!(
                "environment variable {key}: sections and keys are separated by two underscores \
                 (KEEL_{}__{field})",
                section.to_ascii_uppercase()
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
    }

    /// A YAML file with `body`, removed when the returned value drops.
    fn write(name: &str, body: &str) -> tempfile::TempPath {
        let file = tempfile::Builder::new()
            .prefix(name)
            .suffix(".yaml")
            .tempfile()
            .unwrap();
        std::fs::write(file.path(), body).unwrap();
        file.into_temp_path()
    }

    /// `docs/CONFIGURATION.md`, made from `configs/default.yaml`: its comments, keys and
    /// defaults, with each key's environment variable.
    fn configuration_reference(yaml: &str) -> String {
        let mut out = String::from(
            "# Configuration reference\n\n\
             Generated from `configs/default.yaml` (a test checks that the two agree; after \
             editing the YAML, regenerate with `KEEL_BLESS=1 cargo nextest run --release \
             configuration_reference`).\n\n",
        );
        let mut comment: Vec<&str> = Vec::new();
        let mut section = String::new();
        let mut parent = String::new();
        let mut preamble = true;
        for line in yaml.lines() {
            let t = line.trim();
            if let Some(c) = t.strip_prefix('#') {
                comment.push(c.trim());
                continue;
            }
            if t.is_empty() {
                if preamble && !comment.is_empty() {
                    out.push_str(&comment.join("\n"));
                    out.push_str("\n\n");
                    comment.clear();
                }
                continue;
            }
            preamble = false;
            let (key, value) = t.split_once(':').expect("key: value lines");
            let indent = line.len() - line.trim_start().len();
            if indent == 2 && value.trim().is_empty() {
                // A nested block (`server.tls:`): its keys follow, indented further.
                parent = format!("{key}.");
                comment.clear();
                continue;
            }
            if indent <= 2 {
                parent.clear();
            }
            let key = format!("{parent}{key}");
            if !line.starts_with(' ') {
                section = key.to_string();
                out.push_str(&format!(
                    "\n## `{section}`\n\n| key | default | environment | meaning |\n|---|---|---|---|\n"
                ));
                comment.clear();
                continue;
            }
            out.push_str(&format!(
                "| `{section}.{key}` | `{}` | `KEEL_{}__{}` | {} |\n",
                value.trim(),
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase().replace('.', "__"),
                comment.join(" ").replace('|', "\\|")
            ));
            comment.clear();
        }
        out
    }

    #[test]
    fn configuration_reference_matches_default_yaml() {
        let yaml = std::fs::read_to_string(configs_dir().join("default.yaml")).unwrap();
        let expected = configuration_reference(&yaml);
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/CONFIGURATION.md");
        if std::env::var_os("KEEL_BLESS").is_some() {
            std::fs::write(&doc, &expected).unwrap();
        }
        let actual = std::fs::read_to_string(&doc).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/CONFIGURATION.md is out of date with configs/default.yaml; regenerate it: \
             KEEL_BLESS=1 cargo nextest run --release configuration_reference"
        );
        // Every key of the built-in defaults is documented.
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        for (section, keys) in defaults.as_object().unwrap() {
            for key in keys.as_object().unwrap().keys() {
                assert!(
                    expected.contains(&format!("| `{section}.{key}` |"))
                        || expected.contains(&format!("| `{section}.{key}.")),
                    "{section}.{key} is missing from configs/default.yaml"
                );
            }
        }
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
        let file = write("typo.yaml", "embedder:\n  wrokers: 2\n");
        let err = format!("{:#}", Settings::load(Some(&*file)).unwrap_err());
        assert!(err.contains("wrokers"), "{err}");
        let file = write("section.yaml", "sever:\n  listen: 127.0.0.1:1\n");
        let err = format!("{:#}", Settings::load(Some(&*file)).unwrap_err());
        assert!(err.contains("sever"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected_with_their_key() {
        let file = write("zero.yaml", "embedder:\n  cpu:\n    max_batch_rows: 0\n");
        let err = format!("{:#}", Settings::load(Some(&*file)).unwrap_err());
        assert!(err.contains("embedder.cpu.max_batch_rows"), "{err}");
        let file = write(
            "cross.yaml",
            "ingest:\n  max_in_flight_rows: 100\n  slice_rows: 200\n",
        );
        let err = format!("{:#}", Settings::load(Some(&*file)).unwrap_err());
        assert!(err.contains("ingest.slice_rows"), "{err}");
        // Each backend computes only in the precisions it has kernels for.
        let file = write("f16cpu.yaml", "embedder:\n  cpu:\n    precision: f16\n");
        let err = format!("{:#}", Settings::load(Some(&*file)).unwrap_err());
        assert!(
            err.contains("embedder.cpu.precision") && err.contains("f16"),
            "{err}"
        );
        let file = write("int8gpu.yaml", "embedder:\n  gpu:\n    precision: int8\n");
        let err = format!("{:#}", Settings::load(Some(&*file)).unwrap_err());
        assert!(
            err.contains("embedder.gpu.precision") && err.contains("int8"),
            "{err}"
        );
        let file = write("int8cpu.yaml", "embedder:\n  cpu:\n    precision: int8\n");
        let loaded = Settings::load(Some(&*file)).unwrap();
        assert_eq!(loaded.embedder.cpu.precision, keel_model::Precision::Int8);
        assert_eq!(loaded.embedder.precision_key(), "cpu=Int8");
    }

    #[test]
    fn environment_overrides_the_file() {
        // SAFETY: nextest runs every test in its own process; nothing else reads the
        // environment concurrently in this one.
        unsafe {
            std::env::set_var("KEEL_SERVER__LISTEN", "127.0.0.1:6000");
            std::env::set_var("KEEL_EMBEDDER__CPU__WORKERS", "3");
        }
        let loaded = Settings::load(Some(&configs_dir().join("default.yaml"))).unwrap();
        unsafe {
            std::env::remove_var("KEEL_SERVER__LISTEN");
            std::env::remove_var("KEEL_EMBEDDER__CPU__WORKERS");
        }
        assert_eq!(loaded.server.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(loaded.embedder.cpu.workers, 3);
    }

    #[test]
    fn single_underscore_section_variables_are_errors_and_script_variables_are_ignored() {
        // SAFETY: as above, one process per test.
        unsafe { std::env::set_var("KEEL_TEST_VENV", "/somewhere") };
        Settings::load(Some(&configs_dir().join("default.yaml")))
            .expect("script variables are not configuration");
        unsafe { std::env::set_var("KEEL_SERVER_LISTEN", "127.0.0.1:1") };
        let err = format!("{:#}", Settings::load(None).unwrap_err());
        unsafe {
            std::env::remove_var("KEEL_SERVER_LISTEN");
            std::env::remove_var("KEEL_TEST_VENV");
        }
        assert!(err.contains("KEEL_SERVER__LISTEN"), "{err}");
    }
}
