//! The index's record decoders (`store/record.rs`: inodes, directory entries) on
//! arbitrary bytes (`nacrithfs::fuzzing::index_records`): an error or a record that
//! encodes back to one decoding the same, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nacrithfs::fuzzing::index_records(data));
