//! The embedder's member of the cleanup protocol.
//!
//! The replicas run on their own threads (see [`super::service`]); this small actor is
//! how the supervisor reaches them. On the CPU backend a forward pass keeps nothing after
//! it returns — activations, masks and token buffers are owned by the pass and dropped
//! with it — so a cleanup has nothing pooled to drop; on device backends it returns the
//! device's pooled memory (`Device::memory_cleanup`).

use std::time::Instant;

use actix::{Actor, Context, Handler, MessageResult};
use burn::tensor::Device;

use crate::supervisor::messages::{Cleanup, CleanupAck};

pub struct EmbedderJanitor {
    device: Device,
    pooled_device_memory: bool,
}

impl EmbedderJanitor {
    /// `pooled_device_memory`: whether the backend keeps a memory pool (GPU backends).
    pub fn new(device: Device, pooled_device_memory: bool) -> Self {
        Self {
            device,
            pooled_device_memory,
        }
    }
}

impl Actor for EmbedderJanitor {
    type Context = Context<Self>;
}

impl Handler<Cleanup> for EmbedderJanitor {
    type Result = MessageResult<Cleanup>;

    fn handle(&mut self, _: Cleanup, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let detail = if self.pooled_device_memory {
            self.device.memory_cleanup();
            "returned pooled device memory".to_string()
        } else {
            "CPU backend: passes keep no scratch between batches".to_string()
        };
        MessageResult(CleanupAck {
            actor: "embedder",
            freed_bytes: 0,
            detail,
            duration: started.elapsed(),
        })
    }
}
