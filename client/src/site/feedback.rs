//! Error feedback: what compression dropped from a site's update (its residual), added to
//! the site's next update before that one is compressed (Seide et al. 2014; Karimireddy et
//! al. 2019, "Error Feedback Fixes SignSGD"), so what top-k or quantisation leaves out is
//! sent later instead of lost.
//!
//! The residual is kept across rounds and, with a state directory, across restarts: one
//! file, `error-feedback.safetensors` (written atomically), holding the task it was made
//! for, the residual that went *into* that task (`in/<p>`) and the one it left (`out/<p>`),
//! plus `error-feedback.accepted`, the id of the last task whose update the coordinator
//! accepted. The next task starts from `out` when its predecessor was accepted and from
//! `in` otherwise (a refused or lost update was never applied, so neither was its
//! residual's complement); the same task run again (after a crash) starts from `in` again.
//! A new run, or a model of another shape, starts without a residual.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedflow_common::params::{ParamSet, ParamSpec};

use super::TaskSpec;
use crate::{Error, Result};

/// The residual file's name in the state directory.
pub const FEEDBACK_FILE: &str = "error-feedback.safetensors";
/// The file naming the last task whose update was accepted.
pub const ACCEPTED_FILE: &str = "error-feedback.accepted";
/// The residual file's format tag (safetensors metadata `format`).
const FORMAT: &str = "fedflow.error-feedback/1";

/// One task's residuals.
#[derive(Debug, Clone)]
struct State {
    run_id: String,
    task_id: String,
    /// The residual the task started from.
    input: Option<ParamSet>,
    /// The residual it left.
    output: ParamSet,
    /// The last task whose update the coordinator accepted.
    accepted: Option<String>,
}

/// A site's error-feedback residual, in memory and (with a directory) on disk.
#[derive(Debug)]
pub struct ErrorFeedback {
    dir: Option<PathBuf>,
    state: Mutex<Option<State>>,
}

impl ErrorFeedback {
    /// Residuals kept in memory only: lost when the process ends.
    pub fn in_memory() -> Self {
        ErrorFeedback {
            dir: None,
            state: Mutex::new(None),
        }
    }

    /// Residuals kept in `dir` (created if missing), reading what an earlier process left
    /// there. A file that cannot be read is an error naming it (nothing is overwritten).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| fedflow_common::Error::io(dir, e))?;
        let state = load(dir)?;
        Ok(ErrorFeedback {
            dir: Some(dir.to_path_buf()),
            state: Mutex::new(state),
        })
    }

    /// Whether residuals survive a restart.
    pub fn is_persistent(&self) -> bool {
        self.dir.is_some()
    }

    /// The residual `task` starts from, for a model shaped like `spec` (see the module docs);
    /// `None` when there is none.
    pub fn residual(&self, task: &TaskSpec, spec: &ParamSpec) -> Option<ParamSet> {
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = guard.as_ref()?;
        if s.run_id != task.run_id {
            return None;
        }
        let residual = if s.task_id == task.task_id {
            s.input.clone()
        } else if s.accepted.as_deref() == Some(s.task_id.as_str()) {
            Some(s.output.clone())
        } else {
            s.input.clone()
        }?;
        if spec.check_matches(&residual.spec()).is_err() {
            tracing::warn!(
                round = task.round,
                "the kept error-feedback residual is for a model of another shape: starting \
                 without it"
            );
            return None;
        }
        Some(residual)
    }

    /// Records that `task` started from `input` and left `output`, on disk first.
    pub fn record(&self, task: &TaskSpec, input: Option<ParamSet>, output: ParamSet) -> Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let accepted = guard.as_ref().and_then(|s| s.accepted.clone());
        let state = State {
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
            input,
            output,
            accepted,
        };
        if let Some(dir) = &self.dir {
            save(dir, &state)?;
        }
        *guard = Some(state);
        Ok(())
    }

    /// Records that the coordinator accepted `task`'s update, so the next task starts from
    /// the residual `task` left.
    pub fn accepted(&self, task: &TaskSpec) -> Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = guard.as_mut() else {
            return Ok(());
        };
        if state.task_id != task.task_id {
            return Ok(());
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(ACCEPTED_FILE);
            fedflow_common::fsio::write_atomic(&path, task.task_id.as_bytes())?;
        }
        state.accepted = Some(task.task_id.clone());
        Ok(())
    }
}

/// Writes `state`'s residuals (the accepted marker is written apart).
fn save(dir: &Path, state: &State) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (prefix, set) in [("in/", state.input.as_ref()), ("out/", Some(&state.output))] {
        for (name, t) in set.into_iter().flat_map(|s| s.iter()) {
            tensors.insert(format!("{prefix}{name}"), t.clone());
        }
    }
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("run_id".to_string(), state.run_id.clone()),
        ("task_id".to_string(), state.task_id.clone()),
    ]);
    let bytes = safetensors::tensor::serialize(tensors.iter(), Some(metadata)).map_err(|e| {
        fedflow_common::Error::Safetensors(format!("cannot save the residual: {e}"))
    })?;
    fedflow_common::fsio::write_atomic(&dir.join(FEEDBACK_FILE), &bytes)?;
    Ok(())
}

/// Reads what an earlier process left in `dir`, if anything.
fn load(dir: &Path) -> Result<Option<State>> {
    let path = dir.join(FEEDBACK_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fedflow_common::Error::io(&path, e).into()),
    };
    let bad = |why: String| Error::Store(format!("{}: {why}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a residual file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not a {FORMAT} file")));
    }
    let field = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("the metadata has no {k}")))
    };
    let (run_id, task_id) = (field("run_id")?, field("task_id")?);
    let all = ParamSet::from_safetensors_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut parts: [BTreeMap<String, candle_core::Tensor>; 2] = Default::default();
    for (name, t) in all.into_tensors() {
        let (i, rest) = if let Some(rest) = name.strip_prefix("in/") {
            (0, rest)
        } else if let Some(rest) = name.strip_prefix("out/") {
            (1, rest)
        } else {
            return Err(bad(format!("unexpected tensor `{name}`")));
        };
        parts[i].insert(rest.to_string(), t);
    }
    let [input, output] = parts;
    let input = (!input.is_empty())
        .then(|| ParamSet::from_tensors(input))
        .transpose()?;
    let output = ParamSet::from_tensors(output)?;
    let accepted = match std::fs::read_to_string(dir.join(ACCEPTED_FILE)) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(fedflow_common::Error::io(dir.join(ACCEPTED_FILE), e).into()),
    };
    Ok(Some(State {
        run_id,
        task_id,
        input,
        output,
        accepted,
    }))
}
