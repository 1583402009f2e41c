//! The network config (`<prefix>/config` in etcd, net-conf.json): any text an operator
//! writes. Parsing never panics; a config that parses gives subnet ranges inside its
//! Network and a backend spec, and allocation from it stays inside the range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::config::NetworkConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = NetworkConfig::parse(text) else { return };
    if let Some(r) = &cfg.v4 {
        assert!(r.subnet_len >= r.network.prefix_len(), "{r:?}");
        assert!(r.network.contains(&r.subnet_min) && r.network.contains(&r.subnet_max), "{r:?}");
        for s in weft_core::ipam::free_v4(r, [], 4) {
            assert_eq!(s.prefix_len(), r.subnet_len);
            assert!(r.network.contains(&s), "{s} outside {r:?}");
        }
    }
    if let Some(r) = &cfg.v6 {
        assert!(r.subnet_len >= r.network.prefix_len(), "{r:?}");
        for s in weft_core::ipam::free_v6(r, [], 4) {
            assert_eq!(s.prefix_len(), r.subnet_len);
            assert!(r.network.contains(&s), "{s} outside {r:?}");
        }
    }
    if let Ok(spec) = weft_core::backend::BackendSpec::from_config(&cfg.backend) {
        let _ = spec.lease_type();
        let _ = spec.mtu(1500);
        let _ = spec.mtu(0);
    }
});
