//! The test Kubernetes API server, proven with two independent real clients: the `kubectl`
//! 1.32 binary and the kube-rs client. The server runs inside a network namespace of the
//! test; the clients reach it there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use weft::apiserver::{ApiServer, Options};
use weft::lab::netns::{Netns, in_netns};

/// One prefix per test process: `common::prefix` removes every namespace of the tag, so it
/// runs once, before any test of this binary has made one.
fn prefix() -> String {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| common::prefix("kap")).clone()
}

const LISTEN: &str = "127.0.0.1:6443";

/// A namespace with a server in it (in-process or a `weft test-apiserver` process).
struct Lab {
    ns: Netns,
    dir: tempfile::TempDir,
    srv: Option<ApiServer>,
    proc: Option<Child>,
}

impl Lab {
    fn new(name: &str) -> Lab {
        let ns = Netns::add(&format!("{}{name}", prefix())).expect("namespace");
        Lab { ns, dir: tempfile::tempdir().unwrap(), srv: None, proc: None }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("api")
    }

    /// Starts the server in this process, listening inside the namespace.
    fn start(mut self, tune: impl FnOnce(&mut Options)) -> Lab {
        let mut o = Options::new(LISTEN.parse().unwrap(), self.state());
        tune(&mut o);
        self.srv = Some(in_netns(&self.ns.name, move || ApiServer::start(o)).unwrap().expect("server starts"));
        self
    }

    /// Starts `weft test-apiserver` inside the namespace and waits until it answers.
    fn spawn(&mut self, extra: &[&str]) {
        let child = self
            .ns
            .command(common::weft_bin())
            .args(["test-apiserver", "--listen", LISTEN, "--dir"])
            .arg(self.state())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(self.dir.path().join("server.log")).unwrap()))
            .spawn()
            .unwrap();
        self.proc = Some(child);
        common::wait_for(Duration::from_secs(20), "the API server to answer /healthz", || {
            let o = self.curl_raw(&["https://127.0.0.1:6443/healthz"], false);
            (String::from_utf8_lossy(&o.stdout).starts_with("ok")).then_some(())
        });
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.state().join("kubeconfig")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.state().join("token")).unwrap().trim().to_string()
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.ns.command("kubectl");
        c.arg("--kubeconfig").arg(self.kubeconfig()).arg("--cache-dir").arg(self.dir.path().join("kcache"));
        c.args(args);
        c
    }

    /// kubectl's output; panics with stderr when it fails.
    fn kubectl(&self, args: &[&str]) -> String {
        let o = self.kubectl_try(args);
        assert!(o.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn kubectl_try(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut c =
            self.kubectl_cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    }

    fn node(&self, name: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", "node", name, "-o", "json"])).unwrap()
    }

    fn curl_raw(&self, args: &[&str], token: bool) -> Output {
        let mut c = self.ns.command("curl");
        c.args(["-sS", "-m", "10", "--cacert"]).arg(self.state().join("ca.crt"));
        if token {
            c.args(["-H", &format!("Authorization: Bearer {}", self.token())]);
        }
        c.args(["-w", "\n%{http_code}"]).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// (HTTP code, body) of a request with the token.
    fn curl(&self, args: &[&str]) -> (u16, String) {
        split_code(&self.curl_raw(args, true))
    }
}

fn split_code(o: &Output) -> (u16, String) {
    let s = String::from_utf8_lossy(&o.stdout);
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", &s));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill9();
        self.srv.take();
    }
}

fn node_json(name: &str, cidr: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}
    })
    .to_string()
}

fn status_of(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON Status ({e}): {body}"));
    assert_eq!(v["kind"], "Status", "{body}");
    v
}

