//! Raw bytes → `FlightData` messages (`keel::flight::frames`) → the server's decoding,
//! descriptor parsing, schema checks, slicing and text extraction. Any input must end in
//! texts or a status, never a panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let messages = keel::flight::frames::decode(data);
    let _ = futures::executor::block_on(keel::flight::service::validate_messages(
        messages, "text", 7,
    ));
});
