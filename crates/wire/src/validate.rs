//! The path from raw `FlightData` to validated slice texts with no network, model or
//! server: the same [`decode`](crate::decode), [`Target::parse`], [`Slicer`] and text
//! extraction that a stream runs, in the same order. The fuzz target `flight_data` and
//! tests drive it; any input must end in texts or an error, never a panic or a hang.

use std::num::NonZeroUsize;

use arrow_flight::FlightData;
use futures::{StreamExt, stream};

use crate::WireError;
use crate::decode::decode;
use crate::descriptor::Target;
use crate::slicer::Slicer;

/// The texts of every slice a stream of `messages` would be cut into.
pub async fn validate_messages(
    messages: Vec<FlightData>,
    default_text_column: &str,
    slice_rows: NonZeroUsize,
) -> Result<Vec<Vec<Option<String>>>, WireError> {
    let mut messages = messages.into_iter();
    let first = messages
        .next()
        .ok_or_else(|| WireError::invalid("the stream ended before its first message"))?;
    let (descriptor, mut batches) = decode(first, stream::iter(messages.map(Ok)));
    let target = Target::parse(descriptor.as_ref(), default_text_column)?;
    let mut slicer = Slicer::new(target.source().clone(), slice_rows);
    let mut out = Vec::new();
    while let Some(batch) = batches.next().await {
        for slice in slicer.slices(&batch?)? {
            out.push(slicer.texts(&slice)?);
        }
    }
    Ok(out)
}
