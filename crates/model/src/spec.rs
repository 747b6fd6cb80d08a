//! What a sentence-transformers model folder says about itself.
//!
//! Reads `config.json` (BERT sizes), `sentence_bert_config.json` (maximum sequence length),
//! `1_Pooling/config.json` (mean or CLS pooling) and `modules.json` (whether a Normalize
//! module follows). Only BERT-family encoders with absolute position embeddings are
//! accepted; anything else is refused here, with the file and the field, before a single
//! weight is read.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Average of the token vectors of the real (unpadded) tokens.
    Mean,
    /// The vector of the first token (`[CLS]`).
    Cls,
}

/// Everything needed to build the encoder and its tokenizer, validated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Texts are truncated to this many tokens, `[CLS]` and `[SEP]` included.
    pub max_seq_length: usize,
    /// The position row of a row's first token: 0 for BERT; for the RoBERTa family
    /// (roberta, xlm-roberta, camembert) `pad_token_id + 1`, as Hugging Face numbers
    /// positions from the padding index on.
    pub position_offset: usize,
    /// Whether texts are lowercased before tokenizing (`do_lower_case` in
    /// `sentence_bert_config.json`, which sentence-transformers applies itself).
    pub lowercase: bool,
    pub pooling: Pooling,
    /// Whether a `Normalize` module follows pooling (vectors get unit L2 norm).
    pub normalize: bool,
}

#[derive(Deserialize)]
struct BertConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_position_type")]
    position_embedding_type: String,
    pad_token_id: Option<usize>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}

#[derive(Deserialize)]
struct SbertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(path: &Path, what: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

impl ModelSpec {
    /// Reads and validates the configuration files of a sentence-transformers folder.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let cfg: BertConfig = read_json(&config_path)?;
        if let Some(kind) = &cfg.model_type {
            // Encoders that share BERT's layout and weight names.
            if !matches!(
                kind.as_str(),
                "bert" | "roberta" | "xlm-roberta" | "camembert"
            ) {
                return Err(invalid(
                    &config_path,
                    format!("model_type {kind:?} is not BERT-family"),
                ));
            }
        }
        if cfg.hidden_act != "gelu" {
            return Err(invalid(
                &config_path,
                format!(
                    "hidden_act {:?} (only exact \"gelu\" is implemented)",
                    cfg.hidden_act
                ),
            ));
        }
        if cfg.position_embedding_type != "absolute" {
            return Err(invalid(
                &config_path,
                format!("position_embedding_type {:?}", cfg.position_embedding_type),
            ));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(invalid(
                &config_path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        if cfg.type_vocab_size == 0 || cfg.num_hidden_layers == 0 || cfg.vocab_size == 0 {
            return Err(invalid(
                &config_path,
                "zero-sized vocabulary, type vocabulary or layer count",
            ));
        }

        // RoBERTa's position ids start after the padding index (Hugging Face's
        // create_position_ids_from_input_ids): the first token reads row pad + 1.
        let position_offset = match cfg.model_type.as_deref() {
            Some("roberta" | "xlm-roberta" | "camembert") => cfg.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        };
        let positions = cfg.max_position_embeddings.saturating_sub(position_offset);
        // sentence_bert_config.json is optional: without it, the position table bounds length.
        let sbert_path = dir.join("sentence_bert_config.json");
        let sbert = if sbert_path.exists() {
            Some(read_json::<SbertConfig>(&sbert_path)?)
        } else {
            None
        };
        let max_seq_length = sbert
            .as_ref()
            .and_then(|s| s.max_seq_length)
            .unwrap_or(positions);
        if max_seq_length < 2 || max_seq_length > positions {
            return Err(invalid(
                &sbert_path,
                format!(
                    "max_seq_length {max_seq_length} must be within 2..={positions} (the \
                     position table's rows{})",
                    if position_offset > 0 {
                        format!(" after the first {position_offset}")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        let lowercase = sbert.is_some_and(|s| s.do_lower_case);

        let (pooling, normalize) = read_modules(dir)?;

        Ok(Self {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            intermediate_size: cfg.intermediate_size,
            max_position_embeddings: cfg.max_position_embeddings,
            type_vocab_size: cfg.type_vocab_size,
            layer_norm_eps: cfg.layer_norm_eps,
            max_seq_length,
            position_offset,
            lowercase,
            pooling,
            normalize,
        })
    }

    /// Rows of the position table a text can use (after the offset).
    pub fn positions(&self) -> usize {
        self.max_position_embeddings - self.position_offset
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Pooling and normalisation from `modules.json` and the pooling module's config.
/// A folder without `modules.json` is a bare transformer: mean pooling, no normalisation
/// (what sentence-transformers itself assumes).
fn read_modules(dir: &Path) -> Result<(Pooling, bool), ModelError> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        return Ok((Pooling::Mean, false));
    }
    let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
    let mut pooling = None;
    let mut normalize = false;
    for module in &modules {
        match module.kind.as_str() {
            "sentence_transformers.models.Transformer" => {}
            "sentence_transformers.models.Normalize" => normalize = true,
            "sentence_transformers.models.Pooling" => {
                let path = dir.join(&module.path).join("config.json");
                let p: PoolingConfig = read_json(&path)?;
                let modes = [
                    p.pooling_mode_cls_token,
                    p.pooling_mode_mean_tokens,
                    p.pooling_mode_max_tokens,
                    p.pooling_mode_mean_sqrt_len_tokens,
                ];
                if modes.iter().filter(|m| **m).count() != 1 {
                    return Err(invalid(&path, "exactly one pooling mode must be set"));
                }
                pooling = Some(if p.pooling_mode_cls_token {
                    Pooling::Cls
                } else if p.pooling_mode_mean_tokens {
                    Pooling::Mean
                } else {
                    return Err(invalid(&path, "only mean and CLS pooling are implemented"));
                });
            }
            other => {
                return Err(invalid(
                    &modules_path,
                    format!("module {other:?} is not supported"),
                ));
            }
        }
    }
    let pooling = pooling.ok_or_else(|| invalid(&modules_path, "no Pooling module listed"))?;
    Ok((pooling, normalize))
}