#[test]
fn kubectl_creates_annotates_labels_patches_status_and_deletes_nodes() {
    let lab = Lab::new("ctl").start(|_| {});
    let empty: Value = serde_json::from_str(&lab.kubectl(&["get", "nodes", "-o", "json"])).unwrap();
    assert_eq!(empty["items"], json!([]));

    let out = lab.kubectl_stdin(&["create", "-f", "-"], &node_json("h1", "10.244.1.0/24"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let n = lab.node("h1");
    assert_eq!(n["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
    let uid = n["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 36, "a server-set uid: {uid}");
    assert!(n["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    let rv0: u64 = n["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();

    // A second create of the same name is refused, as the real server does.
    let again = lab.kubectl_stdin(&["create", "-f", "-"], &node_json("h1", "10.244.9.0/24"));
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("AlreadyExists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    lab.kubectl(&["annotate", "node", "h1", "flannel.alpha.coreos.com/backend-type=vxlan"]);
    lab.kubectl(&["label", "node", "h1", "role=worker"]);
    let n = lab.node("h1");
    assert_eq!(n["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"], "vxlan");
    assert_eq!(n["metadata"]["labels"]["role"], "worker");
    assert_eq!(n["metadata"]["labels"]["kubernetes.io/hostname"], "h1", "a label patch keeps the others");
    let rv1: u64 = n["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(rv1 > rv0, "every change raises the resourceVersion ({rv0} -> {rv1})");
    assert_eq!(n["metadata"]["uid"], uid.as_str());

    // flannel's way: annotations and a condition through the status subresource.
    lab.kubectl(&[
        "patch", "node", "h1", "--subresource=status", "--type=merge", "-p",
        r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"192.168.1.10"}},"spec":{"podCIDR":"10.9.9.0/24"}}"#,
    ]);
    lab.kubectl(&[
        "patch", "node", "h1", "--subresource=status", "--type=strategic", "-p",
        r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}"#,
    ]);
    let n = lab.node("h1");
    let a = &n["metadata"]["annotations"];
    assert_eq!(a["flannel.alpha.coreos.com/public-ip"], "192.168.1.10");
    assert_eq!(a["flannel.alpha.coreos.com/backend-type"], "vxlan", "the merge keeps other annotations");
    assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24", "a status write never changes spec");
    let conds = n["status"]["conditions"].as_array().unwrap();
    assert_eq!(conds.len(), 2, "strategic merge adds a condition by type and keeps Ready: {conds:?}");
    assert!(conds.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
    assert!(conds.iter().any(|c| c["type"] == "NetworkUnavailable" && c["reason"] == "FlannelIsUp"));
    // The same condition patched again replaces that entry (merge key "type"), not appends.
    lab.kubectl(&[
        "patch",
        "node",
        "h1",
        "--subresource=status",
        "-p",
        r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"True","reason":"NoRouteCreated"}]}}"#,
    ]);
    let conds = lab.node("h1")["status"]["conditions"].as_array().unwrap().clone();
    assert_eq!(conds.len(), 2);
    assert!(conds.iter().any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "True"));
    // A change to status through the main resource is ignored (status belongs to the subresource).
    lab.kubectl(&[
        "patch",
        "node",
        "h1",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[]},"spec":{"unschedulable":true}}"#,
    ]);
    let n = lab.node("h1");
    assert_eq!(n["spec"]["unschedulable"], true);
    assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 2);

    let out = lab.kubectl(&["delete", "node", "h1"]);
    assert!(out.contains("\"h1\" deleted"), "{out}");
    let gone = lab.kubectl_try(&["get", "node", "h1"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains(r#"nodes "h1" not found"#),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}

#[test]
fn kubectl_watch_sees_changes_and_deletions() {
    let lab = Lab::new("wat").start(|_| {});
    assert!(lab.kubectl_stdin(&["create", "-f", "-"], &node_json("w1", "10.244.3.0/24")).status.success());
    let out_path = lab.dir.path().join("watch.out");
    let mut w = lab
        .kubectl_cmd(&["get", "nodes", "-w", "--output-watch-events", "-o", "json"])
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let events = |p: &Path| -> Vec<(String, Value)> {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .map(|v| (v["type"].as_str().unwrap_or("").to_string(), v["object"].clone()))
            .collect()
    };
    // And the human form (kubectl asks for Tables, also in the watch).
    let table_path = lab.dir.path().join("watch.table");
    let mut t = lab
        .kubectl_cmd(&["get", "nodes", "-w"])
        .stdout(Stdio::from(std::fs::File::create(&table_path).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(Duration::from_secs(20), "the initial ADDED", || (!events(&out_path).is_empty()).then_some(()));
    common::wait_for(Duration::from_secs(20), "the table header", || {
        std::fs::read_to_string(&table_path).unwrap_or_default().contains("w1").then_some(())
    });
    lab.kubectl(&["annotate", "node", "w1", "seen=yes"]);
    lab.kubectl(&["delete", "node", "w1"]);
    let ev = common::wait_for(Duration::from_secs(20), "MODIFIED and DELETED events", || {
        let e = events(&out_path);
        (e.iter().any(|(t, _)| t == "DELETED")).then_some(e)
    });
    let rows = common::wait_for(Duration::from_secs(20), "three table rows", || {
        let text = std::fs::read_to_string(&table_path).unwrap_or_default();
        let rows: Vec<Vec<String>> = text.lines().map(|l| l.split_whitespace().map(String::from).collect()).collect();
        (rows.len() >= 4).then_some(rows)
    });
    for c in [&mut w, &mut t] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(rows[0], ["NAME", "STATUS", "AGE"]);
    assert!(
        rows[1..].iter().all(|r| r.len() == 3 && r[0] == "w1" && r[1] == "Ready"),
        "every watch row in the table's columns: {rows:?}"
    );
    let types: Vec<&str> = ev.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"], "{ev:?}");
    assert_eq!(ev[1].1["metadata"]["annotations"]["seen"], "yes");
    let rvs: Vec<u64> =
        ev.iter().map(|(_, o)| o["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()).collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "versions increase: {rvs:?}");
}

#[test]
fn without_the_token_every_request_is_unauthorized() {
    let lab = Lab::new("aut").start(|_| {});
    for path in ["/api/v1/nodes", "/api", "/apis", "/api/v1/nodes/x", "/weft-test/compact"] {
        let (code, body) = split_code(&lab.curl_raw(&[&format!("https://127.0.0.1:6443{path}")], false));
        assert_eq!(code, 401, "{path}: {body}");
        assert_eq!(status_of(&body)["reason"], "Unauthorized");
    }
    let (code, _) =
        split_code(&lab.curl_raw(&["-H", "Authorization: Bearer wrong", "https://127.0.0.1:6443/api/v1/nodes"], false));
    assert_eq!(code, 401);
    // kubectl with a wrong token says so.
    let kc = std::fs::read_to_string(lab.kubeconfig()).unwrap().replace(&lab.token(), "not-the-token");
    let bad = lab.dir.path().join("bad-kubeconfig");
    std::fs::write(&bad, kc).unwrap();
    let o = lab.ns.command("kubectl").arg("--kubeconfig").arg(&bad).args(["get", "nodes"]).output().unwrap();
    assert!(!o.status.success());
    // kubectl's words for a 401 differ between builds: "Unauthorized" or "the server has
    // asked for the client to provide credentials".
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("Unauthorized") || said.contains("provide credentials"), "{said}");
    // TLS: a client that does not trust the CA is refused by curl (the server presents our cert).
    let o = lab.ns.command("curl").args(["-sS", "-m", "5", "https://127.0.0.1:6443/healthz"]).output().unwrap();
    assert!(!o.status.success(), "an untrusted certificate must fail verification");
}

/// Reads the watch events of a finished raw watch (`timeoutSeconds`).
fn watch_events(body: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(body).into_iter::<Value>().map(|v| v.unwrap()).collect()
}

#[test]
fn a_watch_or_continue_from_a_forgotten_version_gets_410_gone() {
    let lab = Lab::new("gon").start(|o| {
        o.history = 3;
        o.bookmark_interval = Duration::from_millis(400);
    });
    for i in 1..=3 {
        let o = lab.kubectl_stdin(&["create", "-f", "-"], &node_json(&format!("g{i}"), &format!("10.244.{i}.0/24")));
        assert!(o.status.success());
    }
    let (_, list) = lab.curl(&["https://127.0.0.1:6443/api/v1/nodes?limit=1"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    let rv: u64 = list["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    let cont = list["metadata"]["continue"].as_str().expect("a continue token").to_string();
    assert_eq!(list["metadata"]["remainingItemCount"], 2);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["items"][0].get("kind").is_none(), "list items carry no kind, as the real server's");

    // Within the history: a watch from rv sees exactly the later changes.
    lab.kubectl(&["label", "node", "g1", "x=1"]);
    let (code, body) =
        lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={rv}&timeoutSeconds=1")]);
    assert_eq!(code, 200);
    let ev = watch_events(&body);
    assert_eq!(ev.len(), 1, "{body}");
    assert_eq!(ev[0]["type"], "MODIFIED");
    // A continue at the list's version still works (a consistent snapshot of version rv).
    let (code, page2) = lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?limit=5&continue={cont}")]);
    assert_eq!(code, 200, "{page2}");
    let page2: Value = serde_json::from_str(&page2).unwrap();
    assert_eq!(page2["items"].as_array().unwrap().len(), 2);
    assert!(
        page2["items"].as_array().unwrap().iter().all(|n| n["metadata"]["labels"].get("x").is_none()),
        "the snapshot is of version {rv}"
    );

    // An exact list at rv is the state of then, not of now.
    let (code, exact) =
        lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?resourceVersion={rv}&resourceVersionMatch=Exact")]);
    assert_eq!(code, 200, "{exact}");
    let exact: Value = serde_json::from_str(&exact).unwrap();
    assert_eq!(exact["metadata"]["resourceVersion"], rv.to_string());
    assert!(exact["items"].as_array().unwrap().iter().all(|n| n["metadata"]["labels"].get("x").is_none()));
    // Three more changes push rv out of the history (3 events kept).
    for i in 1..=3 {
        lab.kubectl(&["label", "node", &format!("g{i}"), "y=2"]);
    }
    let (code, body) =
        lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={rv}&timeoutSeconds=2")]);
    assert_eq!(code, 200, "a too-old watch is an ERROR event in a 200 stream, as the real server sends it");
    let ev = watch_events(&body);
    assert_eq!(ev.len(), 1, "{body}");
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
    let (code, body) = lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?limit=5&continue={cont}")]);
    assert_eq!(code, 410, "{body}");
    assert_eq!(status_of(&body)["reason"], "Expired");
    let (code, body) =
        lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?resourceVersion={rv}&resourceVersionMatch=Exact")]);
    assert_eq!(code, 410, "{body}");

    // A version the server never had (state wiped) is expired too: the client re-lists.
    let (_, body) = lab.curl(&["https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion=999999&timeoutSeconds=1"]);
    assert_eq!(watch_events(&body)[0]["object"]["code"], 410, "{body}");
    // Compaction by the admin endpoint: the newest version still watches, one before it does not.
    let (code, body) = lab.curl(&["-X", "POST", "https://127.0.0.1:6443/weft-test/compact"]);
    assert_eq!(code, 200, "{body}");
    let now: u64 = serde_json::from_str::<Value>(&body).unwrap()["compactedTo"].as_str().unwrap().parse().unwrap();
    let (_, body) = lab
        .curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={}&timeoutSeconds=1", now - 1)]);
    assert_eq!(watch_events(&body)[0]["object"]["code"], 410);
    let (_, body) = lab.curl(&[&format!(
        "https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={now}&timeoutSeconds=1&allowWatchBookmarks=true"
    )]);
    let ev = watch_events(&body);
    assert!(ev.len() >= 2, "periodic bookmarks and a closing one: {body}");
    for e in &ev {
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(e["object"]["kind"], "Node");
        assert_eq!(e["object"]["metadata"]["resourceVersion"], now.to_string());
    }
    // Without allowWatchBookmarks there are none.
    let (_, body) =
        lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={now}&timeoutSeconds=1")]);
    assert!(watch_events(&body).is_empty(), "{body}");
}

#[test]
fn a_restarted_server_keeps_objects_versions_and_credentials() {
    let mut lab = Lab::new("rst");
    lab.spawn(&[]);
    assert!(lab.kubectl_stdin(&["create", "-f", "-"], &node_json("r1", "10.244.5.0/24")).status.success());
    lab.kubectl(&["annotate", "node", "r1", "a=1"]);
    let before = lab.node("r1");
    let token = lab.token();
    // A second server on the same directory is refused (it would interleave the writes).
    let second = lab
        .ns
        .command(common::weft_bin())
        .args(["test-apiserver", "--listen", "127.0.0.1:6444", "--dir"])
        .arg(lab.state())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use by another test API server"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    lab.kill9();
    lab.spawn(&[]);
    assert_eq!(lab.token(), token, "the same token: clients' kubeconfigs stay valid");
    let after = lab.node("r1");
    assert_eq!(after, before, "the object, its uid and resourceVersion survive kill -9");
    let rv: u64 = after["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    // A client resuming from the newest version it saw continues without a re-list.
    let (_, body) =
        lab.curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={rv}&timeoutSeconds=2")]);
    assert!(watch_events(&body).is_empty(), "{body}");
    lab.kubectl(&["annotate", "node", "r1", "b=2"]);
    let n = lab.node("r1");
    let rv2: u64 = n["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(rv2 > rv, "versions keep increasing after a restart ({rv} -> {rv2})");
    // One that missed changes from before the restart must re-list.
    let (_, body) = lab
        .curl(&[&format!("https://127.0.0.1:6443/api/v1/nodes?watch=1&resourceVersion={}&timeoutSeconds=2", rv - 1)]);
    assert_eq!(watch_events(&body)[0]["object"]["code"], 410, "{body}");
    // A torn last log line (killed mid-write) is ignored, not fatal.
    lab.kill9();
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(lab.state().join("state.log"))
        .unwrap()
        .write_all(b"{\"rv\":99,\"ty")
        .unwrap();
    lab.spawn(&[]);
    assert_eq!(lab.node("r1"), n);
}

#[test]
fn hostile_requests_get_kubernetes_status_errors_and_the_server_stays_up() {
    let lab = Lab::new("hos").start(|o| {
        o.max_body = 64 * 1024;
        o.body_timeout = Duration::from_secs(2);
    });
    let url = "https://127.0.0.1:6443/api/v1/nodes";
    let json_ct = "Content-Type: application/json";
    let file = |name: &str, content: String| -> String {
        let p = lab.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        format!("@{}", p.display())
    };
    let huge = file("huge", format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)));
    let deep = file("deep", format!("{}1{}", "[".repeat(5_000), "]".repeat(5_000)));
    let cases: Vec<(Vec<String>, u16, &str)> = vec![
        (
            vec!["-X".into(), "POST".into(), "-H".into(), json_ct.into(), "-d".into(), "not json".into(), url.into()],
            400,
            "BadRequest",
        ),
        (vec!["-X".into(), "POST".into(), "-d".into(), "[1,2]".into(), url.into()], 400, "BadRequest"),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-d".into(),
                r#"{"metadata":{"name":"n"},"spec":{"podCIDR":5}}"#.into(),
                url.into(),
            ],
            400,
            "BadRequest",
        ),
        (
            vec!["-X".into(), "POST".into(), "-d".into(), r#"{"metadata":{"name":"Not_A_Name"}}"#.into(), url.into()],
            422,
            "Invalid",
        ),
        (vec!["-X".into(), "POST".into(), "-d".into(), r#"{"metadata":{}}"#.into(), url.into()], 422, "Invalid"),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-d".into(),
                r#"{"kind":"Pod","metadata":{"name":"n"}}"#.into(),
                url.into(),
            ],
            400,
            "BadRequest",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-d".into(),
                r#"{"metadata":{"name":"n","resourceVersion":"7"}}"#.into(),
                url.into(),
            ],
            400,
            "BadRequest",
        ),
        (vec!["-X".into(), "POST".into(), "--data-binary".into(), huge, url.into()], 413, "RequestEntityTooLarge"),
        (vec!["-X".into(), "POST".into(), "--data-binary".into(), deep, url.into()], 400, "BadRequest"),
        (
            vec![
                "-X".into(),
                "PATCH".into(),
                "-H".into(),
                "Content-Type: application/apply-patch+yaml".into(),
                "-d".into(),
                "{}".into(),
                format!("{url}/h"),
            ],
            415,
            "UnsupportedMediaType",
        ),
        (vec![format!("{url}?labelSelector=a%20in%20(b")], 400, "BadRequest"),
        (vec![format!("{url}?fieldSelector=spec.podCIDR%3Dx")], 400, "BadRequest"),
        (vec![format!("{url}?limit=-1")], 400, "BadRequest"),
        (vec![format!("{url}?continue=zzz")], 400, "BadRequest"),
        (vec![format!("{url}?watch=1&resourceVersion=abc")], 400, "BadRequest"),
        (vec!["https://127.0.0.1:6443/api/v1/nodes/a/b/c/d".into()], 404, "NotFound"),
        (vec!["https://127.0.0.1:6443/apis/nope.example/v1/things".into()], 404, "NotFound"),
        (vec!["https://127.0.0.1:6443/api/v1/namespaces/nope/pods".into()], 200, ""),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-d".into(),
                r#"{"metadata":{"name":"p"}}"#.into(),
                "https://127.0.0.1:6443/api/v1/namespaces/nope/pods".into(),
            ],
            404,
            "NotFound",
        ),
        (vec!["-X".into(), "DELETE".into(), url.into()], 405, "MethodNotAllowed"),
        (
            vec!["-X".into(), "PUT".into(), "-d".into(), r#"{"metadata":{"name":"other"}}"#.into(), format!("{url}/h")],
            404,
            "NotFound",
        ),
    ];
    for (args, code, reason) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, body) = lab.curl(&a);
        let shown: String = format!("{args:?}").chars().take(200).collect();
        assert_eq!(got, *code, "{shown}: {}", body.chars().take(300).collect::<String>());
        if !reason.is_empty() {
            let s = status_of(&body);
            assert_eq!(s["reason"], *reason, "{shown}: {body}");
            assert_eq!(s["code"], *code);
        }
    }
    // Node h exists: a body whose name differs from the URL, a stale resourceVersion, a bad patch.
    let (c, _) = lab.curl(&["-X", "POST", "-d", r#"{"metadata":{"name":"h"}}"#, url]);
    assert_eq!(c, 201);
    let (c, b) = lab.curl(&["-X", "PUT", "-d", r#"{"metadata":{"name":"other"}}"#, &format!("{url}/h")]);
    assert_eq!((c, status_of(&b)["reason"].clone()), (400, json!("BadRequest")), "{b}");
    let (c, b) =
        lab.curl(&["-X", "PUT", "-d", r#"{"metadata":{"name":"h","resourceVersion":"1"}}"#, &format!("{url}/h")]);
    assert_eq!((c, status_of(&b)["reason"].clone()), (409, json!("Conflict")), "{b}");
    let (c, b) = lab.curl(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/json-patch+json",
        "-d",
        r#"[{"op":"remove","path":"/spec/nothing"}]"#,
        &format!("{url}/h"),
    ]);
    assert_eq!(c, 400, "{b}");
    let (c, b) = lab.curl(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/strategic-merge-patch+json",
        "-d",
        r#"{"status":{"conditions":["x"]}}"#,
        &format!("{url}/h/status"),
    ]);
    assert_eq!(c, 400, "{b}");
    // kubectl's strict validation: a misspelt field is refused by the server, not dropped.
    let bad = node_json("typo", "10.244.7.0/24").replace("podCIDRs", "podCIRDs");
    let o = lab.kubectl_stdin(&["create", "-f", "-"], &bad);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(r#"unknown field "spec.podCIRDs""#),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Garbage that is not TLS, then plain HTTP: the connection is dropped, the server lives.
    let closed = in_netns(&lab.ns.name, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(LISTEN).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"GARBAGE\r\n\r\n\x16\x03\x01\xff\xff").unwrap();
        let mut buf = [0u8; 512];
        // The handshake fails: the server closes (0 bytes, or an alert then close), never hangs.
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    })
    .unwrap();
    assert!(closed, "a non-TLS client is disconnected");
    let (c, _) = split_code(
        &lab.ns
            .command("curl")
            .args(["-sS", "-m", "5", "-w", "\n%{http_code}", "http://127.0.0.1:6443/api"])
            .output()
            .unwrap(),
    );
    assert_ne!(c, 200);
    // A body that never finishes arriving: a 400 Status after the body timeout, not a hang.
    let token = lab.token();
    let answer = in_netns(&lab.ns.name, move || {
        let tls = std::process::Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", LISTEN])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut c = tls.unwrap();
        use std::io::{Read, Write};
        let mut stdin = c.stdin.take().unwrap();
        write!(stdin, "POST /api/v1/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{\"meta").unwrap();
        stdin.flush().unwrap();
        let started = std::time::Instant::now();
        let mut out = c.stdout.take().unwrap();
        let mut buf = vec![0u8; 4096];
        let n = out.read(&mut buf).unwrap_or(0);
        let _ = c.kill();
        let _ = c.wait();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), started.elapsed())
    })
    .unwrap();
    assert!(answer.0.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.0.contains("timed out reading the request body"), "{answer:?}");
    assert!(answer.1 < Duration::from_secs(30), "{answer:?}");
    let (c, b) = lab.curl(&[&format!("{url}/h")]);
    assert_eq!(c, 200, "still serving after hostile input: {b}");
}

#[test]
fn kube_rs_lists_watches_and_patches_status() {
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
    use kube::runtime::watcher;

    let lab = Lab::new("krs").start(|_| {});
    let kubeconfig = lab.kubeconfig();
    let srv_store = lab.srv.as_ref().unwrap().store().clone();
    let nodes = weft::apiserver::resources::find("", "v1", "nodes").unwrap();
    let result = in_netns(&lab.ns.name, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kube-rs reads the kubeconfig");
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
            let client = kube::Client::try_from(cfg).unwrap();
            let api: Api<Node> = Api::all(client);
            let n: Node = serde_json::from_str(&node_json("k1", "10.244.8.0/24")).unwrap();
            api.create(&PostParams::default(), &n).await.unwrap();
            let list = api.list(&ListParams::default()).await.unwrap();
            assert_eq!(list.items.len(), 1);
            let rv = list.metadata.resource_version.clone().unwrap();

            let wp = WatchParams::default().timeout(10);
            let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
            let pp = PatchParams::default();
            let patch = json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/kube-subnet-manager": "true"}},
                               "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]}});
            let patched = api.patch_status("k1", &pp, &Patch::Strategic(&patch)).await.unwrap();
            assert_eq!(patched.status.unwrap().conditions.unwrap().len(), 2);
            match stream.try_next().await.unwrap() {
                Some(WatchEvent::Modified(n)) => {
                    assert_eq!(n.metadata.annotations.unwrap()["flannel.alpha.coreos.com/kube-subnet-manager"], "true")
                }
                other => panic!("expected MODIFIED, got {other:?}"),
            }
            drop(stream);

            // The runtime watcher: initial list, then a change; after compaction it re-lists.
            let mut w = watcher(api.clone(), watcher::Config::default()).boxed();
            let mut seen = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await {
                    Ok(Ok(Some(watcher::Event::InitDone))) => break,
                    Ok(Ok(Some(e))) => seen.push(format!("{e:?}").chars().take(10).collect::<String>()),
                    other => panic!("watcher: {other:?}"),
                }
            }
            assert_eq!(seen.len(), 2, "Init and one InitApply: {seen:?}");
            // The streaming list (sendInitialEvents + the initial-events-end bookmark) as well.
            let mut s = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
            let mut streamed = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), s.try_next()).await {
                    Ok(Ok(Some(watcher::Event::InitDone))) => break,
                    Ok(Ok(Some(watcher::Event::InitApply(n)))) => streamed.push(n.metadata.name.unwrap()),
                    Ok(Ok(Some(watcher::Event::Init))) => {}
                    other => panic!("streaming watcher: {other:?}"),
                }
            }
            assert_eq!(streamed, ["k1"]);
            drop(s);
            srv_store.delete(nodes, "", "k1", None, false).unwrap();
            match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await {
                Ok(Ok(Some(watcher::Event::Delete(n)))) => assert_eq!(n.metadata.name.as_deref(), Some("k1")),
                other => panic!("expected Delete, got {other:?}"),
            }
            "ok"
        })
    });
    assert_eq!(result.unwrap(), "ok");
}

