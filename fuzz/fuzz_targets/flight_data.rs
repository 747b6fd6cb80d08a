//! Raw bytes → `FlightData` messages (`keel_wire::frames`) → the server's decoding,
//! descriptor parsing, schema checks, slicing and text extraction (`keel_wire::validate`,
//! the same `Slicer` a stream runs). Any input must end in texts or an error, never a
//! panic, a hang or unbounded memory.
#![no_main]

use std::num::NonZeroUsize;

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
        let messages = keel_wire::frames::decode(data);
        let slice_rows = NonZeroUsize::new(7).expect("7 is not zero");
        let _ = futures::executor::block_on(keel_wire::validate::validate_messages(
            messages, "text", slice_rows,
        ));
    }
);
