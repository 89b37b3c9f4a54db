//! Snapshot files (`snapshot::Image::decode`), three ways chosen by byte 0:
//! the raw bytes as a file; the rest as a payload behind a header that
//! passes (magic, version, length, checksum), so the rkyv archive and its
//! validation are what is tested; or a structured image (mostly within the
//! rules) encoded, then decoded.
//!
//! Checked: no panic; whatever decodes encodes and decodes again to the
//! same image; a structured image decodes exactly when the rules of
//! `Image::decode` (written again here from its documentation) say it may,
//! and then to itself.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use slg_gateway::snapshot::{Image, SnapshotError};
use slg_gateway_fuzz::image;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => round_trip(rest),
        1 => round_trip(&image::wrap(rest)),
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok(img) = image::image(&mut u) else {
                return;
            };
            let bytes = img.encode().expect("an image encodes");
            let back = Image::decode(&bytes);
            match image::model_check(&img) {
                Ok(()) => assert_eq!(back, Ok(img), "a valid image did not round-trip"),
                Err(rule) => assert!(
                    matches!(back, Err(SnapshotError::Bounds { .. })),
                    "an image breaking `{rule}` decoded as {back:?}"
                ),
            }
        }
    }
});

fn round_trip(bytes: &[u8]) {
    let Ok(img) = Image::decode(bytes) else {
        return;
    };
    let again = img.encode().expect("a decoded image encodes");
    assert_eq!(Image::decode(&again), Ok(img));
}
