//! Embedding: the sentence model and the workers that run it.
//!
//! [`model`] is pure computation (tokenizer, BERT on burn, pooling). [`pool`] runs model
//! replicas on dedicated threads, one per configured worker, each with its own rayon
//! pool, because two replicas on one core each beat one replica on two cores.

pub mod actor;
pub mod config;
pub mod model;
pub mod pool;
pub mod service;
