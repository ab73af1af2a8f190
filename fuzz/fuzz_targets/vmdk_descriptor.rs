//! Arbitrary text as a VMDK descriptor: parsed into an image or refused with a typed error,
//! never a panic; what parses names its extent beside the descriptor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let desc = Path::new("/datastore/vm/disk.vmdk");
    if let Ok(img) = master_target::vmdk::parse_descriptor(desc, text) {
        assert_eq!(img.data_path.parent(), desc.parent(), "{img:?}");
    }
});
