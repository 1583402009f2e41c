//! The server's TLS material: a CA and a server certificate made with the `openssl` CLI
//! (as the lab's etcd certificates are), kept in the state directory and reused across
//! restarts so that kubeconfigs stay valid, plus the bearer token.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Paths and token of a server's credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The CA certificate clients trust (`ca.crt`).
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
    /// The bearer token clients send.
    pub token: String,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| format!("running openssl (install the openssl package): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The subjectAltNames of the server certificate for `ip`.
fn sans(ip: &str) -> String {
    let mut s = format!("IP:{ip},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default");
    s.push_str(",DNS:kubernetes.default.svc");
    s
}

/// Makes (or reuses) the CA, the server certificate for `ip` and the token in `dir`.
pub fn ensure(dir: &Path, ip: &str) -> Result<Credentials, String> {
    crate::fsutil::ensure_dir(dir, 0o700).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    if !dir.join("ca.crt").exists() || !dir.join("ca.key").exists() {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "365", "-subj", "/CN=weft-test-apiserver-ca"]);
        openssl(dir, &a)?;
        let _ = std::fs::remove_file(dir.join("server.sans"));
    }
    let want = sans(ip);
    let have = std::fs::read_to_string(dir.join("server.sans")).unwrap_or_default();
    if have != want || !dir.join("server.crt").exists() || !dir.join("server.key").exists() {
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver"]);
        openssl(dir, &a)?;
        std::fs::write(dir.join("server.cnf"), format!("subjectAltName={want}\nextendedKeyUsage=serverAuth\n"))
            .map_err(|e| format!("writing server.cnf: {e}"))?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "365",
                "-extfile",
                "server.cnf",
            ],
        )?;
        crate::fsutil::write_atomic(&dir.join("server.sans"), want.as_bytes(), 0o600, 0o700)
            .map_err(|e| format!("writing server.sans: {e}"))?;
    }
    let token_path = dir.join("token");
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let b: [u8; 24] = rand::random();
            let t: String = b.iter().map(|x| format!("{x:02x}")).collect();
            crate::fsutil::write_atomic(&token_path, t.as_bytes(), 0o600, 0o700)
                .map_err(|e| format!("writing {}: {e}", token_path.display()))?;
            t
        }
    };
    Ok(Credentials { ca: dir.join("ca.crt"), cert: dir.join("server.crt"), key: dir.join("server.key"), token })
}

/// The rustls server configuration (HTTP/1.1 only).
pub fn server_config(c: &Credentials) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("reading {}: {e}", c.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| format!("reading {}: {e}", c.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A kubeconfig (JSON, which kubectl and kube-rs read as YAML) for `server` with `c`.
pub fn kubeconfig(server: &str, c: &Credentials) -> String {
    let ca = std::fs::canonicalize(&c.ca).unwrap_or_else(|_| c.ca.clone());
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft-test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "weft-test", "user": {"token": c.token}}],
        "contexts": [{"name": "weft-test", "context": {"cluster": "weft-test", "user": "weft-test"}}],
        "current-context": "weft-test",
        "preferences": {}
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}
