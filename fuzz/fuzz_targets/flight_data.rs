//! Raw bytes → `FlightData` messages (`keel::flight::frames`) → the server's decoding,
//! descriptor parsing, schema checks, slicing and text extraction. Any input must end in
//! texts or a status, never a panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // The server catches a panic of arrow-ipc's reader on malformed input and answers
        // InvalidArgument; libfuzzer-sys's hook would abort on it even so. A silent hook
        // instead: a panic that escapes `validate_messages` still aborts (libfuzzer-sys
        // catches it at the target's boundary) and is reported as a crash.
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| {
    let messages = keel::flight::frames::decode(data);
    let _ = futures::executor::block_on(keel::flight::service::validate_messages(
        messages, "text", 7,
    ));
    }
);
