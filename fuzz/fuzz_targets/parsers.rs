//! Everything weft parses from other hosts and files: lease keys and values, the network
//! config, subnet.env, CNI network configs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = text.parse::<weft_core::lease::SubnetKey>();
    let _ = weft_core::lease::LeaseAttrs::from_json(text);
    if let Ok(cfg) = weft_core::config::NetworkConfig::parse(text) {
        let _ = weft_core::backend::BackendSpec::from_config(&cfg.backend);
    }
    let env = weft_core::subnet_env::parse(text);
    if let Ok(conf) = weft_core::cni::parse_netconf(data)
        && let Ok(info) = weft_core::cni::SubnetInfo::from_env(&env, "subnet.env")
    {
        let _ = weft_core::cni::render_delegate(&conf, &info);
    }
    let _ = weft_core::backend::parse_vxlan_backend_data(text);
});
