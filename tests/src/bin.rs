//! The workspace's binaries, for tests in another package than the binary's (cargo sets
//! `CARGO_BIN_EXE_<name>` only for the binary's own package).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The path of binary `bin` of workspace package `package`, built for the profile this test
/// was built with.
///
/// Under `cargo test --workspace` the binary was built with everything else, before any test
/// ran, and is used as it is. Run alone (`cargo test -p fedflow-tests`), the binary may be
/// missing or older than its sources (the binary's package, `common/` and `proto/`, and
/// `Cargo.lock`): then it is built with `cargo build -p <package> --bin <bin>` first (cargo
/// holds no lock while tests run, so this does not wait on the build that started the test).
pub fn cargo_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps");
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is a workspace member");
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let sources = [
        workspace.join(package_dir(package)),
        workspace.join("common"),
        workspace.join("proto"),
        workspace.join("Cargo.lock"),
    ];
    let newest = sources.iter().filter_map(|p| newest_mtime(p)).max();
    if built.is_some() && built >= newest {
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cmd.arg("--release");
    }
    // The test binary's own target directory, wherever CARGO_TARGET_DIR pointed the build.
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(
        status.success(),
        "building {bin} ({package}) failed: {status}"
    );
    assert!(
        path.is_file(),
        "cargo built {bin}, but not at {}",
        path.display()
    );
    path
}

/// `fedflow-coordinator` lives in `coordinator/`, and so on.
fn package_dir(package: &str) -> &str {
    package.strip_prefix("fedflow-").unwrap_or(package)
}

/// The newest modification time of `path` or anything under it (skipping `target`).
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "target")
        .filter_map(|e| newest_mtime(&e.path()))
        .chain(own)
        .max()
}

/// Runs `cmd` to its end: whether it succeeded, and its standard output followed by its
/// standard error (for assertions and their messages). Panics when it cannot start.
pub fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
