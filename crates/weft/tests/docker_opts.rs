//! `weft docker-opts` against flannel's mk-docker-opts.sh vectors: the file it writes is
//! byte-identical, the flags are the script's (with `-m` honoured), bad flags exit 1.

mod common;

use std::path::Path;
use std::process::Output;

fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    std::process::Command::new(common::weft_bin())
        .arg("docker-opts")
        .args(args)
        .current_dir(dir)
        .env_remove("DOCKER_OPTS")
        .env_remove("DOCKER_NETWORK_OPTIONS")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

fn scratch(subnet_env: &str) -> (tempfile::TempDir, String, String) {
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("subnet.env");
    std::fs::write(&env, subnet_env).unwrap();
    let out = d.path().join("docker_opts.env");
    // A stale, longer file: the output replaces it entirely.
    std::fs::write(&out, "OLD=\"x\"\n".repeat(20)).unwrap();
    let (e, o) = (env.display().to_string(), out.display().to_string());
    (d, e, o)
}

#[test]
fn writes_flannels_vectors_byte_for_byte() {
    let (d, env, out) = scratch(SUBNET_ENV);
    let o = run(d.path(), &["-f", &env, "-d", &out], &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.15.1/24 --ip-masq=false --mtu=1472 \"\n"
    );
    let o = run(d.path(), &["-f", &env, "-d", &out, "-c", "-k", "DOCKER_NETWORK_OPTIONS"], &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_NETWORK_OPTIONS=\" --bip=10.1.15.1/24 --ip-masq=false --mtu=1472 \"\n"
    );
    let (d, env, out) = scratch(&SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"));
    let o = run(d.path(), &[&format!("-f{env}"), "-d", &out, "-i"], &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"
    );
}

#[test]
fn m_drops_ip_masq_and_the_key_keeps_its_value() {
    let (d, env, out) = scratch(SUBNET_ENV);
    let o = run(d.path(), &["-m", "-f", &env, "-d", &out], &[("DOCKER_OPTS", "--debug")]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.1.15.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug --bip=10.1.15.1/24 --mtu=1472 \"\n"
    );
}

#[test]
fn a_missing_env_file_is_no_error_and_bad_flags_exit_1_with_usage() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.env");
    let missing = d.path().join("nope.env");
    let o = run(d.path(), &["-f", missing.to_str().unwrap(), "-d", out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "DOCKER_OPTS=\" \"\n");

    for bad in [&["-x"][..], &["-f"], &["-k", "NOT A NAME"]] {
        let o = run(d.path(), bad, &[]);
        assert_eq!(o.status.code(), Some(1), "{bad:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("[-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]"), "{err}");
    }
    // Nothing was written by the rejected runs.
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "DOCKER_OPTS=\" \"\n");

    // An env file that exists but cannot be read is an error, not empty options.
    let dir_as_file = d.path().join("adir");
    std::fs::create_dir(&dir_as_file).unwrap();
    let o = run(d.path(), &["-f", dir_as_file.to_str().unwrap(), "-d", out.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read the flannel env file"), "{o:?}");
}

/// flannel's script itself (its logic, with `-m` in the getopts string as flannel documents
/// it) run by bash on the same inputs gives the same bytes.
#[test]
fn matches_the_script_run_by_bash() {
    if std::process::Command::new("bash").arg("--version").output().is_err() {
        panic!("bash is needed for this test (Debian's bash package)");
    }
    let script = r#"
flannel_env="/run/flannel/subnet.env"; docker_env="/run/docker_opts.env"; combined_opts_key="DOCKER_OPTS"
indiv_opts=false; combined_opts=false; ipmasq=true; val=""
while getopts "f:d:icmk:" opt; do
  case $opt in
    f) flannel_env=$OPTARG ;; d) docker_env=$OPTARG ;; i) indiv_opts=true ;; c) combined_opts=true ;;
    m) ipmasq=false ;; k) combined_opts_key=$OPTARG ;; \?) exit 1 ;;
  esac
