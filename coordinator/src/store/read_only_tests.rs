//! Reading a data directory while its coordinator holds it open for writing.

use super::*;

fn model(v: f32) -> ParamSet {
    let w = candle_core::Tensor::new(&[v, -v], &candle_core::Device::Cpu).unwrap();
    ParamSet::from_tensors([("w".to_string(), w)].into_iter().collect()).unwrap()
}

#[test]
fn a_reader_sees_committed_state_while_the_writer_holds_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = Store::open(dir.path()).unwrap();
    writer
        .create_run("pilot", r#"{"rounds":2}"#, "fedavg", &model(1.0))
        .unwrap();
    // A second writer is refused; a reader is not.
    let refused = Store::open(dir.path()).unwrap_err().to_string();
    assert!(refused.contains("in use by another process"), "{refused}");
    let reader = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.runs().unwrap().len(), 1);
    assert_eq!(reader.resume_point("pilot").unwrap().round, 0);
    // What the writer commits later is visible to the open reader's next query.
    writer
        .begin_round("pilot", 1, &[("a".to_string(), "t1".to_string())])
        .unwrap();
    writer
        .commit_round("pilot", 1, &model(2.0), None, None, None)
        .unwrap();
    assert_eq!(reader.resume_point("pilot").unwrap().round, 1);
    // The reader cannot write.
    assert!(
        reader.conn.execute("DELETE FROM runs", []).is_err(),
        "a read-only store wrote"
    );
    drop(writer);
    assert_eq!(reader.runs().unwrap().len(), 1);
}

#[test]
fn a_directory_without_a_database_is_an_error_and_stays_empty() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-data");
    let e = Store::open_read_only(&missing).unwrap_err().to_string();
    assert!(e.contains("holds no coordinator database"), "{e}");
    assert!(!missing.exists(), "reading created {}", missing.display());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(Store::open_read_only(&empty).is_err());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}
