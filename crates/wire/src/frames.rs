//! A byte framing of a `FlightData` stream, for fuzzing and its saved corpus: one byte
//! picks the first message's descriptor (0: path `["embed"]`, 1: a command whose u16-LE
//! length and bytes follow, 2: path `["datasets", "fuzz"]`, anything else: none), then
//! messages follow as u32-LE header length, header, u32-LE body length, body. Lengths
//! past the end are cut to what is there, so every byte string is a stream.

use arrow_flight::{FlightData, FlightDescriptor};

/// Most messages one input becomes (keeps a fuzz run's iterations short).
const MAX_MESSAGES: usize = 64;

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(bytes.len());
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    head
}

fn len(bytes: &mut &[u8], width: usize) -> usize {
    let raw = take(bytes, width);
    raw.iter()
        .rev()
        .fold(0usize, |acc, b| (acc << 8) | *b as usize)
}

/// The messages a byte string stands for.
pub fn decode(mut bytes: &[u8]) -> Vec<FlightData> {
    let descriptor = match take(&mut bytes, 1).first() {
        Some(0) => Some(FlightDescriptor::new_path(vec!["embed".into()])),
        Some(1) => {
            let n = len(&mut bytes, 2);
            Some(FlightDescriptor::new_cmd(take(&mut bytes, n).to_vec()))
        }
        Some(2) => Some(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "fuzz".into(),
        ])),
        _ => None,
    };
    let mut out = Vec::new();
    while !bytes.is_empty() && out.len() < MAX_MESSAGES {
        let h = len(&mut bytes, 4);
        let header = take(&mut bytes, h).to_vec();
        let b = len(&mut bytes, 4);
        let body = take(&mut bytes, b).to_vec();
        out.push(FlightData {
            data_header: header.into(),
            data_body: body.into(),
            ..Default::default()
        });
    }
    if out.is_empty() {
        out.push(FlightData::default());
    }
    out[0].flight_descriptor = descriptor;
    out
}

/// The byte string of a stream with `descriptor` (path `["embed"]` or a command).
pub fn encode(descriptor: &FlightDescriptor, messages: &[FlightData]) -> Vec<u8> {
    let mut out = Vec::new();
    if descriptor.path == ["embed"] {
        out.push(0);
    } else {
        out.push(1);
        out.extend((descriptor.cmd.len() as u16).to_le_bytes());
        out.extend(&descriptor.cmd[..]);
    }
    for m in messages {
        out.extend((m.data_header.len() as u32).to_le_bytes());
        out.extend(&m.data_header[..]);
        out.extend((m.data_body.len() as u32).to_le_bytes());
        out.extend(&m.data_body[..]);
    }
    out
}