#[test]
fn kubectl_serves_namespaces_pods_and_networkpolicies() {
    let lab = Lab::new("pod").start(|_| {});
    // (`kubectl create namespace X` sends protobuf, which this server answers with 415.)
    let o = lab.kubectl_stdin(
        &["create", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"team-a"}}"#,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pod = |name: &str, node: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "team-a", "labels": {"app": name}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
        .to_string()
    };
    for (p, n) in [("p1", "h1"), ("p2", "h2")] {
        let o = lab.kubectl_stdin(&["create", "-f", "-"], &pod(p, n));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let pods: Value = serde_json::from_str(&lab.kubectl(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=h1",
        "-o",
        "json",
    ]))
    .unwrap();
    let names: Vec<&str> =
        pods["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["p1"], "fieldSelector spec.nodeName");
    assert_eq!(pods["items"][0]["status"]["phase"], "Pending", "a new pod is Pending");
    let sel: Value =
        serde_json::from_str(&lab.kubectl(&["get", "pods", "-n", "team-a", "-l", "app in (p2,x)", "-o", "json"]))
            .unwrap();
    assert_eq!(sel["items"].as_array().unwrap().len(), 1);
    lab.kubectl(&[
        "patch",
        "pod",
        "p1",
        "-n",
        "team-a",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"podIP":"10.244.1.5","phase":"Running"}}"#,
    ]);
    let p1: Value = serde_json::from_str(&lab.kubectl(&["get", "pod", "p1", "-n", "team-a", "-o", "json"])).unwrap();
    assert_eq!(p1["status"]["podIP"], "10.244.1.5");
    let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "team-a"},
        "spec": {"podSelector": {"matchLabels": {"app": "p1"}}, "policyTypes": ["Ingress"]}});
    let o = lab.kubectl_stdin(&["create", "-f", "-"], &np.to_string());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Value =
        serde_json::from_str(&lab.kubectl(&["get", "networkpolicy", "deny", "-n", "team-a", "-o", "json"])).unwrap();
    assert_eq!(got["spec"]["podSelector"]["matchLabels"]["app"], "p1");
    // A pod in a namespace that does not exist is refused; deleting a namespace takes its objects.
    let o = lab.kubectl_stdin(&["create", "-n", "nope", "-f", "-"], &pod("p3", "h1").replace("team-a", "nope"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(r#"namespaces "nope" not found"#),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    lab.kubectl(&["delete", "namespace", "team-a"]);
    let left: Value = serde_json::from_str(&lab.kubectl(&["get", "pods,networkpolicies", "-A", "-o", "json"])).unwrap();
    assert_eq!(left["items"], json!([]));
}

#[test]
fn five_thousand_nodes_page_consistently_while_they_change() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, ListParams};
    use weft::apiserver::store::WriteOpts;

    let lab = Lab::new("big").start(|_| {});
    let store = lab.srv.as_ref().unwrap().store().clone();
    let nodes = weft::apiserver::resources::find("", "v1", "nodes").unwrap();
    let t0 = std::time::Instant::now();
    for i in 0..5000u32 {
        let n = json!({"metadata": {"name": format!("n{i:04}"), "annotations": {
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:{:02x}:{:02x}\"}}", i / 256, i % 256),
                "flannel.alpha.coreos.com/public-ip": format!("10.1.{}.{}", i / 250, i % 250 + 1),
                "flannel.alpha.coreos.com/kube-subnet-manager": "true"}},
            "spec": {"podCIDR": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)}});
        store.create(nodes, "", n, WriteOpts::default()).unwrap();
    }
    let created = t0.elapsed();
    let kubeconfig = lab.kubeconfig();
    let st = store.clone();
    let (names, pages, listed) = in_netns(&lab.ns.name, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let client =
                kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap())
                    .unwrap();
            let api: Api<Node> = Api::all(client);
            let t = std::time::Instant::now();
            let (mut names, mut pages, mut token) = (Vec::new(), 0, None::<String>);
            loop {
                let mut lp = ListParams::default().limit(500);
                if let Some(c) = &token {
                    lp = lp.continue_token(c);
                }
                let page = api.list(&lp).await.unwrap();
                pages += 1;
                names.extend(page.items.into_iter().map(|n| n.metadata.name.unwrap()));
                if pages == 1 {
                    // Changes between pages must not show: the pages are one snapshot.
                    st.delete(nodes, "", "n4999", None, false).unwrap();
                    st.create(nodes, "", json!({"metadata": {"name": "n5000"}}), WriteOpts::default()).unwrap();
                }
                token = page.metadata.continue_.filter(|c| !c.is_empty());
                if token.is_none() {
                    break;
                }
            }
            (names, pages, t.elapsed())
        })
    })
    .unwrap();
    eprintln!(
        "5000 nodes: created in {created:?} (store), listed in {pages} pages of 500 in {listed:?} (kube-rs over TLS)"
    );
    assert_eq!(pages, 10);
    assert_eq!(names.len(), 5000);
    assert_eq!(names.last().map(String::as_str), Some("n4999"), "the node deleted after page 1 is in the snapshot");
    assert!(!names.iter().any(|n| n == "n5000"), "the node created after page 1 is not");
    let mut sorted = names.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 5000, "no node twice");
    // resourceVersion=0 is served whole, as the real watch cache does.
    let t = std::time::Instant::now();
    let (code, body) = lab.curl(&["https://127.0.0.1:6443/api/v1/nodes?limit=500&resourceVersion=0"]);
    eprintln!("5000 nodes: one list with resourceVersion=0: {} bytes in {:?} (curl)", body.len(), t.elapsed());
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 5000);
    assert!(v["metadata"].get("continue").is_none());
}

