//! `weft docker-opts`: reads `subnet.env` and writes Docker's options file (flannel's
//! `mk-docker-opts.sh`; the text comes from [`weft_core::docker_opts`]).

use std::collections::BTreeMap;
use std::path::Path;

use weft_core::docker_opts::{self, Request};

/// Runs the command; the exit status is the script's (0, or 1 with usage or an error).
pub fn run(args: &[String]) -> u8 {
    let prog = "weft docker-opts";
    let o = match docker_opts::parse(args) {
        Ok(Request::Run(o)) => o,
        Ok(Request::Help) => {
            print!("{}", docker_opts::usage(prog));
            return 0;
        }
        Err(e) => {
            eprintln!("{prog}: {e}\n{}", docker_opts::usage(prog));
            return 1;
        }
    };
    // The shell's variables: the environment, then what sourcing the file sets.
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    match std::fs::read_to_string(&o.flannel_env) {
        Ok(text) => vars.extend(docker_opts::parse_env_file(&text)),
        // A missing file is no error (the script tests -f): the variables are simply absent.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            eprintln!(
                "{prog}: cannot read the flannel env file {}: {e}; check the path (-f) and its permissions",
                o.flannel_env
            );
            return 1;
        }
    }
    let text = docker_opts::render(&o, &vars);
    // Written atomically: dockerd (or systemd) never reads a half-written file.
    match crate::fsutil::write_atomic(Path::new(&o.docker_env), text.as_bytes(), 0o644, 0o755) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{prog}: cannot write {}: {e}; choose a writable path with -d", o.docker_env);
            1
        }
    }
}
