//! The deployment files under `deploy/` checked against the binaries they run: the systemd
//! units pass `systemd-analyze verify` (with `ExecStart` pointed at the binaries built for
//! this test), their hardening scores an exposure of at most 2.0 in `systemd-analyze
//! security`, and the command line each starts is one its binary accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedflow_tests::bin::cargo_bin;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The unit's `ExecStart` command line, continuation lines joined.
fn exec_start(unit: &str) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    let line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_systemd_units_verify_are_hardened_and_start_commands_the_binaries_accept() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is needed (Debian: apt-get install systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    for (unit, package, bin) in [
        (
            "fedflow-coordinator.service",
            "fedflow-coordinator",
            "fedflow-coordinator",
        ),
        ("fedflow-agent.service", "fedflow-client", "fedflow-client"),
    ] {
        let text = std::fs::read_to_string(workspace().join("deploy/systemd").join(unit)).unwrap();
        let built = cargo_bin(package, bin);
        let installed = format!("/usr/local/bin/{bin}");
        assert!(text.contains(&installed), "{unit} runs {installed}");
        let here = dir.path().join(unit);
        std::fs::write(
            &here,
            text.replace(&installed, &built.display().to_string()),
        )
        .unwrap();
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&here)
            .output()
            .unwrap();
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "{unit}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(&here)
            .output()
            .unwrap();
        assert!(
            security.status.success(),
            "{unit}: exposure above 2.0:\n{}",
            String::from_utf8_lossy(&security.stdout)
        );
        for needed in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "StateDirectory=",
            "User=",
            "KillSignal=SIGTERM",
        ] {
            assert!(text.contains(needed), "{unit} lacks {needed}");
        }
        // The command line parses: with --help appended, clap checks every flag before it
        // prints the help.
        let args = exec_start(&text);
        let parsed = Command::new(&built)
            .args(&args[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{unit}: {args:?}: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
}