#[test]
fn stopping_the_server_ends_open_watches_and_a_new_one_serves_the_same_state() {
    let mut lab = Lab::new("stp").start(|_| {});
    assert!(lab.kubectl_stdin(&["create", "-f", "-"], &node_json("s1", "10.244.6.0/24")).status.success());
    let kubeconfig = std::fs::read_to_string(lab.kubeconfig()).unwrap();
    let mut watch = lab
        .ns
        .command("curl")
        .args(["-sS", "-N", "--cacert"])
        .arg(lab.state().join("ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", lab.token())])
        .arg("https://127.0.0.1:6443/api/v1/nodes?watch=1&timeoutSeconds=600")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The watch is open once it delivered the initial ADDED.
    let mut out = watch.stdout.take().unwrap();
    let mut first = [0u8; 16];
    use std::io::Read;
    out.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"{\"type\":\"ADDED\""), "{}", String::from_utf8_lossy(&first));
    let stopped = std::time::Instant::now();
    lab.srv.take().unwrap().stop();
    common::wait_for(Duration::from_secs(10), "the watch to end", || watch.try_wait().unwrap());
    assert!(stopped.elapsed() < Duration::from_secs(10));
    let lab = lab.start(|_| {});
    assert_eq!(std::fs::read_to_string(lab.kubeconfig()).unwrap(), kubeconfig, "clients keep their kubeconfig");
    assert_eq!(lab.node("s1")["spec"]["podCIDR"], "10.244.6.0/24");
}
