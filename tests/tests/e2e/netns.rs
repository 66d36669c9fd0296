//! A federation across network hosts that the test makes itself: network namespaces for
//! the coordinator and three sites, joined by veth pairs to a bridge in a namespace of
//! their own (no traffic leaves them; they are deleted when the test ends, failed or not).
//! The real binaries talk mutual TLS to the coordinator's address in its namespace. Faults:
//! site `a`'s link goes down for 15 s in the middle of the run and comes back (a partition
//! that heals); site `b` reaches the coordinator only through a TCP proxy in its namespace
//! that delays every chunk, throttles, and cuts its first connection and every third after
//! it once 64 KiB went through (the kernel here has no `netem`, so the slow, lossy path is
//! that proxy, `fedflow_tests::netns::Proxy`).
//! The run completes, `a` comes back by itself and contributes to a later round, `b`
//! contributes through the proxy, and every site exits 0.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use fedflow_common::data::{Vocab, write_sessions};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::security::Role;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_coordinator::store::{SiteState, Store};
use fedflow_tests::bin::cargo_bin;
use fedflow_tests::netns::{Namespaces, Proxy, ProxyFaults};

const ROUNDS: u64 = 8;

fn run_config(dir: &Path) -> PathBuf {
    let path = dir.join("run.toml");
    std::fs::write(
        &path,
        format!(
            "[run]\nname = \"hosts\"\nseed = 3\nrounds = {ROUNDS}\n\
             [schedule]\nmode = \"rounds\"\ninterval_secs = 4\n\
             [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
             [train]\nepochs = 1\n\
             [sampling]\nfraction = 1.0\nmin_selected = 2\nmin_available = 2\n\
             [rounds]\ndeadline_secs = 60\nmin_completed = 2\nheartbeat_timeout_secs = 10\n"
        ),
    )
    .unwrap();
    path
}

fn spawn_in(ns: &Namespaces, host: &str, program: &Path, args: &[&str], log: &Path) -> Child {
    ns.command(host, program)
        .args(args)
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// The coordinator's rounds as its database has them: (round, status, sites uploaded).
fn rounds(data: &Path) -> Vec<(u64, String, Vec<String>)> {
    let Ok(store) = Store::open_read_only(data) else {
        return Vec::new();
    };
    let Ok(rounds) = store.rounds("hosts") else {
        return Vec::new();
    };
    rounds
        .into_iter()
        .map(|r| {
            let uploaded = store
                .round_sites("hosts", r.round)
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.state == SiteState::Uploaded)
                .map(|s| s.site_id)
                .collect();
            (r.round, r.status.as_str().to_string(), uploaded)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_across_hosts_survives_a_partition_and_a_slow_lossy_path() {
    let ns = Namespaces::create(&["coord", "a", "b", "d"]).expect("network namespaces (root)");
    let dir = tempfile::tempdir().unwrap();
    let coordinator_ip = ns.ip("coord");

    // The federation's CA; the coordinator's certificate for its address (and for the
    // proxy's loopback end in b's namespace); one bundle per site.
    let ca = Ca::init(&dir.path().join("ca"), Validity::days(2)).unwrap();
    ca.issue_server(
        &[coordinator_ip.to_string(), "127.0.0.1".into()],
        Validity::days(2),
        &dir.path().join("coordinator"),
    )
    .unwrap();
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 900,
        min_site_sessions: 200,
        seed: 4,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let config = run_config(dir.path());
    let data = dir.path().join("data");
    let coordinator = cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    let client = cargo_bin("fedflow-client", "fedflow-client");
    let listen = format!("{coordinator_ip}:50051");
    let mut serve = spawn_in(
        &ns,
        "coord",
        &coordinator,
        &[
            "serve",
            "--listen",
            &listen,
            "--config",
            config.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--tls",
            dir.path().join("coordinator").to_str().unwrap(),
        ],
        &dir.path().join("coordinator.log"),
    );

    // Site b's path: a proxy in its namespace, on its loopback.
    let proxy = Proxy::start(
        &ns,
        "b",
        &listen,
        ProxyFaults {
            delay: Duration::from_millis(20),
            bytes_per_sec: 2 << 20,
            cut_one_in: 3,
            cut_after_bytes: 64 << 10,
        },
    )
    .unwrap();
    let mut sites = Vec::new();
    for (i, (host, name)) in [("a", "site-a"), ("b", "site-b"), ("d", "site-d")]
        .into_iter()
        .enumerate()
    {
        let bundle = dir.path().join(name);
        ca.issue(Role::Site, name, Validity::days(2), &bundle)
            .unwrap();
        let file = dir.path().join(format!("{name}.csv"));
        write_sessions(&file, &fed.sites[i].records).unwrap();
        let url = if host == "b" {
            format!("https://127.0.0.1:{}", proxy.port())
        } else {
            format!("https://{listen}")
        };
        sites.push((
            name,
            spawn_in(
                &ns,
                host,
                &client,
                &[
                    "join",
                    "--coordinator",
                    &url,
                    "--identity",
                    bundle.to_str().unwrap(),
                    "--data",
                    file.to_str().unwrap(),
                    "--vocab",
                    dir.path().join("vocab.json").to_str().unwrap(),
                    "--device",
                    "cpu",
                ],
                &dir.path().join(format!("{name}.log")),
            ),
        ));
    }

    // Once round 2 committed, site a's link goes down for 15 s, then up.
    let committed = |rs: &[(u64, String, Vec<String>)], n: u64| {
        rs.iter().any(|(r, s, _)| *r == n && s == "committed")
    };
    let mut waited = 0;
    while !committed(&rounds(&data), 2) {
        assert!(
            waited < 1200,
            "round 2 never committed: {:?}",
            rounds(&data)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    ns.link("a", false).unwrap();
    let partitioned_after = rounds(&data)
        .iter()
        .filter(|(_, s, _)| s == "committed")
        .map(|(r, _, _)| *r)
        .max()
        .unwrap();
    // The fault's duration, not a wait for anything.
    tokio::time::sleep(Duration::from_secs(15)).await;
    ns.link("a", true).unwrap();

    // Every site ends with the run, exit 0; then the coordinator.
    for (name, mut child) in sites {
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        assert!(status.success(), "{name}: {status:?}\n{log}");
    }
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");

    let rs = rounds(&data);
    assert!(committed(&rs, ROUNDS), "the run did not complete: {rs:?}");
    // a came back by itself and contributed after the partition healed; b contributed
    // through the slow, lossy path; the proxy did cut connections.
    assert!(
        rs.iter().any(|(r, s, up)| *r > partitioned_after + 1
            && s == "committed"
            && up.iter().any(|x| x == "site-a")),
        "site-a never contributed after the partition: {rs:?}"
    );
    assert!(
        rs.iter().any(|(_, _, up)| up.iter().any(|x| x == "site-b")),
        "site-b never contributed through the proxy: {rs:?}"
    );
    assert!(proxy.cuts() > 0, "the proxy never cut a connection");
}
