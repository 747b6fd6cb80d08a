//! [`Datasets`]: the server's stored datasets behind one facade. It owns the data
//! directory (opened once), the [`DatasetStore`] that reads it, the writer thread every
//! append goes through (in arrival order, so concurrent producers to one dataset never
//! race on a part number) and the [`Indexes`]. Reads go straight to the store (parts are
//! immutable once renamed into place).

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
        expect: Option<u64>,
        reply: oneshot::Sender<Result<u64, SinkError>>,
    },
    /// Finish what is queued before this, then exit.
    Stop,
}

/// The datasets under `storage.data_dir`: appends go to the writer thread; reads, searches
/// and indexes go to the store and the indexes (parts are immutable once renamed into
/// place, so reading never races a write).
#[derive(Clone)]
pub struct Datasets {
    tx: mpsc::Sender<SinkMsg>,
    store: Arc<DatasetStore>,
    indexes: Arc<Indexes>,
}

impl Datasets {
    /// Opens the data directory `root` and starts the writer thread; at most
    /// `queue_depth` appends wait. Datasets with an index have it grown after each append
    /// (by the indexer thread, which the writer thread stops and joins when it exits).
    /// `model`: the identity of the model making this server's vectors, recorded beside
    /// each dataset and checked on appends and searches (`None`: not checked).
    pub fn open(
        root: &std::path::Path,
        queue_depth: usize,
        counted_parts: usize,
        index: IndexConfig,
        model: Option<String>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), SinkError> {
        let mut store = DatasetStore::open(root)?.with_counted_parts(counted_parts);
        if let Some(model) = model {
            store = store.with_model(model);
        }
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
                    expect,
                    reply,
                }) = rx.blocking_recv()
                {
                    // A panic writing one dataset must not end the thread every
                    // dataset's appends go through.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        thread_store.append_expecting(&name, &batches, expect)
                    }))
                    .unwrap_or_else(|panic| {
                        Err(SinkError::Failed(format!(
                            "writing the part panicked ({}); this is a bug, please report it",
                            super::store::panic_text(&panic)
                        )))
                    });
                    match &result {
                        Ok(_) => thread_indexes.appended(&name),
                        Err(e) => tracing::warn!(dataset = %name, error = %e, "append failed"),
                    }
                    let _ = reply.send(result);
                }
                thread_indexes.stop();
                let _ = indexer.join();
            })
            .map_err(|e| SinkError::Io {
                path: root.to_path_buf(),
                source: e,
            })?;
        Ok((Self { tx, store, indexes }, thread))
    }

    /// The data directory (`storage.data_dir`).
    pub fn root(&self) -> &std::path::Path {
        self.store.root()
    }

    /// Appends `batches` as one part; resolves once they are durable, with the rows stored.
    /// With `expect`, only if the dataset holds that many rows when the part is written
    /// ([`DatasetStore::append_expecting`]).
    pub async fn append(
        &self,
        name: &str,
        batches: Vec<RecordBatch>,
        expect: Option<u64>,
    ) -> Result<u64, SinkError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(SinkMsg::Append {
                name: name.to_string(),
                batches,
                expect,
                reply,
            })
            .await
            .map_err(|_| SinkError::Closed)?;
        rx.await.map_err(|_| SinkError::Closed)?
    }

    /// Asks the writer thread to exit once the appends queued so far are written.
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