done
if [[ $indiv_opts = false ]] && [[ $combined_opts = false ]]; then indiv_opts=true; combined_opts=true; fi
if [[ -f "${flannel_env}" ]]; then source "${flannel_env}"; fi
if [[ -n "$FLANNEL_SUBNET" ]]; then DOCKER_OPT_BIP="--bip=$FLANNEL_SUBNET"; fi
if [[ -n "$FLANNEL_MTU" ]]; then DOCKER_OPT_MTU="--mtu=$FLANNEL_MTU"; fi
if [[ "$FLANNEL_IPMASQ" = true ]] && [[ $ipmasq = true ]]; then DOCKER_OPT_IPMASQ="--ip-masq=false"; fi
eval docker_opts="\$${combined_opts_key}"
docker_opts+=" "
echo -n "" >"${docker_env}"
for opt in $(compgen -v DOCKER_OPT_); do
  eval val=\$"${opt}"
  if [[ "$indiv_opts" = true ]]; then echo "$opt=\"$val\"" >>"${docker_env}"; fi
  docker_opts+="$val "
done
if [[ "$combined_opts" = true ]]; then echo "${combined_opts_key}=\"${docker_opts}\"" >>"${docker_env}"; fi
"#;
    let inputs = [
        SUBNET_ENV.to_string(),
        SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"),
        "FLANNEL_MTU=1450\n".to_string(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:3::1/64\nFLANNEL_MTU=8950\nFLANNEL_IPMASQ=true\n".to_string(),
    ];
    let flag_sets: [&[&str]; 7] =
        [&[], &["-i"], &["-c"], &["-ic"], &["-m"], &["-c", "-k", "DOCKER_NETWORK_OPTIONS"], &["-i", "-m", "-kX"]];
    let envs: [&[(&str, &str)]; 2] = [&[], &[("DOCKER_OPTS", "--log-level=warn"), ("DOCKER_OPT_ZZZ", "--zz")]];
    for input in &inputs {
        for flags in flag_sets {
            for env in envs {
                let (d, envf, out) = scratch(input);
                let theirs = d.path().join("theirs.env");
                let mut args: Vec<String> = vec!["-f".into(), envf.clone(), "-d".into(), theirs.display().to_string()];
                args.extend(flags.iter().map(|s| s.to_string()));
                let o = std::process::Command::new("bash")
                    .arg("-c")
                    .arg(script)
                    .arg("mk-docker-opts.sh")
                    .args(&args)
                    .env_remove("DOCKER_OPTS")
                    .envs(env.iter().copied())
                    .output()
                    .unwrap();
                assert!(o.status.success(), "bash: {o:?}");
                let mut ours: Vec<&str> = vec!["-f", &envf, "-d", &out];
                ours.extend_from_slice(flags);
                let o = run(d.path(), &ours, env);
                assert!(o.status.success(), "{o:?}");
                assert_eq!(
                    std::fs::read(&out).unwrap(),
                    std::fs::read(&theirs).unwrap(),
                    "input {input:?}, flags {flags:?}, env {env:?}"
                );
            }
        }
    }
}

/// `weft --help` lists every command and every flag, the new ones included.
#[test]
fn weft_help_lists_every_command_and_flag() {
    let o = std::process::Command::new(common::weft_bin()).arg("--help").output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for cmd in ["daemon", "leases", "lab", "doctor", "cleanup", "docker-opts", "version"] {
        assert!(help.contains(&format!("\n  {cmd} ")), "command {cmd} missing:\n{help}");
    }
    let specs = weft::cli::daemon_specs()
        .into_iter()
        .chain(weft::doctor::DOCTOR_FLAGS.iter().copied())
        .chain(weft::cleanup::CLEANUP_FLAGS.iter().copied());
    for s in specs {
        assert!(help.contains(&format!("--{}", s.name)), "flag --{} missing", s.name);
    }
    for f in ["-f", "-d", "-i", "-c", "-m", "-k"] {
        assert!(help.contains(&format!("[{f}")), "docker-opts {f} missing");
    }
    assert!(help.contains("--log-format") && help.contains("--release-lease") && help.contains("--json"));
}
