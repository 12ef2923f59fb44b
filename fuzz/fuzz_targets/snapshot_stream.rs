//! Any byte string fed to the snapshot stream reader: it must return records or a clear error,
//! never panic, hang, or allocate by an untrusted length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = vmfork_format::Reader::new(data) {
        let mut total = 0usize;
        while let Ok(Some(record)) = reader.next_record() {
            total += record.body.len();
            // Bodies come from the input: never more than it holds.
            assert!(total <= data.len());
            let _ = record.name();
        }
    }
});
