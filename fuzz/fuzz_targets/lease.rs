//! Lease keys and values as another host (or a typo) writes them into the store: the first
//! line is the key, the rest the value. Parsing never panics, and what parses survives a
//! round trip through the text weft itself writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::lease::{LeaseAttrs, SubnetKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (key, value) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(k) = key.parse::<SubnetKey>() {
        // The text form names the subnet's network: it parses again, to itself.
        let shown = k.to_string();
        let again: SubnetKey = shown.parse().expect("a key weft prints parses");
        assert_eq!(again.to_string(), shown);
    }
    for v in [value, key] {
        if let Ok(a) = LeaseAttrs::from_json(v) {
            let written = a.to_json();
            let back = LeaseAttrs::from_json(&written).expect("a value weft writes parses");
            assert_eq!(back, a, "{written}");
        }
    }
});
