//! The `weft` binary: `weft daemon` (also when invoked as `flanneld`), `weft leases`.

use std::process::ExitCode;

use weft::cli;
use weft_core::flags;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn usage() -> String {
    "Usage: weft <command> [flags]\n\nCommands:\n  daemon   run the per-host agent (flanneld's job); see weft daemon --help\n  leases   list the subnet leases of a store; see weft leases --help\n  install-cni  install the CNI plugin and conflist (the DaemonSet's init step); see weft install-cni --help
  lab      a whole cluster in network namespaces on this machine; see weft lab help\n  doctor   check this host and its daemon: ok / warning / problem with fixes (exit 0/1/2); see weft doctor --help\n  cleanup  remove everything weft installed on this host (--release-lease: and our lease); see weft cleanup --help\n  docker-opts  write Docker's options from subnet.env (flannel's mk-docker-opts.sh); see weft docker-opts --help\n  version  print the version\n".into()
}

/// `weft --help`: every command and every flag.
fn full_help() -> String {
    use weft::cleanup::CLEANUP_FLAGS;
    use weft::doctor::DOCTOR_FLAGS;
    format!(
        "{}\n== weft daemon\n{}\n== weft install-cni\n{}\n== weft doctor: the daemon's flags and\n{}\n== weft cleanup: the daemon's flags and\n{}\n== weft docker-opts\n{}\n== weft leases\n{}\n== weft lab\n{}",
        usage(),
        flags::usage("weft daemon", &cli::daemon_specs()),
        weft::install_cni::usage(),
        flags::usage("weft doctor", DOCTOR_FLAGS),
        flags::usage("weft cleanup", CLEANUP_FLAGS),
        weft_core::docker_opts::usage("weft docker-opts"),
        weft::leases::usage(),
        weft::lab::usage(),
    )
}

fn init_logging(verbosity: u64) {
    init_logging_as(verbosity, false)
}

/// Logs to stderr as text, or as one JSON object per line (`--log-format=json`).
fn init_logging_as(verbosity: u64, json: bool) {
    let default = match verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    if json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Sets what a write to a closed pipe does: `true` kills us quietly by SIGPIPE, as it does
/// any Unix tool (`weft leases | head` must not panic); `false` (Rust's default) makes it an
/// EPIPE error, which the daemon needs (a closed socket or child pipe must not kill it).
fn die_on_broken_pipe(die: bool) {
    let action = if die { libc::SIG_DFL } else { libc::SIG_IGN };
    // SAFETY: signal(2) with SIG_DFL or SIG_IGN installs no handler code; nothing else in
    // the process sets SIGPIPE's disposition concurrently (single-threaded here).
    unsafe { libc::signal(libc::SIGPIPE, action) };
}

fn runtime() -> tokio::runtime::Runtime {
    // Two cores here; the daemon's work is I/O bound, a small runtime is plenty.
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn daemon(args: &[String]) -> ExitCode {
    let opts = match cli::parse_daemon(args, &env) {
        Ok(Some(o)) => o,
        Ok(None) => {
            if args.iter().any(|a| a.trim_start_matches('-') == "version") {
                eprintln!("{VERSION}");
            } else {
                print!("{}", flags::usage("weft daemon", &cli::daemon_specs()));
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft daemon: {e}\n\n{}", flags::usage("weft daemon", &cli::daemon_specs()));
            return ExitCode::from(2);
        }
    };
    die_on_broken_pipe(false);
    weft::backend::tune_allocator();
    init_logging_as(opts.verbosity, opts.log_json);
    let result = runtime().block_on(weft::daemon::run(opts));
    weft::notify::stopping();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("weft daemon: {e}");
            ExitCode::from(1)
        }
    }
}

fn leases(args: &[String]) -> ExitCode {
    let (store, json) = match weft::leases::parse(args, &env) {
        Ok(weft::leases::Request::List { store, json }) => (store, json),
        Ok(weft::leases::Request::Help) => {
            print!("{}", weft::leases::usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft leases: {e}\n\n{}", weft::leases::usage());
            return ExitCode::from(2);
        }
    };
    init_logging(0);
    match runtime().block_on(weft::leases::run(&store)) {
        Ok(l) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&weft::leases::to_json(&l)).unwrap_or_default());
            } else {
                print!("{}", weft::leases::table(&l, std::time::SystemTime::now()));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft leases: {e}");
            ExitCode::from(1)
        }
    }
}

