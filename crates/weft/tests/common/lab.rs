//! Running `weft lab` commands from tests.

use std::process::{Command, Output};

use serde_json::Value;

use super::weft_bin;

/// `weft lab <args>`, whatever its outcome.
pub fn lab(args: &[&str]) -> Output {
    Command::new(weft_bin()).arg("lab").args(args).output().unwrap()
}

/// `weft lab <args>`, which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = lab(args);
    assert!(
        o.status.success(),
        "weft lab {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `weft lab status --json` of the lab `name`.
pub fn status(name: &str) -> Value {
    serde_json::from_str(&ok(&["status", "--name", name, "--json"])).unwrap()
}
