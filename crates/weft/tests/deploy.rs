//! deploy/: every manifest document is a valid Kubernetes object of a type k8s-openapi
//! knows, with no field that type does not know (a misspelt key would be silently dropped
//! by the API server); the pieces fit together (RBAC, ConfigMap, probes, flags that weft
//! accepts); and `weft install-cni` installs atomically, idempotently and safely.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn manifest_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kube-weft.yml");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn documents(text: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).expect("the manifest is YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

/// Decodes a document into its k8s-openapi type and back; an error names the fields the
/// type does not know, or why it does not decode.
fn check_typed(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    let av = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    let rt = match (av, kind) {
        ("v1", "Namespace") => roundtrip::<core::Namespace>(doc),
        ("v1", "ServiceAccount") => roundtrip::<core::ServiceAccount>(doc),
        ("v1", "ConfigMap") => roundtrip::<core::ConfigMap>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => roundtrip::<rbac::ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => roundtrip::<rbac::ClusterRoleBinding>(doc),
        ("apps/v1", "DaemonSet") => roundtrip::<apps::DaemonSet>(doc),
        _ => Err(format!("no type known for apiVersion {av:?} kind {kind:?}")),
    }?;
    let unknown = weft::apiserver::resources::unknown_fields(doc, &rt);
    if !unknown.is_empty() {
        return Err(format!("unknown fields: {}", unknown.join(", ")));
    }
    if rt != *doc {
        return Err(format!("the typed form differs:\n{rt:#}\nvs\n{doc:#}"));
    }
    Ok(())
}

fn check_all(text: &str) -> Vec<String> {
    documents(text)
        .iter()
        .filter_map(|d| check_typed(d).err().map(|e| format!("{} {}: {e}", d["kind"], d["metadata"]["name"])))
        .collect()
}

#[test]
fn every_manifest_document_is_a_known_type_without_unknown_fields() {
    let text = manifest_text();
    let docs = documents(&text);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "ConfigMap", "DaemonSet"]);
    assert_eq!(check_all(&text), Vec::<String>::new());
}

