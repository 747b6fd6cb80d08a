//! The embedder's member of the cleanup protocol.
//!
//! The replicas run on their own threads (see [`super::workers`]); this small actor is
//! how the supervisor reaches them. On the CPU backend each replica keeps its activation
//! buffers between passes (grown to the largest pass, so that a warm pass allocates
//! nothing): a cleanup releases those of every replica not running a pass, and they grow
//! back with the next one. On device backends it returns the device's pooled memory.

use std::time::Instant;

use actix::{Actor, Context, Handler, MessageResult};
use keel_model::SentenceModel;

use crate::cleanup::{Cleanup, CleanupAck};

pub struct EmbedderJanitor {
    /// A replica of the model (weights shared): the handle to its device.
    model: SentenceModel,
}

impl EmbedderJanitor {
    pub fn new(model: SentenceModel) -> Self {
        Self { model }
    }
}

impl Actor for EmbedderJanitor {
    type Context = Context<Self>;
}

impl Handler<Cleanup> for EmbedderJanitor {
    type Result = MessageResult<Cleanup>;

    fn handle(&mut self, _: Cleanup, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let before = self.model.device().memory();
        let (freed, detail) = if self.model.release_pooled_memory() {
            let after = self.model.device().memory();
            let reserved = |m: Option<keel_model::DeviceMemory>| m.map_or(0, |m| m.reserved_bytes);
            let freed = reserved(before).saturating_sub(reserved(after));
            (
                freed,
                format!("returned {freed} bytes of pooled device memory"),
            )
        } else {
            let freed = self.model.release_host_buffers() as u64;
            (
                freed,
                format!("released {freed} bytes of the replicas' activation buffers"),
            )
        };
        MessageResult(CleanupAck::new(
            "embedder",
            freed,
            detail,
            started.elapsed(),
        ))
    }
}
