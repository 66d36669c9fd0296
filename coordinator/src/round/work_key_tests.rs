//! The engine's work key: it changes exactly when what a waiting site's poll could be handed
//! does, so held polls are woken by changes rather than by asking again.

use super::tests::{SEC, SITES, T0, engine, evaluate, fixture, poll_all, report, submit, update};

#[test]
fn the_work_key_changes_when_tasks_do_and_only_then() {
    let f = fixture("[evaluation]\nevery = 1\n");
    let mut e = engine(&f);
    let waiting = e.work_key();
    // Sites showing up and polling without enough of them: nothing to hand out, no change.
    e.site_seen("site-a", T0).unwrap();
    assert!(e.poll_task("site-a", T0).unwrap().is_none());
    assert_eq!(e.work_key(), waiting);
    // Enough sites: the round starts and the key changes.
    let tickets = poll_all(&mut e, T0);
    let training = e.work_key();
    assert_ne!(training, waiting);
    // Updates arriving change nothing a poll can get until the round closes.
    let u = update(&f, 1e-3);
    submit(&mut e, SITES[0], &tickets[SITES[0]], &u, 10, T0 + SEC).unwrap();
    assert_eq!(e.work_key(), training);
    e.site_seen(SITES[1], T0 + SEC).unwrap();
    assert!(e.poll_task(SITES[1], T0 + SEC).unwrap().is_some());
    assert_eq!(e.work_key(), training);
    for s in &SITES[1..] {
        submit(&mut e, s, &tickets[*s], &u, 10, T0 + 2 * SEC).unwrap();
    }
    // Round 1 committed, its evaluation opened: new tasks, a new key.
    assert_eq!(e.committed_round(), 1);
    let evaluating = e.work_key();
    assert_ne!(evaluating, training);
    let evals = poll_all(&mut e, T0 + 3 * SEC);
    for s in SITES {
        evaluate(&mut e, s, &evals[s], report(10, 0.5), T0 + 4 * SEC).unwrap();
    }
    // Round 2's tasks: another key again.
    let next = poll_all(&mut e, T0 + 5 * SEC);
    assert!(next.values().all(|t| t.round == 2));
    assert_ne!(e.work_key(), evaluating);
    assert_ne!(e.work_key(), training);
}
