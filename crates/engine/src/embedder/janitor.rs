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
    /// A replica of each worker group's model (weights shared): the handles to their
    /// devices. `backend: both` has two groups, a GPU's and the CPU's.
    models: Vec<SentenceModel>,
}

impl EmbedderJanitor {
    pub fn new(models: Vec<SentenceModel>) -> Self {
        Self { models }
    }
}

impl Actor for EmbedderJanitor {
    type Context = Context<Self>;
}

impl Handler<Cleanup> for EmbedderJanitor {
    type Result = MessageResult<Cleanup>;

    fn handle(&mut self, _: Cleanup, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let (mut device, mut host) = (0u64, 0u64);
        for model in &self.models {
            let before = model.device().memory();
            if model.release_pooled_memory() {
                let after = model.device().memory();
                let reserved =
                    |m: Option<keel_model::DeviceMemory>| m.map_or(0, |m| m.reserved_bytes);
                device += reserved(before).saturating_sub(reserved(after));
            } else {
                host += model.release_host_buffers() as u64;
            }
        }
        let detail = match (device, host) {
            (0, host) if self.models.iter().all(|m| m.device().is_host()) => {
                format!("released {host} bytes of the replicas' activation buffers")
            }
            (device, 0) if !self.models.iter().any(|m| m.device().is_host()) => {
                format!("returned {device} bytes of pooled device memory")
            }
            (device, host) => format!(
                "returned {device} bytes of pooled device memory and released {host} bytes \
                 of the CPU replicas' activation buffers"
            ),
        };
        MessageResult(CleanupAck::new(
            "embedder",
            device + host,
            detail,
            started.elapsed(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use actix::Actor;
    use keel_model::{Backend, BatchLimits, SentenceModel};

    use super::EmbedderJanitor;
    use crate::cleanup::{Cleanup, CleanupLevel};

    /// Every worker group's buffers are released, not only the first group's: with
    /// `backend: both` the first is the GPU's, and the CPU workers' buffers stayed.
    #[test]
    fn a_cleanup_releases_the_buffers_of_every_group() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2");
        let first = SentenceModel::load(&dir, Backend::Cpu).unwrap();
        let second = SentenceModel::load(&dir, Backend::Cpu).unwrap();
        let limits = BatchLimits {
            max_rows: 8,
            max_tokens: 1024,
        };
        // Only the second group has run a pass: its buffers are what there is to free.
        second.embed(&["BRCA1 missense variant"], limits).unwrap();
        let cleanup = Cleanup {
            level: CleanupLevel::Full,
            reason: "test".into(),
        };
        let ack = actix::System::new()
            .block_on(async move {
                let janitor = EmbedderJanitor::new(vec![first, second]).start();
                janitor.send(cleanup).await
            })
            .unwrap();
        assert!(ack.freed_bytes > 0, "{ack:?}");
        assert!(ack.detail.contains("activation buffers"), "{ack:?}");
    }
}