/// `weft install-cni`: the DaemonSet's init step.
fn install_cni(args: &[String]) -> ExitCode {
    use weft::install_cni::{self as ic, InstallError, Step};
    let opts = match ic::parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{}", ic::usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft install-cni: {e}\n\n{}", ic::usage());
            return ExitCode::from(2);
        }
    };
    match ic::run(&opts) {
        Ok((plugin, conf)) => {
            let say = |what: &str, step: Step, dest: &Option<std::path::PathBuf>| {
                if let Some(d) = dest {
                    let verb = if step == Step::Installed { "installed" } else { "already up to date:" };
                    println!("weft install-cni: {what} {verb} {}", d.display());
                }
            };
            say("plugin", plugin, &opts.plugin_dest);
            say("conflist", conf, &opts.conf_dest);
            ExitCode::SUCCESS
        }
        Err(e @ InstallError::Usage(_)) => {
            eprintln!("weft install-cni: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("weft install-cni: {e}");
            ExitCode::from(1)
        }
    }
}

/// `weft test-apiserver` (hidden): the small Kubernetes API server of tests and the lab.
fn test_apiserver(args: &[String]) -> ExitCode {
    let opts = match weft::apiserver::parse_args(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{}", weft::apiserver::usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft test-apiserver: {e}\n\n{}", weft::apiserver::usage());
            return ExitCode::from(2);
        }
    };
    die_on_broken_pipe(false);
    init_logging(0);
    match runtime().block_on(weft::apiserver::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft test-apiserver: {e}");
            ExitCode::from(1)
        }
    }
}

fn doctor(args: &[String]) -> ExitCode {
    use weft::cleanup::{parse_with, usage_with};
    use weft::doctor::DOCTOR_FLAGS;
    let (opts, v) = match parse_with(DOCTOR_FLAGS, args, &env) {
        Ok(Some(p)) => p,
        Ok(None) => {
            print!("{}", usage_with("weft doctor", DOCTOR_FLAGS));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft doctor: {e}\n\n{}", usage_with("weft doctor", DOCTOR_FLAGS));
            return ExitCode::from(2);
        }
    };
    // Quiet: the report is the output; store retries and the like are not.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::ERROR)
        .init();
    ExitCode::from(runtime().block_on(weft::doctor::run(&opts, v.bool("json"), v.str("cni-bridge"))))
}

fn cleanup(args: &[String]) -> ExitCode {
    use weft::cleanup::{CLEANUP_FLAGS, parse_with, usage_with};
    let (opts, v) = match parse_with(CLEANUP_FLAGS, args, &env) {
        Ok(Some(p)) => p,
        Ok(None) => {
            print!("{}", usage_with("weft cleanup", CLEANUP_FLAGS));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weft cleanup: {e}\n\n{}", usage_with("weft cleanup", CLEANUP_FLAGS));
            return ExitCode::from(2);
        }
    };
    init_logging_as(opts.verbosity, opts.log_json);
    let cni_dir = std::path::PathBuf::from(v.str("cni-data-dir"));
    let report = runtime().block_on(weft::cleanup::run(&opts, v.bool("release-lease"), &cni_dir));
    for line in &report.removed {
        println!("removed {line}");
    }
    if report.removed.is_empty() && report.failed.is_empty() {
        println!("nothing of weft's was left on this host");
    }
    for line in &report.failed {
        eprintln!("weft cleanup: {line}");
    }
    if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// The CNI plugin: runtimes run us with `CNI_COMMAND` set, whatever our name.
fn cni_plugin() -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_max_level(tracing::Level::WARN).init();
    let env = weft::cni::CniEnv::from_env(&env);
    let out = weft::cni::run(&env, &mut std::io::stdin());
    print!("{}", out.stdout);
    if out.success { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_plugin();
    }
    die_on_broken_pipe(true);
    let args: Vec<String> = std::env::args().collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if invoked_as == "flanneld" {
        return daemon(&args[1..]);
    }
    match args.get(1).map(String::as_str) {
        Some("daemon") => daemon(&args[2..]),
        Some("leases") => leases(&args[2..]),
        Some("test-apiserver") => test_apiserver(&args[2..]),
        Some("install-cni") => install_cni(&args[2..]),
        Some("cleanup") => cleanup(&args[2..]),
        Some("doctor") => doctor(&args[2..]),
        Some("docker-opts") => ExitCode::from(weft::docker_opts::run(&args[2..])),
        Some("lab") => {
            init_logging(0);
            ExitCode::from(weft::lab::run(&args[2..]))
        }
        Some("version" | "--version" | "-version") => {
            println!("weft {VERSION}");
            ExitCode::SUCCESS
        }
        Some("help" | "--help" | "-help" | "-h") => {
            print!("{}", full_help());
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("weft: unknown command {other:?}\n\n{}", usage());
            ExitCode::from(2)
        }
        None => {
            eprintln!("{}", usage());
            ExitCode::from(2)
        }
    }
}
