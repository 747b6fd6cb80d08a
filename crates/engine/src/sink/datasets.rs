//! The sink's writer thread: every append goes through it, in arrival order, so
//! concurrent producers to one dataset never race on a part number. Reads go straight to
//! the [`DatasetStore`] (parts are immutable once renamed into place).

use std::sync::Arc;

use arrow_array::RecordBatch;
use tokio::sync::{mpsc, oneshot};

use super::config::IndexConfig;
use super::index::Indexes;
use super::store::{DatasetStore, SinkError};

enum SinkMsg {
    Append {
        name: String,
        batches: Vec<RecordBatch>,
        reply: oneshot::Sender<Result<u64, SinkError>>,
    },
    /// Finish what is queued before this, then exit.
    Stop,
}

/// Sends appends to the sink thread; reads go straight to the store (parts are immutable
/// once renamed into place, so reading never races a write).
#[derive(Clone)]
pub struct SinkWriter {
    tx: mpsc::Sender<SinkMsg>,
    store: Arc<DatasetStore>,
    indexes: Arc<Indexes>,
}

impl SinkWriter {
    /// Starts the sink thread over `store` (rooted at `root`); at most `queue_depth`
    /// appends wait. Datasets with an index have it grown after each append (by the
    /// indexer thread, which the sink thread stops and joins when it exits).
    pub fn start(
        store: DatasetStore,
        root: &std::path::Path,
        queue_depth: usize,
        index: IndexConfig,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let store = Arc::new(store);
        let (indexes, indexer) = Indexes::start(store.clone(), root, index);
        let (tx, mut rx) = mpsc::channel::<SinkMsg>(queue_depth.max(1));
        let thread_store = store.clone();
        let thread_indexes = indexes.clone();
        let thread = std::thread::Builder::new()
            .name("keel-sink".into())
            .spawn(move || {
                while let Some(SinkMsg::Append {
                    name,
                    batches,
                    reply,
                }) = rx.blocking_recv()
                {
                    let result = thread_store.append(&name, &batches);
                    match &result {
                        Ok(_) => thread_indexes.appended(&name),
                        Err(e) => tracing::warn!(dataset = %name, error = %e, "append failed"),
                    }
                    let _ = reply.send(result);
                }
                thread_indexes.stop();
                let _ = indexer.join();
            })
            .expect("the sink thread starts");
        (Self { tx, store, indexes }, thread)
    }

    /// Appends `batches` as one part; resolves once they are durable, with the rows stored.
    pub async fn append(&self, name: &str, batches: Vec<RecordBatch>) -> Result<u64, SinkError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(SinkMsg::Append {
                name: name.to_string(),
                batches,
                reply,
            })
            .await
            .map_err(|_| SinkError::Closed)?;
        rx.await.map_err(|_| SinkError::Closed)?
    }

    /// Asks the sink thread to exit once the appends queued so far are written.
    pub fn stop(&self) {
        let _ = self.tx.blocking_send(SinkMsg::Stop);
    }

    pub fn store(&self) -> &Arc<DatasetStore> {
        &self.store
    }

    pub fn indexes(&self) -> &Arc<Indexes> {
        &self.indexes
    }
}
