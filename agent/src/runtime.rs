//! Where a running agent can be found: `meterd run` writes a small record
//! under `/run/meterd/agents/` (its config, API, metrics address and
//! ledger), and removes it when it stops. Client commands (`status`,
//! `ledger export`, `unload`) given no `--config` use it, so they find the
//! agent the user just started, whatever config file it runs on.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The directory of the records.
pub const DIR: &str = "/run/meterd/agents";

/// What a running agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub pid: u32,
    /// The config file it runs on (absolute).
    pub config: PathBuf,
    /// Its API: a unix socket path, or a loopback address.
    pub api: String,
    /// Its `/metrics` address.
    pub metrics: String,
    pub ledger: PathBuf,
    pub pin_dir: PathBuf,
}

impl Running {
    /// Writes the record as `<name>.json` (the instance lock's name).
    pub fn write(&self, name: &str) -> std::io::Result<PathBuf> {
        fs::create_dir_all(DIR)?;
        let path = Path::new(DIR).join(format!("{name}.json"));
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// The agents whose record is there and whose process is alive.
pub fn running() -> Vec<Running> {
    let Ok(entries) = fs::read_dir(DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice::<Running>(&fs::read(e.path()).ok()?).ok())
        .filter(|r| Path::new(&format!("/proc/{}", r.pid)).exists())
        .collect()
}
