//! NC06 headers and the region plan built on them (`nacrithfs::fuzzing::header_plan`):
//! parse and read_from agree, regions tile the file and the payload, a parsed header
//! writes back to itself, seeks stay in range. The header CRC is restamped, so every
//! mutation reaches the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nacrithfs::fuzzing::header_plan(data));
