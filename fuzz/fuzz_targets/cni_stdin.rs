//! The CNI plugin's input: the network config on stdin (before the first NUL byte) and the
//! subnet file (after it; a valid one when there is no NUL). Parsing and rendering the
//! delegate never panic; a rendered delegate is an object naming its plugin type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::cni::{SubnetInfo, parse_netconf, render_delegate};

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

fuzz_target!(|data: &[u8]| {
    let (stdin, env) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], String::from_utf8_lossy(&data[i + 1..]).into_owned()),
        None => (data, SUBNET_ENV.to_string()),
    };
    let Ok(conf) = parse_netconf(stdin) else { return };
    let parsed = weft_core::subnet_env::parse(&env);
    let Ok(info) = SubnetInfo::from_env(&parsed, "subnet.env") else { return };
    if let Ok(d) = render_delegate(&conf, &info) {
        assert!(d.is_object(), "{d}");
        assert!(d["type"].is_string(), "{d}");
    }
});
