//! The deployment files under `deploy/` checked against the binaries they run: the systemd
//! units pass `systemd-analyze verify` (with `ExecStart` pointed at the binaries built for
//! this test), their hardening scores an exposure of at most 2.0 in `systemd-analyze
//! security`, and the command line each starts is one its binary accepts; the container
//! images build from local material (podman, vfs) with the user, stop signal and health
//! check they declare, and, since containers cannot start on this machine, the image's
//! command and health check run in a copy of the image's own root file system (chroot, as
//! its unprivileged user).

use std::path::{Path, PathBuf};
use std::process::Command;

use fedflow_tests::bin::{cargo_bin, output};

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

/// `podman --storage-driver=vfs ARGS`.
fn podman(args: &[&str]) -> (bool, String) {
    output(
        Command::new("podman")
            .arg("--storage-driver=vfs")
            .args(args),
    )
}

/// Copies the tree `from` into `to`, keeping modes, owners and links (`cp -a`).
fn copy_tree(from: &Path, to: &Path) {
    let (ok, out) = output(Command::new("cp").arg("-a").arg(from).arg(to));
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_build_from_local_material_and_their_entrypoints_and_health_check_work() {
    use std::io::BufRead;
    let root = workspace();
    let (ok, out) = output(&mut Command::new(
        root.join("deploy/container/install-podman.sh"),
    ));
    assert!(ok, "podman is needed: {out}");
    let coordinator = cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    cargo_bin("fedflow-coordinator", "fedflow-ctl");
    cargo_bin("fedflow-client", "fedflow-client");
    cargo_bin("fedflow-sim", "fedflow-sim");
    let bin_dir = coordinator.parent().unwrap();
    let (ok, out) = output(
        Command::new(root.join("deploy/container/build-local.sh"))
            .arg("--bin-dir")
            .arg(bin_dir),
    );
    assert!(ok, "{out}");

    // What the image says about itself.
    let (ok, inspect) = podman(&["image", "inspect", "fedflow-coordinator:local"]);
    assert!(ok, "{inspect}");
    let image = &serde_json::from_str::<serde_json::Value>(&inspect).unwrap()[0];
    let config = &image["Config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(config["StopSignal"], "SIGTERM");
    assert_eq!(
        config["Entrypoint"][0],
        "/usr/local/bin/fedflow-coordinator"
    );
    // (podman shows a docker-format image's health check beside its OCI config.)
    let check: Vec<String> = image["Healthcheck"]["Test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(check[..3], ["CMD", "/usr/local/bin/fedflow-ctl", "health"]);
    let cmd: Vec<String> = config["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();

    // Containers cannot start on this machine: run the entrypoint in a copy of the image's
    // own root file system instead, as its unprivileged user.
    let (ok, mounted) = podman(&["image", "mount", "fedflow-coordinator:local"]);
    assert!(ok, "{mounted}");
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("rootfs");
    copy_tree(Path::new(mounted.trim()), &fs);
    podman(&["image", "unmount", "fedflow-coordinator:local"]);
    let chrooted = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg("--userspec=65532:65532").arg(&fs).args(args);
        c
    };
    let (ok, out) = output(&mut chrooted(&[
        "/usr/local/bin/fedflow-coordinator",
        "--version",
    ]));
    assert!(ok && out.starts_with("fedflow-coordinator "), "{out}");
    // The configuration the image expects under /etc/fedflow, made with the host's tools.
    let etc = fs.join("etc/fedflow");
    let pki = dir.path().join("pki");
    for args in [
        vec!["pki", "init", "--dir", pki.to_str().unwrap()],
        vec![
            "pki",
            "server",
            "--dir",
            pki.to_str().unwrap(),
            "--name",
            "127.0.0.1",
            "--out",
            etc.join("tls").to_str().unwrap(),
        ],
    ] {
        let (ok, out) = output(Command::new(&coordinator).args(&args));
        assert!(ok, "{out}");
    }
    fedflow_common::data::Vocab::from_events(["open", "search"])
        .unwrap()
        .save(etc.join("vocab.json"))
        .unwrap();
    std::fs::write(
        etc.join("run.toml"),
        "[run]\nname = \"image\"\nrounds = 1\n[model]\nvocab = \"vocab.json\"\n",
    )
    .unwrap();
    let (ok, out) = output(Command::new("chmod").args(["-R", "a+rX"]).arg(&etc));
    assert!(ok, "{out}");
    // The image's command, on ports of its own.
    let args: Vec<String> = cmd
        .iter()
        .map(|a| match a.as_str() {
            "0.0.0.0:50051" | "0.0.0.0:50052" | "0.0.0.0:9100" => "127.0.0.1:0".to_string(),
            _ => a.clone(),
        })
        .collect();
    let mut serve = chrooted(&["/usr/local/bin/fedflow-coordinator"]);
    let mut child = serve
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let health = loop {
        let Some(line) = lines.next() else {
            panic!(
                "serve ended without saying where its health endpoint is:\n{}",
                std::fs::read_to_string(dir.path().join("serve.log")).unwrap()
            );
        };
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("gRPC health (plaintext) on ") {
            break addr.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    // The image's health check, as the container runtime would run it (readiness is
    // checked every second: NOT_SERVING until the first check).
    let mut probe: Vec<String> = check[1..].to_vec();
    let at = probe.iter().position(|a| a == "--address").unwrap();
    probe[at + 1] = health.clone();
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();
    let mut serving = false;
    for _ in 0..100 {
        let (ok, out) = output(&mut chrooted(&probe));
        if ok && out.contains("SERVING") {
            serving = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(serving, "the health check never passed");
    // The data directory is the only place it wrote; SIGTERM stops it with exit 0.
    assert!(fs.join("var/lib/fedflow/fedflow.sqlite").exists());
    let (ok, out) = output(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert!(ok, "{out}");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Unreachable health: exit 3.
    let (ok, _) = output(&mut chrooted(&probe));
    assert!(!ok);

    // The site image's entrypoint runs in its root file system too.
    let (ok, mounted) = podman(&["image", "mount", "fedflow-site:local"]);
    assert!(ok, "{mounted}");
    let site = dir.path().join("site");
    copy_tree(Path::new(mounted.trim()), &site);
    podman(&["image", "unmount", "fedflow-site:local"]);
    let (ok, out) = output(
        Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&site)
            .args(["/usr/local/bin/fedflow-client", "--version"]),
    );
    assert!(ok && out.starts_with("fedflow-client "), "{out}");
    let (ok, inspect) = podman(&["image", "inspect", "fedflow-loadtest:local"]);
    assert!(ok, "{inspect}");
    let config = &serde_json::from_str::<serde_json::Value>(&inspect).unwrap()[0]["Config"];
    assert_eq!(config["Entrypoint"][0], "/usr/local/bin/fedflow-sim");
    assert_eq!(config["User"], "65532:65532");
}

/// `path` (YAML) as JSON, read by the test venv's PyYAML.
async fn yaml(python: &Path, path: &Path) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new(python);
    cmd.args([
        "-c",
        "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
    ])
    .arg(path);
    let out = crate::python_interop::run(cmd, "PyYAML", std::time::Duration::from_secs(60)).await;
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kubernetes_overlay_renders_and_validates_against_the_schemas() {
    use fedflow_client::agent::config::AgentConfig;
    let root = workspace().join("deploy/kubernetes");
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    assert!(
        kubectl.is_ok_and(|o| o.status.success()),
        "kubectl is needed (its built-in kustomize renders the manifests)"
    );
    let python = crate::python_interop::interop_python().await;
    let validator = python.with_file_name("kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for overlay in [
        "coordinator",
        "site",
        "loadtest",
        "overlays/coordinator-networkpolicy",
        "overlays/coordinator-full",
    ] {
        let (ok, rendered) = output(
            Command::new("kubectl")
                .arg("kustomize")
                .arg(root.join(overlay)),
        );
        assert!(ok, "{overlay}: {rendered}");
        let file = dir
            .path()
            .join(format!("{}.yaml", overlay.replace('/', "-")));
        std::fs::write(&file, &rendered).unwrap();
        let (ok, report) = output(Command::new(&validator).arg("--strict").arg(&file));
        assert!(ok && !report.contains("ERROR"), "{overlay}:\n{report}");
        for doc in yaml(&python, &file).await.as_array().unwrap() {
            let kind = doc["kind"].as_str().unwrap().to_string();
            if kind != "ServiceMonitor" {
                assert!(
                    report.contains(&format!("passed for resource {}", kind.to_lowercase())),
                    "{overlay}: {kind} was not validated:\n{report}"
                );
            }
            // Every workload runs as the unprivileged user with a read-only root.
            let pod = match kind.as_str() {
                "StatefulSet" | "Job" => &doc["spec"]["template"]["spec"],
                _ => continue,
            };
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"], true,
                "{overlay} {kind}"
            );
            for c in pod["containers"].as_array().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay} {kind}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay} {kind}");
                assert!(c["resources"]["requests"].is_object(), "{overlay} {kind}");
            }
            kinds.insert(kind);
        }
    }
    for kind in ["StatefulSet", "Job"] {
        assert!(kinds.contains(kind), "{kinds:?}");
    }
    // The configurations shipped in them parse.
    let coordinator = cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    let (ok, out) = output(
        Command::new(&coordinator)
            .arg("check-config")
            .arg(root.join("coordinator/run.toml")),
    );
    assert!(ok, "{out}");
    let site = root.join("site/site.toml");
    AgentConfig::parse(&std::fs::read_to_string(&site).unwrap(), &root.join("site"))
        .unwrap_or_else(|e| panic!("{}: {e}", site.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_federation_mounts_what_prepare_makes_and_its_dashboard_queries_real_metrics() {
    use fedflow_client::agent::config::AgentConfig;
    use fedflow_coordinator::service::METRIC_FAMILIES;
    let root = workspace().join("deploy/compose");
    let python = crate::python_interop::interop_python().await;
    let coordinator = cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    cargo_bin("fedflow-client", "fedflow-client");
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let (ok, out) = output(
        Command::new(root.join("prepare.sh"))
            .arg("--out")
            .arg(&local)
            .arg("--bin-dir")
            .arg(coordinator.parent().unwrap()),
    );
    assert!(ok, "{out}");
    let compose = yaml(&python, &root.join("compose.yaml")).await[0].clone();
    let services = compose["services"].as_object().unwrap();
    for s in [
        "coordinator",
        "site-a",
        "site-b",
        "site-c",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(s), "{s}");
    }
    // Every host path a service mounts exists (./local/ is what prepare.sh made).
    for (name, service) in services {
        for v in service["volumes"].as_array().into_iter().flatten() {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            let Some(rel) = host.strip_prefix("./") else {
                assert!(
                    compose["volumes"].get(host).is_some(),
                    "{name}: {host} is neither a path nor a named volume"
                );
                continue;
            };
            let path = match rel.strip_prefix("local/") {
                Some(r) => local.join(r),
                None => root.join(rel),
            };
            assert!(path.exists(), "{name} mounts {host}, which does not exist");
        }
    }
    // What the containers read parses.
    let (ok, out) = output(
        Command::new(&coordinator)
            .arg("check-config")
            .arg(local.join("coordinator/run.toml")),
    );
    assert!(ok, "{out}");
    for site in ["site-a", "site-b", "site-c"] {
        let d = local.join("sites").join(site);
        let cfg =
            AgentConfig::parse(&std::fs::read_to_string(d.join("site.toml")).unwrap(), &d).unwrap();
        // The bundle is complete: the site's own key and the CA-signed certificate.
        let bundle =
            fedflow_client::tls::Bundle::load(cfg.coordinator.identity.as_ref().unwrap()).unwrap();
        assert_eq!(bundle.site_name().unwrap(), site);
    }
    // Prometheus scrapes the coordinator's metrics port.
    let prometheus = yaml(&python, &root.join("prometheus.yml")).await[0].clone();
    let target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    assert_eq!(target, "coordinator:9100");
    // The dashboard asks only for metrics the coordinator exports, and the list of those is
    // true of a running coordinator.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/fedflow-dashboard.json")).unwrap(),
    )
    .unwrap();
    let known = |name: &str| {
        METRIC_FAMILIES.contains(&name)
            || ["_bucket", "_count", "_sum"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|base| METRIC_FAMILIES.contains(&base))
            })
    };
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("fedflow_"))
            {
                assert!(
                    known(name),
                    "panel {}: {name} is not exported",
                    panel["title"]
                );
                asked += 1;
            }
        }
    }
    assert!(asked >= 15, "{asked}");
    let c = fedflow_tests::TestCoordinator::builder(
        "[run]\nname = \"m\"\nrounds = 1\n[model]\nvocab = \"vocab.json\"\nembed_dim = 8\n\
         hidden_size = 8\nnum_layers = 1\n",
    )
    .metrics()
    .spawn()
    .await;
    let exported =
        fedflow_tests::http::request(c.metrics_addr.unwrap(), "GET", "/metrics", &[], b"").await;
    let mut families = 0;
    for line in exported.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            assert!(
                METRIC_FAMILIES.contains(&name.as_str()),
                "{name} is exported, not listed"
            );
            families += 1;
        }
    }
    assert!(families >= 15, "{}", exported.body);
}