#[test]
fn a_misspelt_or_misplaced_key_is_caught() {
    let text = manifest_text();
    for (from, to, expect) in [
        ("hostNetwork: true", "hostNetwrok: true", "spec.template.spec.hostNetwrok"),
        ("readinessProbe:", "readynessProbe:", "readynessProbe"),
        ("mountPath: /run/flannel", "mountpath: /run/flannel", "volumeMounts[0].mountpath"),
        ("priorityClassName:", "priorityClass:", "priorityClass"),
        (
            "  labels:\n    k8s-app: flannel\n    pod-security",
            "  label:\n    k8s-app: flannel\n    pod-security",
            "metadata.label",
        ),
        ("verbs: [\"patch\"]", "verbs: [\"patch\"]\n    resource: [\"x\"]", "rules[4].resource"),
        ("failureThreshold: 3", "failureThreshold: three", "invalid type"),
        ("verbs: [\"list\", \"watch\"]", "verb: [\"list\", \"watch\"]", ""),
    ] {
        assert!(text.contains(from), "the manifest changed: {from:?} is gone; update this test");
        let broken = text.replacen(from, to, 1);
        let errors = check_all(&broken);
        assert_eq!(errors.len(), 1, "{to:?} must be caught: {errors:?}");
        assert!(errors[0].contains(expect), "{to:?}: {}", errors[0]);
    }
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_pieces_fit_together() {
    let docs = documents(&manifest_text());
    let ns = doc(&docs, "Namespace")["metadata"]["name"].as_str().unwrap();
    assert_eq!(ns, "kube-flannel", "flannel's namespace: weft and flannel share one cluster");
    for d in docs.iter().filter(|d| ["ServiceAccount", "ConfigMap", "DaemonSet"].contains(&d["kind"].as_str().unwrap()))
    {
        assert_eq!(d["metadata"]["namespace"], ns, "{}", d["kind"]);
    }
    // RBAC: exactly what weft uses.
    let role = doc(&docs, "ClusterRole");
    let mut rules: Vec<(String, String, Vec<String>)> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let verbs: Vec<String> =
                r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
            let groups: Vec<String> =
                r["apiGroups"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(move |res| {
                    let verbs = verbs.clone();
                    groups.clone().into_iter().map(move |g| (g, res.as_str().unwrap().to_string(), verbs.clone()))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    rules.sort();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        [
            ("".into(), "namespaces".into(), s(&["list", "watch"])),
            ("".into(), "nodes".into(), s(&["get", "list", "watch"])),
            ("".into(), "nodes/status".into(), s(&["patch"])),
            ("".into(), "pods".into(), s(&["get", "list", "watch"])),
            ("networking.k8s.io".into(), "networkpolicies".into(), s(&["list", "watch"])),
        ]
    );
    let binding = doc(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]})
    );
    let sa = doc(&docs, "ServiceAccount");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}])
    );

    // The ConfigMap: a network config weft accepts and flannel's conflist.
    let cm = doc(&docs, "ConfigMap");
    let net = cm["data"]["net-conf.json"].as_str().unwrap();
    weft_core::config::NetworkConfig::parse(net).expect("net-conf.json is a valid network config");
    let conf: Value = serde_json::from_str(cm["data"]["cni-conf.json"].as_str().unwrap()).unwrap();
    assert_eq!(conf["plugins"][0]["type"], "flannel");
    assert_eq!(conf["plugins"][0]["delegate"], json!({"hairpinMode": true, "isDefaultGateway": true}));
    assert_eq!(conf["plugins"][1]["type"], "portmap");

    // The DaemonSet.
    let ds = doc(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    // flannel's name and (immutable) selector: applying this over kube-flannel.yml is a rolling update.
    assert_eq!(ds["metadata"]["name"], "kube-flannel-ds");
    assert_eq!(ds["spec"]["selector"], json!({"matchLabels": {"app": "flannel"}}));
    assert_eq!(ds["spec"]["template"]["metadata"]["labels"]["app"], "flannel");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let volumes: Vec<&Value> = pod["volumes"].as_array().unwrap().iter().collect();
    let volume = |name: &str| *volumes.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no volume {name}"));
    assert_eq!(volume("flannel-cfg")["configMap"]["name"], cm["metadata"]["name"]);
    // The host directory (or the ConfigMap) a path in a container lands in.
    let backing = |c: &Value, path: &str| -> Value {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| Path::new(path).starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{path} is on no volume of {}", c["name"]));
        volume(m["name"].as_str().unwrap()).clone()
    };
    for c in pod["initContainers"].as_array().unwrap().iter().chain(pod["containers"].as_array().unwrap()) {
        for m in c["volumeMounts"].as_array().unwrap() {
            volume(m["name"].as_str().unwrap());
        }
    }
    let init = &pod["initContainers"][0];
    let mut argv: Vec<String> =
        init["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    argv.extend(init["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()));
    assert_eq!(argv[..2], ["/usr/local/bin/weft", "install-cni"]);
    let o = weft::install_cni::parse(&argv[2..]).expect("weft install-cni accepts the init container's flags").unwrap();
    assert_eq!(backing(init, o.plugin_dest.as_ref().unwrap().to_str().unwrap())["hostPath"]["path"], "/opt/cni/bin");
    assert_eq!(backing(init, o.conf_dest.as_ref().unwrap().to_str().unwrap())["hostPath"]["path"], "/etc/cni/net.d");
    assert_eq!(o.plugin_dest.unwrap(), PathBuf::from("/opt/cni/bin/flannel"), "the plugin is installed as flannel");
    let conf_vol = backing(init, o.conf_src.to_str().unwrap());
    assert_eq!(conf_vol["configMap"]["name"], cm["metadata"]["name"]);
    assert!(o.conf_src.ends_with("cni-conf.json"));

    let main = &pod["containers"][0];
    assert_eq!(main["command"], json!(["/usr/local/bin/weft", "daemon"]));
    assert_eq!(main["securityContext"]["privileged"], false);
    assert_eq!(main["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    let args: Vec<&str> = main["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let specs = weft::cli::daemon_specs();
    for a in &args {
        let name = a.trim_start_matches('-').split('=').next().unwrap();
        assert!(specs.iter().any(|s| s.name == name), "weft daemon has no flag {a}");
    }
    assert!(args.contains(&"--kube-subnet-mgr"));
    let port: u16 =
        args.iter().find_map(|a| a.strip_prefix("--healthz-port=")).expect("a health port").parse().unwrap();
    assert_eq!(main["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": port}));
    assert_eq!(main["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": port}));
    let netconf = args.iter().find_map(|a| a.strip_prefix("--net-config-path=")).unwrap();
    assert_eq!(backing(main, netconf)["configMap"]["name"], cm["metadata"]["name"]);
    assert!(netconf.ends_with("net-conf.json"));
    assert_eq!(backing(main, "/run/flannel/subnet.env")["hostPath"]["path"], "/run/flannel");
    assert_eq!(backing(main, "/run/xtables.lock")["hostPath"]["type"], "FileOrCreate");
}

