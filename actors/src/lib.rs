//! Keel's actors and the pure parts they drive.
//!
//! - [`embedding`]: the BERT sentence model on burn ([`embedding::model`]) and the pool of
//!   worker threads that run its replicas ([`embedding::pool`]).
//! - [`memory`]: readings of this process's memory.
//! - [`template`]: `{field}` templates that turn a row into the text to embed.
//! - [`variants`]: annotated VCF records (VEP `CSQ`, snpEff `ANN`) as template fields.

pub mod embedding;
pub mod memory;
pub mod template;
pub mod variants;
