//! `fedflow-sim swarm` as a binary: a process of simulated no-op sites takes part in a real
//! coordinator's run until it finishes, every site contributing to every round.

use std::process::Command;

use fedflow_tests::TestCoordinator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_noop_sites_runs_a_federation_to_its_end() {
    let c = TestCoordinator::builder(
        "[run]\nname = \"swarm\"\nseed = 1\nrounds = 2\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
         [sampling]\nmin_selected = 6\nmin_available = 6\n\
         [rounds]\ndeadline_secs = 120\nmin_completed = 6\n",
    )
    .spawn()
    .await;
    let url = c.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fedflow-sim"))
            .args([
                "swarm",
                "--sites",
                "6",
                "--index",
                "3",
                "--coordinator",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("swarm 3: 6 site(s) done, 12 contribution(s) in all"),
        "{stdout}"
    );
    assert_eq!(c.handle.snapshot().await.unwrap().committed_round, 2);
    // The sites are named by the process's index.
    let sites = c
        .handle
        .inspect(|e, _| e.store().round_sites("swarm", 1))
        .await
        .unwrap();
    assert!(
        sites.iter().all(|s| s.site_id.starts_with("load-3-")),
        "{sites:?}"
    );
}
