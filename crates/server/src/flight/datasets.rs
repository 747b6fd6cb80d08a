//! Stored datasets over Flight: `ListFlights`, `GetFlightInfo`, `GetSchema` and `DoGet`.
//! Reads go straight to the dataset store on blocking threads (parts are immutable once
//! in place, so a read never races the writer).

use arrow_array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{
    FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, SchemaAsIpc, SchemaResult, Ticket,
};
use arrow_ipc::writer::IpcWriteOptions;
use futures::{StreamExt, stream};
use keel_engine::sink::index::IndexReport;
use keel_engine::sink::store::{DatasetInfo, SinkError};
use keel_wire::descriptor::DatasetTicket;
use keel_wire::vectors::VectorFormat;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::error;
use super::stream::BoxStream;
use crate::state::{ServerError, ServerState};

/// Rows per batch when a dataset is streamed back.
const DO_GET_BATCH_ROWS: usize = 8192;

/// Every dataset's `FlightInfo`.
pub async fn list(engine: &ServerState) -> Result<BoxStream<FlightInfo>, Status> {
    let store = engine.datasets.store().clone();
    let infos = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(error::sink)?;
    let indexes = engine.datasets.indexes();
    let flights: Vec<Result<FlightInfo, Status>> = infos
        .iter()
        .map(|i| flight_info(i, indexes.describe(&i.name)))
        .collect();
    Ok(Box::pin(stream::iter(flights)))
}

/// The dataset a descriptor (path `["datasets", NAME]`) names.
pub async fn describe(engine: &ServerState, d: &FlightDescriptor) -> Result<DatasetInfo, Status> {
    let name = keel_wire::descriptor::dataset_of(d)?.to_string();
    engine.dataset(name).await.map_err(error::server)
}

/// A dataset's `FlightInfo`: schema, rows, bytes on disk, and in `app_metadata` (JSON)
/// how its vectors are stored, `{"precision", "dimensions", "vector_bytes_per_row",
/// "index"}`, `index` being its index's report (null without one).
pub fn flight_info(info: &DatasetInfo, index: Option<IndexReport>) -> Result<FlightInfo, Status> {
    let vectors = VectorFormat::of_schema(&info.schema)
        .map(|f| {
            serde_json::json!({
                "precision": f.precision.name(),
                "dimensions": f.dimensions,
                "vector_bytes_per_row": f.bytes_per_row(),
                "index": index,
            })
        })
        .unwrap_or(serde_json::Value::Null);
    FlightInfo::new()
        .try_with_schema(&info.schema)
        .map_err(|e| Status::internal(e.to_string()))
        .map(|fi| {
            fi.with_descriptor(FlightDescriptor::new_path(vec![
                "datasets".into(),
                info.name.clone(),
            ]))
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(info.name.clone())))
            .with_total_records(info.rows as i64)
            .with_total_bytes(info.bytes as i64)
            .with_ordered(true)
            .with_app_metadata(serde_json::to_vec(&vectors).unwrap_or_default())
        })
}

pub fn schema(info: &DatasetInfo) -> Result<SchemaResult, Status> {
    let options = IpcWriteOptions::default();
    SchemaAsIpc::new(&info.schema, &options)
        .try_into()
        .map_err(|e: arrow_schema::ArrowError| Status::internal(e.to_string()))
}

/// `DoGet`: the dataset named by the ticket (or the range of its rows a JSON ticket
/// names), streamed back in order.
pub async fn read(engine: &ServerState, ticket: Ticket) -> Result<BoxStream<FlightData>, Status> {
    let ticket = DatasetTicket::parse(&ticket.ticket).map_err(Status::from)?;
    let info = engine
        .dataset(ticket.dataset.clone())
        .await
        .map_err(error::server)?;
    let store = engine.datasets.store().clone();
    let (tx, rx) = mpsc::channel::<Result<RecordBatch, FlightError>>(2);
    tokio::task::spawn_blocking(move || {
        let result = store.read_range(
            &ticket.dataset,
            ticket.offset,
            ticket.limit,
            DO_GET_BATCH_ROWS,
            |b| tx.blocking_send(Ok(b)).map_err(|_| SinkError::Closed),
        );
        if let Err(e) = result
            && !matches!(e, SinkError::Closed)
        {
            let status = error::server(ServerError::Sink(e));
            let _ = tx.blocking_send(Err(error::into_flight(status)));
        }
    });
    let encoded = FlightDataEncoderBuilder::new()
        .with_schema(info.schema.clone())
        .build(ReceiverStream::new(rx))
        .map(|r| r.map_err(Status::from));
    Ok(Box::pin(encoded))
}
