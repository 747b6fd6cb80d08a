//! Texts to token ids, exactly as sentence-transformers does it.
//!
//! The model's `tokenizer.json` carries its own padding (fixed to 128) and truncation
//! (128): both are replaced. Padding is off, because batches are padded to their own
//! longest row by the encoder; truncation is at the model's `max_seq_length`, special
//! tokens included, as sentence-transformers does.

use std::path::Path;
use std::sync::Arc;

use tokenizers::{Tokenizer, TruncationParams};

use crate::error::ModelError;

/// Longest text, in bytes, handed to the tokenizer. WordPiece turns a word of more
/// than 100 characters into one `[UNK]`, so `max_seq_length` tokens never need more than
/// ~100 characters each: longer texts are cut (at a character boundary) before
/// tokenizing, which bounds the time and memory a single huge text can cost. Only texts
/// with more than this many characters of whitespace or control characters before their
/// 256th token could tokenize differently, and those are not sentences.
const BYTES_PER_TOKEN_BOUND: usize = 101 * 4;

/// Cloning shares the vocabulary (a few MB): every worker and the HTTP front read one.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Tokenizer>,
    max_len: usize,
    max_bytes: usize,
    /// Lowercase texts first (`do_lower_case`, which sentence-transformers applies
    /// before its tokenizer).
    lowercase: bool,
}

impl TextTokenizer {
    pub fn load(path: &Path, max_len: usize, vocab_size: usize) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                what: e.to_string(),
            })?;
        let tokenizer_vocab = inner.get_vocab_size(true);
        if tokenizer_vocab > vocab_size {
            return Err(ModelError::Tokenizer {
                path: path.to_path_buf(),
                what: format!(
                    "vocabulary of {tokenizer_vocab} tokens exceeds the model's {vocab_size}"
                ),
            });
        }
        Ok(Self {
            inner: Arc::new(inner),
            max_len,
            max_bytes: max_len * BYTES_PER_TOKEN_BOUND,
            lowercase: false,
        })
    }

    /// Lowercases every text before tokenizing when `on` (the model's `do_lower_case`).
    pub fn with_lowercase(mut self, on: bool) -> Self {
        self.lowercase = on;
        self
    }

    /// Token ids of one text, `[CLS]` … `[SEP]`, at most `max_seq_length` of them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_checked(text).map(|(ids, _)| ids)
    }

    /// Token ids as [`encode`](Self::encode) gives them, and whether the text was longer
    /// than the model reads (and so was cut).
    pub fn encode_checked(&self, text: &str) -> Result<(Vec<u32>, bool), ModelError> {
        let lowered;
        let text = if self.lowercase {
            lowered = text.to_lowercase();
            lowered.as_str()
        } else {
            text
        };
        let (text, cut) = if text.len() > self.max_bytes {
            let mut end = self.max_bytes;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            (&text[..end], true)
        } else {
            (text, false)
        };
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| ModelError::Encode(e.to_string()))?;
        let cut = cut || !encoding.get_overflowing().is_empty();
        let mut ids = encoding.get_ids().to_vec();
        debug_assert!(ids.len() <= self.max_len);
        ids.truncate(self.max_len);
        Ok((ids, cut))
    }
}