// ---- weft install-cni ----

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let s = Scratch { dir: tempfile::tempdir().unwrap() };
        std::fs::create_dir_all(s.p("cfg")).unwrap();
        std::fs::write(s.p("cfg/cni-conf.json"), CONF).unwrap();
        std::fs::write(s.p("plugin"), b"\x7fELF pretend plugin").unwrap();
        s
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, extra: &[&str]) -> (i32, String, String) {
        let o = Command::new(common::weft_bin())
            .arg("install-cni")
            .arg(format!("--plugin-src={}", self.p("plugin").display()))
            .arg(format!("--plugin-dest={}", self.p("opt/cni/bin/flannel").display()))
            .arg(format!("--conf-src={}", self.p("cfg/cni-conf.json").display()))
            .arg(format!("--conf-dest={}", self.p("etc/cni/net.d/10-flannel.conflist").display()))
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into(),
            String::from_utf8_lossy(&o.stderr).into(),
        )
    }

    fn names(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.p(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

const CONF: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_cni_installs_plugin_and_conflist_atomically_and_idempotently() {
    let s = Scratch::new();
    let (code, out, err) = s.run(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("plugin installed") && out.contains("conflist installed"), "{out}");
    let plugin = s.p("opt/cni/bin/flannel");
    let conf = s.p("etc/cni/net.d/10-flannel.conflist");
    assert_eq!(std::fs::read(&plugin).unwrap(), std::fs::read(s.p("plugin")).unwrap());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), CONF);
    assert_eq!((mode(&plugin), mode(&conf)), (0o755, 0o644));
    assert_eq!(s.names("opt/cni/bin"), ["flannel"], "no temp file left");
    assert_eq!(s.names("etc/cni/net.d"), ["10-flannel.conflist"]);

    // Again: nothing to do, the files are not even replaced (same inode).
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (pi, ci) = (ino(&plugin), ino(&conf));
    let (code, out, _) = s.run(&[]);
    assert_eq!(code, 0);
    assert!(out.contains("already up to date"), "{out}");
    assert_eq!((ino(&plugin), ino(&conf)), (pi, ci));

    // A changed ConfigMap replaces the conflist by rename (a new inode, never a partial file).
    let newer = CONF.replace("cbr0", "cbr1");
    std::fs::write(s.p("cfg/cni-conf.json"), &newer).unwrap();
    assert_eq!(s.run(&[]).0, 0);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), newer);
    assert_ne!(ino(&conf), ci);
    assert_eq!(ino(&plugin), pi);

    // A wrong mode is repaired.
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(s.run(&[]).0, 0);
    assert_eq!(mode(&plugin), 0o755);

    // Without --plugin-src it installs itself (weft is the flannel CNI plugin).
    let o = Command::new(common::weft_bin())
        .args(["install-cni", "--conf-dest="])
        .arg(format!("--plugin-dest={}", s.p("self/flannel").display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(s.p("self/flannel")).unwrap(), std::fs::read(common::weft_bin()).unwrap());
}

#[test]
fn install_cni_refuses_bad_input_and_changes_nothing() {
    let s = Scratch::new();
    let plugin = s.p("opt/cni/bin/flannel");
    let conf = s.p("etc/cni/net.d/10-flannel.conflist");

    // A conflist that is not JSON: neither file is installed, the error names the file.
    std::fs::write(s.p("cfg/cni-conf.json"), "{not json").unwrap();
    let (code, _, err) = s.run(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("cni-conf.json") && err.contains("not JSON"), "{err}");
    assert!(!plugin.exists() && !conf.exists(), "a bad config installs nothing");
    std::fs::write(s.p("cfg/cni-conf.json"), r#"{"name":"x","plugins":[]}"#).unwrap();
    let (code, _, err) = s.run(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("non-empty"), "{err}");

    // A missing source, and a source that is a directory.
    std::fs::write(s.p("cfg/cni-conf.json"), CONF).unwrap();
    let (code, _, err) = s.run(&[&format!("--plugin-src={}", s.p("nope").display())]);
    assert_eq!(code, 1);
    assert!(err.contains(&s.p("nope").display().to_string()), "{err}");
    let (code, _, err) = s.run(&["--plugin-src=/dev/zero"]);
    assert_eq!(code, 1);
    assert!(err.contains("/dev/zero: not a regular file"), "{err}");
    let (code, _, err) = s.run(&[&format!("--conf-src={}", s.p("cfg").display())]);
    assert_eq!(code, 1);
    assert!(err.contains("not a regular file"), "{err}");
    assert!(!plugin.exists());

    // A symlink planted at the destination is replaced, its target untouched.
    std::fs::create_dir_all(s.p("etc/cni/net.d")).unwrap();
    std::fs::write(s.p("victim"), "precious").unwrap();
    std::os::unix::fs::symlink(s.p("victim"), &conf).unwrap();
    assert_eq!(s.run(&[]).0, 0);
    assert_eq!(std::fs::read_to_string(s.p("victim")).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&conf).unwrap().file_type().is_file());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), CONF);

    // A destination that is a directory, or under a file: a clear error, nothing removed.
    std::fs::remove_file(&conf).unwrap();
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("keep"), "x").unwrap();
    let (code, _, err) = s.run(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("10-flannel.conflist") && err.contains("directory"), "{err}");
    assert!(conf.join("keep").exists());
    let (code, _, err) = s.run(&[&format!("--conf-dest={}", s.p("plugin/x.conflist").display())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("x.conflist"), "{err}");

    // Usage errors exit 2.
    for bad in [&["--conf-dest=relative.conflist"][..], &["--bogus"], &["--plugin-src="]] {
        let (code, _, err) = s.run(bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(err.contains("Usage"), "{err}");
    }
}
